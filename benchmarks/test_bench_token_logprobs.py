"""fwd+bwd of ``token_logprobs`` from logits (log p(target) per token, optionally the entropy) beside eager
PyTorch. ``linear_token_logprobs`` from hidden states is in test_bench_linear_cross_entropy.py.

    eager          ``log_softmax(logits.float())`` + ``gather`` (TRL's selective_log_softmax without its loop);
                   the entropy as ``-(p * logp).sum(-1)``
    ptk-<backend>  ``ptkernels.token_logprobs`` on each usable backend except "reference" and the Triton
                   interpreter (chunked rows: no [N, V] log-softmax)

Size: the logits of this device's token-level size (conftest.bench_size: CPU N=4096 with 25% targets = -100,
V=32000, fp32; GPU N=8192, V=128256, bf16); backward from the mean log-prob (plus the mean entropy).
``extra_info``: median, peak memory (CUDA max_memory_allocated growth; CPU peak RSS growth of a fresh
subprocess; the logits are built before the baseline), ``time_x_eager``, ``mem_x_eager``. Times are never
asserted; each case checks its outputs and gradient against eager.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, PTK_BACKENDS, WARMUP_SIZE, bench_size, fwd_bwd, ptk_skip_reason, run_case
from test_bench_cross_entropy import IGNORE, Problem

import ptkernels

OPS = ("token_logprobs", "token_logprobs[entropy]")
IMPLS = ("eager",) + tuple(f"ptk-{b}" for b in PTK_BACKENDS)


def _eager(logits, targets, entropy: bool):
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = targets != IGNORE
    lp = torch.where(valid, logp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1), 0.0)
    if not entropy:
        return lp
    return lp, torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)


def make_step(op: str, impl: str, p: Problem):
    entropy = op.endswith("[entropy]")
    inv_valid = 1.0 / max(p.n_valid, 1)
    if impl == "eager":
        fn = lambda: _eager(p.logits, p.labels, entropy)  # noqa: E731
    else:
        fn = lambda: ptkernels.token_logprobs(p.logits, p.labels, ignore_index=IGNORE,  # noqa: E731
                                              return_entropy=entropy, backend=impl[4:])

    def objective():
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        if entropy:  # the entropy of an ignored position is not part of the contract: compare valid tokens
            outs = tuple(torch.where(p.labels != IGNORE, o, 0.0) for o in outs)
        return outs, sum(o.sum() for o in outs) * inv_valid

    return fwd_bwd(objective, p.logits.device)


def memory_case(op: str, impl: str, device: str = "cpu", **size):
    """Factory for _measure.peak_rss_growth: builds the problem in the (fresh) process, returns its step."""
    return make_step(op, impl, Problem(**size, device=device))


@pytest.fixture(scope="module")
def problem(size) -> Problem:
    return Problem(size.n, size.v, size.masked, size.dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_token_logprobs_fwd_bwd(benchmark, op, impl, problem, size):
    reason = ptk_skip_reason(impl[4:], DEVICE) if impl.startswith("ptk-") else None
    if reason:
        pytest.skip(reason)
    run_case(benchmark, module_file=__file__, op=op, impl=impl, problem=problem,
             make_step=lambda i: make_step(op, i, problem), size=bench_size().as_kwargs(),
             warmup_size=WARMUP_SIZE.as_kwargs(), tol=1e-4 if size.dtype == torch.float32 else 3e-2,
             info={"n_valid": problem.n_valid})

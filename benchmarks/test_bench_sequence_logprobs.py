"""fwd+bwd of sequence_logprobs (padded, sum and average) and packed_sequence_logprobs beside eager PyTorch.

One case = the per-sequence sums of token log-probs of one micro-batch, then backward from their sum:

    eager          ptkernels.reference.sequence: ``(logp * mask).sum(-1)`` (TRL's concatenated_forward); packed,
                   a Python loop over ``cu_seqlens`` slices, as one writes it without a segment-sum kernel
    ptk-<backend>  ptkernels on each usable backend except "reference" and the Triton interpreter

Sizes: B x T token log-probs as a GRPO micro-batch (CPU 8 x 512, GPU 8 x 1024), right-padded with lengths
uniform in [T/2, T] (about 25% padding); packed, the same valid tokens without the padding. fp32 (log-probs
come out of the fused ops in fp32). ``PTK_BENCH_SMALL=1``: a smoke size. ``extra_info``: median, peak memory
(CUDA max_memory_allocated growth; CPU peak RSS growth of a fresh subprocess), ``time_x_eager``,
``mem_x_eager``. Times are never asserted; each case checks its output and gradient against eager.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, PTK_BACKENDS, Leaves, fwd_bwd, ptk_skip_reason, run_case, smoke

import ptkernels
from ptkernels.reference import sequence as ref_seq

OPS = ("sequence_logprobs", "sequence_logprobs[average]", "packed_sequence_logprobs")
IMPLS = ("eager",) + tuple(f"ptk-{b}" for b in PTK_BACKENDS)
WARMUP = {"b": 2, "t": 16}


def seq_size() -> dict:
    if smoke():
        return {"b": 4, "t": 64}
    return {"b": 8, "t": 1024} if DEVICE.type == "cuda" else {"b": 8, "t": 512}


class Problem(Leaves):
    """token_logps [B, T] (requires grad) with a right-padded mask; the packed copy of its valid tokens."""

    def __init__(self, b: int, t: int, device=DEVICE, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
        self.mask = (torch.arange(t)[None, :] < lengths[:, None]).to(device)
        self.logps = (-5 * torch.rand(b, t, generator=g)).to(device).requires_grad_()
        self.packed = (-5 * torch.rand(int(lengths.sum()), generator=g)).to(device).requires_grad_()
        self.cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device)
        self.leaves = (self.logps, self.packed)


def _objective(op: str, impl: str, p: Problem):
    average = op.endswith("[average]")
    if op == "packed_sequence_logprobs":
        if impl == "eager":
            fn = lambda: ref_seq.packed_sequence_logprobs(p.packed, p.cu_seqlens)  # noqa: E731
        else:
            fn = lambda: ptkernels.packed_sequence_logprobs(p.packed, p.cu_seqlens, backend=impl[4:])  # noqa: E731
    elif impl == "eager":
        fn = lambda: ref_seq.sequence_logprobs(p.logps, p.mask, average=average)  # noqa: E731
    else:
        fn = lambda: ptkernels.sequence_logprobs(p.logps, p.mask, average=average, backend=impl[4:])  # noqa: E731

    def objective():
        out = fn()
        return out, out.sum()

    return objective


def make_step(op: str, impl: str, p: Problem):
    return fwd_bwd(_objective(op, impl, p), p.logps.device)


def memory_case(op: str, impl: str, b: int, t: int, device: str = "cpu"):
    """Factory for _measure.peak_rss_growth: builds the problem in the (fresh) process, returns its step."""
    return make_step(op, impl, Problem(b, t, device))


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem(**seq_size())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_sequence_logprobs_fwd_bwd(benchmark, op, impl, problem):
    reason = ptk_skip_reason(impl[4:], DEVICE) if impl.startswith("ptk-") else None
    if reason:
        pytest.skip(reason)
    run_case(benchmark, module_file=__file__, op=op, impl=impl, problem=problem,
             make_step=lambda i: make_step(op, i, problem), size=seq_size(), warmup_size=WARMUP, tol=1e-5,
             info={"n_valid": int(problem.mask.sum())})

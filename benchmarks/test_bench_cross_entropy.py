"""fwd+bwd of ``cross_entropy`` from logits (for users who already have them) beside eager PyTorch.

    eager          ``F.cross_entropy(logits.float(), labels, ignore_index=-100)`` (Hugging Face's upcast)
    ptk-<backend>  ``ptkernels.cross_entropy`` on each usable backend except "reference" and the Triton
                   interpreter (chunked rows: no fp32 copy of the logits, one gradient buffer)

Size: the logits of this device's token-level size (conftest.bench_size: CPU N=4096 with 25% labels = -100,
V=32000, fp32; GPU N=8192, V=128256, bf16); the gradient is of the logits. ``extra_info``: median, peak memory
(CUDA max_memory_allocated growth; CPU peak RSS growth of a fresh subprocess; the logits themselves are built
before the baseline), ``time_x_eager``, ``mem_x_eager``. Times are never asserted; each case checks its loss and
gradient against eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPES, PTK_BACKENDS, WARMUP_SIZE, Leaves, bench_size, fwd_bwd, ptk_skip_reason, run_case

import ptkernels

IGNORE = -100
IMPLS = ("eager",) + tuple(f"ptk-{b}" for b in PTK_BACKENDS)


class Problem(Leaves):
    """logits [N, V] (requiring grad) and labels [N] with a ``masked`` fraction of ignore_index."""

    def __init__(self, n: int, v: int, masked: float, dtype, device=DEVICE, seed: int = 0, **_):
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.logits = (2 * torch.randn(n, v, generator=g)).to(device=device, dtype=dtype).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=g)
        labels[torch.randperm(n, generator=g)[: int(n * masked)]] = IGNORE
        self.labels = labels.to(device)
        self.n_valid = int((labels != IGNORE).sum())
        self.leaves = (self.logits,)


def make_step(op: str, impl: str, p: Problem):
    if impl == "eager":
        fn = lambda: F.cross_entropy(p.logits.float(), p.labels, ignore_index=IGNORE)  # noqa: E731
    else:
        fn = lambda: ptkernels.cross_entropy(p.logits, p.labels, ignore_index=IGNORE, backend=impl[4:])  # noqa: E731

    def objective():
        out = fn()
        return out, out

    return fwd_bwd(objective, p.logits.device)


def memory_case(op: str, impl: str, device: str = "cpu", **size):
    """Factory for _measure.peak_rss_growth: builds the problem in the (fresh) process, returns its step."""
    return make_step(op, impl, Problem(**size, device=device))


@pytest.fixture(scope="module")
def problem(size) -> Problem:
    return Problem(size.n, size.v, size.masked, size.dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_fwd_bwd(benchmark, impl, problem, size):
    reason = ptk_skip_reason(impl[4:], DEVICE) if impl.startswith("ptk-") else None
    if reason:
        pytest.skip(reason)
    run_case(benchmark, module_file=__file__, op="cross_entropy", impl=impl, problem=problem,
             make_step=lambda i: make_step("cross_entropy", i, problem), size=bench_size().as_kwargs(),
             warmup_size=WARMUP_SIZE.as_kwargs(), tol=1e-4 if size.dtype == torch.float32 else 3e-2,
             info={"n_valid": problem.n_valid})

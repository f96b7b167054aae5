"""``kl_penalty`` (k1, k2, k3 estimators) forward + backward beside eager PyTorch.

    eager  ptkernels.reference.rl.kl_penalty (the estimators as written in TRL / Schulman's note)
    ptk    ptkernels.kl_penalty (one implementation: torch)

Size: per-token log-probs of a GRPO micro-batch, B x T (CPU 8 x 512, GPU 8 x 1024), fp32. ``PTK_BENCH_SMALL=1``:
a smoke size. ``extra_info``: median, peak memory (CUDA max_memory_allocated growth; CPU peak RSS growth of a
fresh subprocess), ``time_x_eager``, ``mem_x_eager``. Times are never asserted; each case checks its output
and gradient against eager.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, Leaves, fwd_bwd, run_case, smoke

import ptkernels
from ptkernels.reference import rl as ref_rl

ESTIMATORS = ("k1", "k2", "k3")
WARMUP = {"b": 2, "t": 16}


def kl_size() -> dict:
    if smoke():
        return {"b": 4, "t": 64}
    return {"b": 8, "t": 1024} if DEVICE.type == "cuda" else {"b": 8, "t": 512}


class Problem(Leaves):
    def __init__(self, b: int, t: int, device=DEVICE, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.ref_logps = (-5 * torch.rand(b, t, generator=g)).to(device)
        self.logps = (self.ref_logps + 0.1 * torch.randn(b, t, generator=g).to(device)).requires_grad_()
        self.leaves = (self.logps,)


def make_step(op: str, impl: str, p: Problem):
    estimator = op.partition("[")[2].rstrip("]")
    fn = ref_rl.kl_penalty if impl == "eager" else ptkernels.kl_penalty

    def objective():
        out = fn(p.logps, p.ref_logps, estimator=estimator)
        return out, out.sum()

    return fwd_bwd(objective, p.logps.device)


def memory_case(op: str, impl: str, b: int, t: int, device: str = "cpu"):
    """Factory for _measure.peak_rss_growth: builds the problem in the (fresh) process, returns its step."""
    return make_step(op, impl, Problem(b, t, device))


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem(**kl_size())


@pytest.mark.parametrize("impl", ("eager", "ptk"))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty(benchmark, estimator, impl, problem):
    op = f"kl_penalty[{estimator}]"
    run_case(benchmark, module_file=__file__, op=op, impl=impl, problem=problem,
             make_step=lambda i: make_step(op, i, problem), size=kl_size(), warmup_size=WARMUP, tol=1e-5)

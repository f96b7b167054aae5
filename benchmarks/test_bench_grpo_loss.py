"""The unfused GRPO pieces beside eager PyTorch: ``grpo_loss`` on per-token log-probs (forward + backward)
and ``group_advantages`` (forward; it has no gradient). The fused ``fused_linear_grpo_loss`` from hidden states
is in test_bench_grpo.py.

    eager          ptkernels.reference.rl: TRL's ``GRPOTrainer._compute_loss`` and its advantage code, literally
    ptk-<backend>  ptkernels on each usable backend except "reference" and the Triton interpreter

Sizes: a GRPO micro-batch of B completions x T tokens (CPU 8 x 512, GPU 8 x 1024; groups of 4), fp32 log-probs,
right-padded with lengths uniform in [T/2, T]; TRL's default loss_type "dapo", token-level importance sampling,
a k3 KL term (beta = 0.04). ``PTK_BENCH_SMALL=1``: a smoke size. ``extra_info``: median, peak memory (CUDA
max_memory_allocated growth; CPU peak RSS growth of a fresh subprocess), ``time_x_eager``, ``mem_x_eager``.
Times are never asserted; each case checks its outputs and gradient against eager.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, PTK_BACKENDS, Leaves, fwd_bwd, ptk_skip_reason, run_case, smoke

import ptkernels
from ptkernels.reference import rl as ref_rl

BETA, EPS_LOW, EPS_HIGH, LOSS_TYPE, GROUP = 0.04, 0.2, 0.28, "dapo", 4
OPS = ("grpo_loss", "group_advantages")
IMPLS = ("eager",) + tuple(f"ptk-{b}" for b in PTK_BACKENDS)
WARMUP = {"b": 4, "t": 16}


def grpo_size() -> dict:
    if smoke():
        return {"b": 4, "t": 64}
    return {"b": 8, "t": 1024} if DEVICE.type == "cuda" else {"b": 8, "t": 512}


class Problem(Leaves):
    """logps [B, T] (requires grad), old and reference log-probs near them, a right-padded mask, rewards [B]
    and their group-relative advantages."""

    def __init__(self, b: int, t: int, device=DEVICE, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
        self.mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.int64).to(device)
        self.old_logps = (-5 * torch.rand(b, t, generator=g)).to(device)
        self.ref_logps = self.old_logps + 0.05 * torch.randn(b, t, generator=g).to(device)
        self.logps = (self.old_logps + 0.05 * torch.randn(b, t, generator=g).to(device)).requires_grad_()
        self.rewards = torch.randn(b, generator=g).to(device)
        self.advantages = ref_rl.group_advantages(self.rewards, group_size=GROUP)
        self.leaves = (self.logps,)


def _objective(op: str, impl: str, p: Problem):
    if op == "group_advantages":
        if impl == "eager":
            return lambda: (ref_rl.group_advantages(p.rewards, group_size=GROUP), None)
        return lambda: (ptkernels.group_advantages(p.rewards, group_size=GROUP, backend=impl[4:]), None)
    kw = dict(ref_logps=p.ref_logps, beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type=LOSS_TYPE)
    if impl == "eager":
        fn = lambda: ref_rl.grpo_loss(p.logps, p.old_logps, p.advantages, p.mask, **kw)  # noqa: E731
    else:
        fn = lambda: ptkernels.grpo_loss(p.logps, p.old_logps, p.advantages, p.mask, backend=impl[4:], **kw)  # noqa: E731

    def objective():
        out = fn()
        return (out.loss, out.kl, out.clip_ratio), out.loss

    return objective


def make_step(op: str, impl: str, p: Problem):
    return fwd_bwd(_objective(op, impl, p), p.logps.device)


def memory_case(op: str, impl: str, b: int, t: int, device: str = "cpu"):
    """Factory for _measure.peak_rss_growth: builds the problem in the (fresh) process, returns its step."""
    return make_step(op, impl, Problem(b, t, device))


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem(**grpo_size())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_grpo_loss(benchmark, op, impl, problem):
    reason = ptk_skip_reason(impl[4:], DEVICE) if impl.startswith("ptk-") else None
    if reason:
        pytest.skip(reason)
    run_case(benchmark, module_file=__file__, op=op, impl=impl, problem=problem,
             make_step=lambda i: make_step(op, i, problem), size=grpo_size(), warmup_size=WARMUP, tol=1e-5,
             info={"n_valid": int(problem.mask.sum()), "group_size": GROUP, "loss_type": LOSS_TYPE, "beta": BETA})

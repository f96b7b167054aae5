"""PPO pieces beside eager PyTorch: ``gae`` (forward only: it has no gradient) and the clipped
``ppo_policy_loss`` / ``ppo_value_loss`` (forward + backward).

    eager          ptkernels.reference.rl: TRL's PPOTrainer code (GAE as a reverse Python loop over T of
                   [B]-vector ops, the losses as masked means)
    ptk-<backend>  ``gae`` on each usable backend except "reference" and the Triton interpreter
    ptk            ``ppo_policy_loss`` / ``ppo_value_loss`` (one implementation: fused masked reductions)

Sizes: B x T per-token tensors of a rollout batch (CPU 8 x 512, GPU 8 x 1024), fp32, right-padded with lengths
uniform in [T/2, T]. ``PTK_BENCH_SMALL=1``: a smoke size. ``extra_info``: median, peak memory (CUDA
max_memory_allocated growth; CPU peak RSS growth of a fresh subprocess), ``time_x_eager``, ``mem_x_eager``.
Times are never asserted; each case checks its outputs and gradient against eager.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, PTK_BACKENDS, Leaves, fwd_bwd, ptk_skip_reason, run_case, smoke

import ptkernels
from ptkernels.reference import rl as ref_rl

GAMMA, LAM, CLIP = 1.0, 0.95, 0.2
IMPLS = {"gae": ("eager",) + tuple(f"ptk-{b}" for b in PTK_BACKENDS),
         "ppo_policy_loss": ("eager", "ptk"), "ppo_value_loss": ("eager", "ptk")}
CASES = [(op, impl) for op, impls in IMPLS.items() for impl in impls]
WARMUP = {"b": 2, "t": 16}


def ppo_size() -> dict:
    if smoke():
        return {"b": 4, "t": 64}
    return {"b": 8, "t": 1024} if DEVICE.type == "cuda" else {"b": 8, "t": 512}


class Problem(Leaves):
    """rewards, values, old values, log-probs (requires grad), old log-probs, a right-padded mask, all [B, T]."""

    def __init__(self, b: int, t: int, device=DEVICE, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
        self.mask = (torch.arange(t)[None, :] < lengths[:, None]).to(device)
        self.rewards = (0.1 * torch.randn(b, t, generator=g)).to(device)
        self.old_values = torch.randn(b, t, generator=g).to(device)
        self.values = (self.old_values + 0.3 * torch.randn(b, t, generator=g).to(device)).requires_grad_()
        self.old_logps = (-5 * torch.rand(b, t, generator=g)).to(device)
        self.logps = (self.old_logps + 0.2 * torch.randn(b, t, generator=g).to(device)).requires_grad_()
        with torch.no_grad():
            self.advantages, self.returns = ref_rl.gae(self.rewards, self.old_values, self.mask, gamma=GAMMA, lam=LAM)
        self.leaves = (self.logps, self.values)


def _objective(op: str, impl: str, p: Problem):
    if op == "gae":
        if impl == "eager":
            return lambda: (ref_rl.gae(p.rewards, p.old_values, p.mask, gamma=GAMMA, lam=LAM), None)
        return lambda: (ptkernels.gae(p.rewards, p.old_values, p.mask, gamma=GAMMA, lam=LAM, backend=impl[4:]), None)
    if op == "ppo_policy_loss":
        fn = ref_rl.ppo_policy_loss if impl == "eager" else ptkernels.ppo_policy_loss

        def policy():
            out = fn(p.logps, p.old_logps, p.advantages, p.mask, clip_range=CLIP)
            return (out.loss, out.clip_frac, out.approx_kl), out.loss

        return policy
    fn = ref_rl.ppo_value_loss if impl == "eager" else ptkernels.ppo_value_loss

    def value():
        out = fn(p.values, p.old_values, p.returns, p.mask, clip_range_value=CLIP)
        return (out.loss, out.clip_frac), out.loss

    return value


def make_step(op: str, impl: str, p: Problem):
    return fwd_bwd(_objective(op, impl, p), p.logps.device)


def memory_case(op: str, impl: str, b: int, t: int, device: str = "cpu"):
    """Factory for _measure.peak_rss_growth: builds the problem in the (fresh) process, returns its step."""
    return make_step(op, impl, Problem(b, t, device))


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem(**ppo_size())


@pytest.mark.parametrize(("op", "impl"), CASES)
def test_ppo(benchmark, op, impl, problem):
    reason = ptk_skip_reason(impl[4:], DEVICE) if impl.startswith("ptk-") else None
    if reason:
        pytest.skip(reason)
    run_case(benchmark, module_file=__file__, op=op, impl=impl, problem=problem,
             make_step=lambda i: make_step(op, i, problem), size=ppo_size(), warmup_size=WARMUP, tol=1e-5,
             info={"n_valid": int(problem.mask.sum()), "gamma": GAMMA, "lam": LAM, "clip_range": CLIP})

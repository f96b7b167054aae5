"""The unfused preference losses on sequence log-probs beside eager PyTorch: ``dpo_loss`` (sigmoid and ipo),
forward + backward. The fused ``fused_linear_preference_loss`` from hidden states is in test_bench_preference.py.

    eager  ptkernels.reference.preference.dpo_loss: TRL's ``DPOTrainer.dpo_loss``, literally
    ptk    ptkernels.dpo_loss (one implementation: torch)

Size: a DPO batch of sequence log-probs (CPU 4 pairs, GPU 4 pairs: the benchmark batch; the op is [B]-sized, so its
time is the per-call cost), fp32. ``extra_info``: median, peak memory (CUDA max_memory_allocated growth; CPU peak
RSS growth of a fresh subprocess), ``time_x_eager``, ``mem_x_eager``. Times are never asserted; each case
checks its outputs and gradients against eager.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, Leaves, fwd_bwd, run_case

import ptkernels
from ptkernels.reference import preference as ref_pref

BETA = 0.1
LOSS_TYPES = ("sigmoid", "ipo")
WARMUP = {"pairs": 1, "t": 16}


def dpo_size() -> dict:
    return {"pairs": 4, "t": 1024} if DEVICE.type == "cuda" else {"pairs": 4, "t": 512}


class Problem(Leaves):
    """Policy chosen / rejected sequence log-probs [B] (requiring grad), the reference's, and lengths."""

    def __init__(self, pairs: int, t: int, device=DEVICE, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.lengths = torch.randint(t // 4, t // 2 + 1, (2, pairs), generator=g).to(device)
        base = -0.5 * self.lengths.float()
        self.ref = (base + 5 * torch.randn(2, pairs, generator=g).to(device))
        self.chosen = (self.ref[0] + torch.randn(pairs, generator=g).to(device)).requires_grad_()
        self.rejected = (self.ref[1] + torch.randn(pairs, generator=g).to(device)).requires_grad_()
        self.leaves = (self.chosen, self.rejected)


def make_step(op: str, impl: str, p: Problem):
    loss_type = op.partition("[")[2].rstrip("]")
    fn = ref_pref.dpo_loss if impl == "eager" else ptkernels.dpo_loss

    def objective():
        out = fn(p.chosen, p.rejected, p.ref[0], p.ref[1], beta=BETA, loss_type=loss_type,
                 chosen_lengths=p.lengths[0], rejected_lengths=p.lengths[1])
        return (out.loss, out.losses, out.chosen_rewards, out.rejected_rewards), out.loss

    return fwd_bwd(objective, p.chosen.device)


def memory_case(op: str, impl: str, pairs: int, t: int, device: str = "cpu"):
    """Factory for _measure.peak_rss_growth: builds the problem in the (fresh) process, returns its step."""
    return make_step(op, impl, Problem(pairs, t, device))


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem(**dpo_size())


@pytest.mark.parametrize("impl", ("eager", "ptk"))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_loss(benchmark, loss_type, impl, problem):
    op = f"dpo_loss[{loss_type}]"
    run_case(benchmark, module_file=__file__, op=op, impl=impl, problem=problem,
             make_step=lambda i: make_step(op, i, problem), size=dpo_size(), warmup_size=WARMUP, tol=1e-5,
             info={"beta": BETA})

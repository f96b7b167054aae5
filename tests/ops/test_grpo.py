"""kl_penalty, group_advantages and grpo_loss on every backend against the float64 TRL-style reference."""

import pytest
import torch

from ptkernels.ops.grpo import group_advantages, grpo_loss
from ptkernels.ops.kl import kl_penalty
from ptkernels.reference import rl as ref
from tests.helpers import DEVICE, FUSED_BACKENDS, assert_close_to_truth

B, T = 5, 9
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
METRICS = ("kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high")


def _problem(dtype=torch.float64, seed=0, float_mask=False):
    g = torch.Generator().manual_seed(seed)
    logps = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 1.5)
    old = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.25  # ratios spread past the clips,
    old = old + torch.randn(B, 1, generator=g, dtype=torch.float64) * 0.25  # per token and per sequence
    refp = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    signs = torch.tensor([-1.0, 1, -1, 1, 1], dtype=torch.float64)  # low and high clips both happen
    adv = torch.randn(B, generator=g, dtype=torch.float64).abs() * signs
    mask = torch.ones(B, T)
    mask[1, 6:] = 0  # right padding
    mask[2, :] = 0  # an empty completion
    mask[3, 1:] = 0  # a single token
    if float_mask:
        mask = mask * torch.rand(B, T, generator=g, dtype=torch.float64).add(0.5)
    else:
        mask = mask.to(torch.int64)
    to = lambda x: x.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return to(logps).requires_grad_(), to(old), to(refp), to(adv), mask.to(DEVICE)


def _compare(ours, truth, logps, rtol, what):
    assert_close_to_truth(ours.loss, truth.loss, rtol, f"{what} loss")
    for f in METRICS:
        assert_close_to_truth(getattr(ours, f), getattr(truth, f), rtol, f"{what} {f}")
    g_ours, = torch.autograd.grad(ours.loss, logps)
    g_truth, = torch.autograd.grad(truth.loss, logps)
    assert_close_to_truth(g_ours, g_truth, rtol, f"{what} grad")


# ------------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_matches_reference(estimator):
    logps, _, refp, _, _ = _problem()
    refp = refp.detach().requires_grad_()
    ours = kl_penalty(logps, refp, estimator=estimator)
    truth = ref.kl_penalty(logps, refp, estimator=estimator)
    assert_close_to_truth(ours, truth, 1e-12, "kl")
    go = torch.autograd.grad(ours.sum(), (logps, refp))
    gt = torch.autograd.grad(truth.sum(), (logps, refp))
    for a, b in zip(go, gt):
        assert_close_to_truth(a, b, 1e-12, "kl grad")
    if estimator != "k1":
        assert (ours >= 0).all()


def test_kl_penalty_formulas_and_errors():
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    rf = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    d = lp - rf
    assert torch.allclose(kl_penalty(lp, rf, estimator="k1"), d)
    assert torch.allclose(kl_penalty(lp, rf, estimator="k2"), 0.5 * d * d)
    assert torch.allclose(kl_penalty(lp, rf), torch.exp(rf - lp) - (rf - lp) - 1)
    assert kl_penalty(lp.float(), rf.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(lp, rf, estimator="k4")
    with pytest.raises(ValueError, match="ref_logps"):
        kl_penalty(lp, rf[:1])


# ------------------------------------------------------------------------------------------ advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [1, 3, 4])
def test_group_advantages_matches_reference(scale, group_size):
    rewards = torch.randn(12, dtype=torch.float64, device=DEVICE)
    ours = group_advantages(rewards, group_size=group_size, scale=scale)
    truth = ref.group_advantages(rewards, group_size=group_size, scale=scale)
    assert_close_to_truth(ours, truth, 1e-12, "advantages")
    if group_size == 1 and scale != "batch":
        assert torch.equal(ours, torch.zeros_like(ours))


def test_group_advantages_zero_variance_group_is_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.3, 0.3, 0.3], device=DEVICE)
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, group_size=3, scale=scale)
        assert torch.isfinite(adv).all()
        assert torch.equal(adv[:3], torch.zeros(3, device=DEVICE))
        assert torch.equal(adv[6:], torch.zeros(3, device=DEVICE))
        assert adv.dtype == torch.float32
    # Bessel's correction, as torch.std: the group [1, 0, 1] has std sqrt(1/3).
    adv = group_advantages(rewards, group_size=3)
    expected = (torch.tensor([1.0, 0.0, 1.0]) - 2 / 3) / ((1 / 3) ** 0.5 + 1e-4)
    assert torch.allclose(adv[3:6].cpu(), expected, atol=0, rtol=1e-6)
    adv = group_advantages(rewards, group_size=3, eps=0.0)
    assert torch.isfinite(adv).all() and torch.equal(adv[:3], torch.zeros(3, device=DEVICE))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size=4 does not divide"):
        group_advantages(torch.randn(6), group_size=4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.randn(6), group_size=3, scale="token")
    with pytest.raises(ValueError, match=r"rewards must be \[N\] or \[N, R\]"):  # [N, R]: several reward functions
        group_advantages(torch.randn(2, 3, 1), group_size=3)
    with pytest.raises(ValueError, match="reward_weights has shape"):
        group_advantages(torch.randn(6, 2), group_size=3, reward_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        group_advantages(torch.randn(6, 2), group_size=3, multi_objective_aggregation="mean")


# ------------------------------------------------------------------------------------------ grpo_loss


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_matches_reference(backend, loss_type, level):
    logps, old, refp, adv, mask = _problem()
    options = [
        {},
        dict(ref_logps=refp, beta=0.04, epsilon_low=0.1, epsilon_high=0.28, delta=1.15,
             max_completion_length=12, num_items_in_batch=23),
    ]
    clipped = 0.0
    for kw in options:
        kw = dict(kw, loss_type=loss_type, importance_sampling_level=level)
        ours = grpo_loss(logps, old, adv, mask, backend=backend, **kw)
        truth = ref.grpo_loss(logps, old, adv, mask, **kw)
        _compare(ours, truth, logps, 1e-10, f"{backend}/{loss_type}/{level}/{sorted(kw)}")
        assert ours.loss.dtype == torch.float64 and ours.entropy is None
        clipped += float(truth.clip_ratio)
    assert clipped > 0  # the clipping branches were exercised


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_float_mask_weights_and_fp32(backend, level):
    logps, old, refp, adv, mask = _problem(float_mask=True, seed=1)
    kw = dict(ref_logps=refp, beta=0.1, loss_type="grpo", importance_sampling_level=level)
    _compare(grpo_loss(logps, old, adv, mask, backend=backend, **kw), ref.grpo_loss(logps, old, adv, mask, **kw),
             logps, 1e-10, "float mask")
    # fp32 inputs: fp32 outputs within 1e-5 of the float64 truth
    l32 = logps.detach().float().requires_grad_()
    ours = grpo_loss(l32, old.float(), adv.float(), mask, ref_logps=refp.float(), beta=0.1, backend=backend,
                     importance_sampling_level=level)
    truth = ref.grpo_loss(logps, old, adv, mask, ref_logps=refp, beta=0.1, importance_sampling_level=level)
    assert ours.loss.dtype == torch.float32
    g32, = torch.autograd.grad(ours.loss, l32)
    g64, = torch.autograd.grad(truth.loss, logps)
    assert_close_to_truth(ours.loss, truth.loss, 1e-5, "fp32 loss")
    assert_close_to_truth(g32, g64, 1e-5, "fp32 grad")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_grpo_loss_on_policy_and_dapo_normalizer(backend):
    """old_logps=None: ratio 1, so d loss / d logp = -A * m / normalizer (the plain policy gradient)."""
    logps, _, _, adv, mask = _problem()
    m = mask.double()
    for num_items in (None, 40, torch.tensor(40.0, device=DEVICE)):
        out = grpo_loss(logps, None, adv, mask, num_items_in_batch=num_items, backend=backend)
        g, = torch.autograd.grad(out.loss, logps)
        den = m.sum() if num_items is None else 40.0
        assert_close_to_truth(out.loss, -(adv[:, None] * m).sum() / den, 1e-12, "on-policy loss")
        assert_close_to_truth(g, -adv[:, None] * m / den, 1e-12, "on-policy grad")
        assert float(out.clip_ratio) == 0.0 and float(out.kl) == 0.0


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_grpo_loss_ignores_garbage_under_the_mask(backend):
    logps, old, refp, adv, mask = _problem()
    pad = mask == 0
    dirty = [x.detach().masked_fill(pad, v) for x, v in ((logps, -1e4), (old, 1.0), (refp, float("inf")))]
    dirty[0].requires_grad_()
    for level in ("token", "sequence"):
        kw = dict(ref_logps=refp, beta=0.1, importance_sampling_level=level, backend=backend)
        clean = grpo_loss(logps, old, adv, mask, **kw)
        kw["ref_logps"] = dirty[2]
        messy = grpo_loss(dirty[0], dirty[1], adv, mask, **kw)
        assert_close_to_truth(messy.loss, clean.loss, 1e-12, "loss")
        g_clean, = torch.autograd.grad(clean.loss, logps)
        g_messy, = torch.autograd.grad(messy.loss, dirty[0])
        assert_close_to_truth(g_messy, g_clean, 1e-12, "grad")


def test_grpo_loss_reference_backend_and_all_masked():
    logps, old, refp, adv, mask = _problem()
    a = grpo_loss(logps, old, adv, mask, ref_logps=refp, beta=0.1, backend="reference")
    b = ref.grpo_loss(logps, old, adv, mask, ref_logps=refp, beta=0.1)
    assert torch.equal(a.loss, b.loss)
    for backend in FUSED_BACKENDS:
        out = grpo_loss(logps, old, adv, torch.zeros_like(mask), ref_logps=refp, beta=0.1, backend=backend,
                        loss_type="bnpo")
        g, = torch.autograd.grad(out.loss, logps)
        assert float(out.loss.detach()) == 0.0 and float(out.kl) == 0.0 and torch.equal(g, torch.zeros_like(g))


def test_grpo_loss_errors():
    logps, old, refp, adv, mask = _problem()
    with pytest.raises(ValueError, match=r"mask has shape \(5, 8\) but logps implies \(5, 9\)"):
        grpo_loss(logps, old, adv, mask[:, :8])
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        grpo_loss(logps, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="token, sequence"):
        grpo_loss(logps, old, adv, mask, importance_sampling_level="batch")
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_loss(logps, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo_loss(logps, old, adv[:, None], mask)
    with pytest.raises(ValueError, match="old_logps has shape"):
        grpo_loss(logps, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="logps must be 2-D"):
        grpo_loss(logps[0], old[0], adv, mask[0])
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_loss(logps, old, adv, mask, num_items_in_batch=0)

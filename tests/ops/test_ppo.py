"""GAE, PPO policy/value losses and TRL's masked statistics against the float64 reference."""

import pytest
import torch

from ptkernels.ops.ppo import gae, masked_mean, masked_var, masked_whiten, ppo_policy_loss, ppo_value_loss
from ptkernels.reference import rl as ref
from tests.helpers import DEVICE, FUSED_BACKENDS, assert_close_to_truth

B, T = 4, 9


def _mask():
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False  # right padding
    mask[2, :] = False  # empty
    mask[3, 2] = False  # a hole (not skipped by the recursion, as in TRL)
    return mask.to(DEVICE)


def _rand(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
def test_gae_matches_reference(backend, gamma, lam):
    rewards, values, mask = _rand(B, T, seed=1), _rand(B, T, seed=2), _mask()
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    adv_t, ret_t = ref.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert_close_to_truth(adv, adv_t, 1e-12, "advantages")
    assert_close_to_truth(ret, ret_t, 1e-12, "returns")
    assert torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))
    assert torch.equal(ret[~mask], torch.zeros_like(ret[~mask]))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_gae_right_padding_has_no_bootstrap_and_ignores_garbage(backend):
    """A right-padded sequence ends at its last valid token: the value after it counts as 0."""
    rewards, values = _rand(1, 6, seed=3), _rand(1, 6, seed=4)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], device=DEVICE)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8, backend=backend)
    short_adv, short_ret = ref.gae(rewards[:, :4], values[:, :4], torch.ones(1, 4, device=DEVICE), gamma=0.9,
                                   lam=0.8)
    assert_close_to_truth(adv[:, :4], short_adv, 1e-12, "advantages")
    assert_close_to_truth(ret[:, :4], short_ret, 1e-12, "returns")
    # last valid token: A = r - v (no bootstrap), returns = r
    assert_close_to_truth(adv[0, 3], rewards[0, 3] - values[0, 3], 1e-12, "last advantage")
    dirty_v = values.masked_fill(mask == 0, float("nan"))
    dirty_r = rewards.masked_fill(mask == 0, float("inf"))
    adv2, ret2 = gae(dirty_r, dirty_v, mask, gamma=0.9, lam=0.8, backend=backend)
    assert torch.equal(adv2, adv) and torch.equal(ret2, ret)


def test_gae_float32_and_errors():
    rewards, values, mask = _rand(B, T, seed=1), _rand(B, T, seed=2), _mask()
    adv, ret = gae(rewards.float(), values.float(), mask, gamma=0.99, lam=0.95)
    adv_t, ret_t = ref.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert adv.dtype == torch.float32
    assert_close_to_truth(adv, adv_t, 1e-5, "fp32 advantages")
    assert_close_to_truth(ret, ret_t, 1e-5, "fp32 returns")
    with pytest.raises(ValueError, match="values has shape"):
        gae(rewards, values[:, :3], mask)
    with pytest.raises(ValueError, match="mask has shape"):
        gae(rewards, values, mask[:2])
    with pytest.raises(ValueError, match="lam"):
        gae(rewards, values, mask, lam=1.5)


def test_ppo_policy_loss_matches_reference():
    mask = _mask()
    logps = _rand(B, T, scale=0.5, seed=1).sub(1.0).requires_grad_()
    old = logps.detach() + _rand(B, T, scale=0.3, seed=2)
    for adv in (_rand(B, T, seed=3), _rand(B, seed=4)):
        ours = ppo_policy_loss(logps, old, adv, mask, clip_range=0.2)
        adv_full = adv if adv.dim() == 2 else adv[:, None].expand(B, T)
        truth = ref.ppo_policy_loss(logps, old, adv_full, mask, clip_range=0.2)
        assert 0 < float(truth.clip_frac) < 1
        for f in ("loss", "clip_frac", "approx_kl"):
            assert_close_to_truth(getattr(ours, f), getattr(truth, f), 1e-12, f)
        g, = torch.autograd.grad(ours.loss, logps)
        gt, = torch.autograd.grad(truth.loss, logps)
        assert_close_to_truth(g, gt, 1e-12, "grad")
    with pytest.raises(ValueError, match="advantages has shape"):
        ppo_policy_loss(logps, old, adv[:2], mask)
    with pytest.raises(ValueError, match="old_logps has shape"):
        ppo_policy_loss(logps, old[:, :2], adv, mask)


def test_ppo_value_loss_matches_reference():
    mask = _mask()
    values = _rand(B, T, seed=1).requires_grad_()
    old_values = values.detach() + _rand(B, T, scale=0.3, seed=2)
    returns = _rand(B, T, seed=3)
    ours = ppo_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    truth = ref.ppo_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    assert 0 < float(truth.clip_frac) < 1
    for f in ("loss", "clip_frac"):
        assert_close_to_truth(getattr(ours, f), getattr(truth, f), 1e-12, f)
    g, = torch.autograd.grad(ours.loss, values)
    gt, = torch.autograd.grad(truth.loss, values)
    assert_close_to_truth(g, gt, 1e-12, "grad")
    v32 = values.detach().float().requires_grad_()
    out32 = ppo_value_loss(v32, old_values.float(), returns.float(), mask)
    assert out32.loss.dtype == torch.float32
    assert_close_to_truth(out32.loss, truth.loss, 1e-5, "fp32 loss")
    with pytest.raises(ValueError, match="returns has shape"):
        ppo_value_loss(values, old_values, returns[:1], mask)


def test_masked_statistics_match_reference():
    x = _rand(B, T, seed=5).requires_grad_()
    mask = _mask()
    assert_close_to_truth(masked_mean(x, mask), ref.masked_mean(x, mask), 1e-12, "mean")
    rows = mask.any(1)
    assert_close_to_truth(masked_mean(x, mask, axis=1)[rows], ref.masked_mean(x, mask, axis=1)[rows], 1e-12,
                          "mean axis=1")
    assert float(masked_mean(x, mask, axis=1)[2].detach()) == 0.0  # empty row: 0, not NaN
    assert float(masked_mean(x, torch.zeros_like(mask)).detach()) == 0.0
    assert_close_to_truth(masked_var(x, mask), ref.masked_var(x, mask), 1e-12, "var")
    assert_close_to_truth(masked_var(x, mask, unbiased=False), ref.masked_var(x, mask, unbiased=False), 1e-12,
                          "biased var")
    for shift in (True, False):
        ours = masked_whiten(x, mask, shift_mean=shift)
        truth = ref.masked_whiten(x, mask, shift_mean=shift)
        assert_close_to_truth(ours, truth, 1e-12, f"whiten shift_mean={shift}")
        go, = torch.autograd.grad(ours[mask].sum() + ours[0, 0] ** 2, x)
        gt, = torch.autograd.grad(truth[mask].sum() + truth[0, 0] ** 2, x)
        assert_close_to_truth(go, gt, 1e-10, "whiten grad")
    w = masked_whiten(x.detach(), mask)
    assert abs(float(w[mask].mean())) < 1e-12 and abs(float(w[mask].std()) - 1) < 1e-6  # unbiased variance
    one = torch.zeros_like(mask).cpu()  # the count check: on CUDA a device-side assert (test_gpu.py)
    one[0, 0] = True
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(x.cpu(), one)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x.cpu(), torch.zeros_like(one))

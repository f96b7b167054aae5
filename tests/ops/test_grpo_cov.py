"""Clip-Cov and KL-Cov (verl's ``compute_policy_loss_clip_cov`` / ``_kl_cov``; ``loss_type="clip_cov"`` /
``"kl_cov"`` of ``grpo_loss`` and ``fused_linear_grpo_loss``): values pinned from verl's formulas (verl is not
a dependency), every backend against the float64 reference with the same random choice (a seeded ``generator``),
gradients by finite differences, odd shapes, the fused op's chunking, and the option errors."""

import pytest
import torch

from ptkernels.ops.fused_grpo import fused_linear_grpo_loss
from ptkernels.ops.grpo import grpo_loss
from ptkernels.reference import grpo as ref
from tests.helpers import DEVICE, FUSED_BACKENDS, assert_close_to_truth

BACKENDS = ["reference", *FUSED_BACKENDS]


def t(x):
    return torch.tensor(x, dtype=torch.float64, device=DEVICE)


# verl HEAD's defaults (clip_cov_ratio 2e-4, lb 1, ub 5, clip_ratio 0.2; kl_cov_ratio 2e-4, ppo_kl_coef 0.1) on a
# 2 x 3 batch with one padded token: A = 4 on the first sequence, -3 on the second
PIN_LP = t([[-0.1, -2.0, -0.5], [-0.7, -0.2, 0.0]])
PIN_OLD = t([[-0.2, -1.8, -0.5], [-1.1, -0.4, 0.0]])
PIN_MASK = t([[1, 1, 1], [1, 1, 0]])
PIN_ADV = t([4.0, -3.0])
# verl's token-mean losses; clip_cov's one candidate in (1, 5) is token (0, 0) (cov 1.68; the others -3.64, 0.56,
# 5.9e-9, -2.1, and -inf under the mask), so its corr is [0, 1, 1, 1, 1, 1]; kl_cov's top covariance is token 0
PINNED = {"clip_cov": 0.17295187101847881, "kl_cov": -0.70918486344203924}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_cov_pinned_values(loss_type, backend):
    lp = PIN_LP.clone().requires_grad_()
    out = grpo_loss(lp, PIN_OLD, PIN_ADV, PIN_MASK, loss_type=loss_type, generator=_gen(), backend=backend)
    assert abs(out.loss.item() - PINNED[loss_type]) <= 1e-12
    assert out.cov_selected_fraction.item() == pytest.approx(0.2)  # one token of five
    (g,) = torch.autograd.grad(out.loss, lp)
    r0 = torch.exp(PIN_LP[0, 0] - PIN_OLD[0, 0])
    if loss_type == "clip_cov":
        assert g[0, 0].item() == 0.0  # corr = 0: the selected token's gradient is cut
    else:  # -A r + 0.1 |logp - old| on the selected token, over the 5 tokens
        assert g[0, 0].item() == pytest.approx(((-4.0 * r0 + 0.1) / 5).item(), abs=1e-14)
    assert g[1, 2].item() == 0.0


def test_cov_reference_selections_are_verls():
    a = PIN_ADV[:, None]
    corr = 1 - ref.clip_cov_selection(PIN_LP, PIN_OLD, a, PIN_MASK, epsilon_low=0.2, epsilon_high=0.2, ratio=2e-4,
                                      lb=1.0, ub=5.0, generator=_gen())
    assert corr.flatten().tolist() == [0, 1, 1, 1, 1, 1]
    top = ref.kl_cov_selection(PIN_LP, a, PIN_MASK, ratio=2e-4)
    assert top.flatten().nonzero().flatten().tolist() == [0]


B, T, D, V = 3, 7, 8, 13  # odd sizes


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    # |logp - old| >= 0.05 everywhere (KL-Cov's |.| is not differentiable at 0)
    step = (torch.rand(B, T, generator=g, dtype=torch.float64) * 0.3 + 0.05)
    old = lp + torch.where(torch.rand(B, T, generator=g) < 0.5, step, -step)
    refp = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    sampler = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    adv = torch.tensor([3.0, -2.5, 1.2], dtype=torch.float64)
    return [x.to(DEVICE) for x in (lp, old, refp, sampler, ent, mask, adv)]


WIDE = dict(clip_cov_ratio=0.3, clip_cov_lb=-10.0, clip_cov_ub=10.0, kl_cov_ratio=0.3)
CASES = [
    dict(),  # verl's defaults: one token
    dict(WIDE),
    dict(WIDE, beta=0.04, epsilon_high=0.28),
    dict(WIDE, entropy_coef=0.01, top_entropy_quantile=0.6),
    dict(WIDE, sampler=True, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.2),
    dict(WIDE, off_policy_mask_threshold=0.05, num_items_in_batch=11),
]


def _kwargs(case, refp, sampler, ent):
    kw = dict(case)
    if kw.pop("sampler", False):
        kw["sampler_logps"] = sampler
    if "beta" in kw:
        kw["ref_logps"] = refp
    if "top_entropy_quantile" in kw:
        kw["entropies"] = ent
    return kw


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cov_matches_reference(case, loss_type, backend):
    lp, old, refp, sampler, ent, mask, adv = _problem(case + 1)  # seed 0 has no candidate in verl's (1, 5)
    kw = _kwargs(CASES[case], refp, sampler, ent)
    outs = []
    for be in (backend, "reference"):
        x = lp.clone().requires_grad_()
        out = grpo_loss(x, old, adv, mask, loss_type=loss_type, generator=_gen(case), backend=be, **kw)
        outs.append((out, torch.autograd.grad(out.loss, x)[0]))
    (ours, g), (truth, tg) = outs
    what = f"{loss_type} {CASES[case]}"
    assert truth.cov_selected_fraction > 0, what
    for f in ("loss", "kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high", "cov_selected_fraction"):
        assert_close_to_truth(getattr(ours, f), getattr(truth, f), 1e-10, f"{what} {f}")
    assert_close_to_truth(g, tg, 1e-10, f"{what} grad")


@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_cov_gradient_by_finite_differences(loss_type):
    lp, old, refp, _, _, mask, adv = _problem(1)

    def f(x):  # the same random choice at every evaluation (x's selection does not move within eps)
        return grpo_loss(x, old, adv, mask, loss_type=loss_type, generator=_gen(1), ref_logps=refp, beta=0.04,
                         backend="torch", **WIDE).loss

    x = lp.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(x), x)
    fd = torch.zeros_like(lp)
    eps = 1e-6
    with torch.no_grad():
        for i in range(lp.numel()):
            e = torch.zeros_like(lp).view(-1)
            e[i] = eps
            fd.view(-1)[i] = (f(lp + e.view_as(lp)) - f(lp - e.view_as(lp))) / (2 * eps)
    assert_close_to_truth(g, fd, 1e-7, f"{loss_type} autograd vs central differences")


def test_clip_cov_cuts_the_chosen_tokens_and_leaves_the_rest_to_the_ppo_clip():
    """The gradient is the dapo (PPO-clip, token mean) gradient on every token but the chosen ones, which get 0;
    exactly max(int(ratio * sum m), 1) tokens are chosen, by the generator (same seed, same tokens)."""
    lp, old, _, _, _, mask, adv = _problem(2)
    opts = dict(clip_cov_ratio=0.2, clip_cov_lb=-10.0, clip_cov_ub=10.0)
    x = lp.clone().requires_grad_()
    (g_dapo,) = torch.autograd.grad(grpo_loss(x, old, adv, mask, loss_type="dapo", backend="torch").loss, x)
    chosen = []
    for seed in range(4):
        out = grpo_loss(x, old, adv, mask, loss_type="clip_cov", generator=_gen(seed), backend="torch", **opts)
        (g,) = torch.autograd.grad(out.loss, x)
        cut = (g == 0) & (g_dapo != 0)
        assert int(cut.sum()) == int(0.2 * mask.sum().item())  # 2 of the 13 unclipped tokens of 14
        assert torch.equal(g[~cut], g_dapo[~cut])
        assert out.cov_selected_fraction.item() == pytest.approx(int(cut.sum()) / mask.sum().item())
        again = grpo_loss(x, old, adv, mask, loss_type="clip_cov", generator=_gen(seed), backend="torch", **opts)
        assert torch.equal(torch.autograd.grad(again.loss, x)[0], g)
        chosen.append(tuple(cut.flatten().nonzero().flatten().tolist()))
    assert len(set(chosen)) > 1, "the random choice never changed with the seed"


def test_kl_cov_penalizes_the_top_covariance_tokens():
    lp, old, _, _, _, mask, adv = _problem(3)
    x = lp.clone().requires_grad_()
    n = int(mask.sum())
    r = torch.exp(lp - old)
    plain = (-adv[:, None] * r * mask).sum() / n
    out = grpo_loss(x, old, adv, mask, loss_type="kl_cov", kl_cov_ratio=0.0, backend="torch")
    assert_close_to_truth(out.loss, plain, 1e-12, "kl_cov_ratio=0: the unclipped -A r")
    assert out.cov_selected_fraction.item() == 0.0
    out = grpo_loss(x, old, adv, mask, loss_type="kl_cov", kl_cov_ratio=0.2, kl_cov_coef=0.5, backend="torch")
    valid = mask != 0
    a = adv[:, None].expand_as(lp)
    cov = (a - a[valid].mean()) * (lp - lp[valid].mean())
    top = torch.topk(cov[valid], int(n * 0.2)).indices
    sel = torch.zeros(n, dtype=lp.dtype, device=lp.device)
    sel[top] = 1.0
    expected = plain + 0.5 * (sel * (lp - old)[valid].abs()).sum() / n
    assert_close_to_truth(out.loss, expected, 1e-12, "kl_cov top-k")


FUSED_CASES = [
    dict(),
    dict(WIDE, beta=0.05),
    dict(WIDE, top_entropy_quantile=0.5, entropy_coef=0.02),
    dict(WIDE, off_policy_mask_threshold=0.1),  # a sequence-wide weight: chunks of whole sequences
]  # odd cases run sync-free (fixed chunks of all B*T rows, masked rows included)


def _fused_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    adv = torch.tensor([1.0, -0.7, 0.4], dtype=torch.float64)
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids[..., None])[..., 0]
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    refp = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    return [x.to(DEVICE) for x in (hidden, weight, ids, mask, adv, old, refp)]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("case", range(len(FUSED_CASES)))
def test_fused_cov_matches_reference(case, loss_type, backend):
    hidden, weight, ids, mask, adv, old, refp = _fused_problem(case)
    kw = dict(FUSED_CASES[case])
    if "beta" in kw:
        kw["ref_logps"] = refp
    res = []
    for be in (backend, "reference"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fused_linear_grpo_loss(h, w, ids, mask, adv, old_logps=old, loss_type=loss_type, generator=_gen(case),
                                     chunk_size=4, sync_free=case % 2 == 1, return_entropy=True, backend=be, **kw)
        res.append((out, torch.autograd.grad(out.loss, (h, w))))
    (ours, (gh, gw)), (truth, (th, tw)) = res
    what = f"{loss_type} {FUSED_CASES[case]}"
    assert truth.cov_selected_fraction > 0, what
    for f in ("loss", "kl", "clip_ratio", "entropy", "cov_selected_fraction"):
        assert_close_to_truth(getattr(ours, f), getattr(truth, f), 1e-10, f"{what} {f}")
    assert_close_to_truth(gh, th, 1e-10, f"{what} d hidden")
    assert_close_to_truth(gw, tw, 1e-10, f"{what} d weight")


def test_cov_fp32_within_the_rule():
    lp = PIN_LP.float().requires_grad_()
    for loss_type, value in PINNED.items():
        out = grpo_loss(lp, PIN_OLD.float(), PIN_ADV.float(), PIN_MASK, loss_type=loss_type, backend="torch")
        assert out.loss.dtype == torch.float32
        assert abs(out.loss.item() - value) <= 1e-6 * abs(value)


def test_cov_option_errors():
    lp, old, _, _, _, mask, adv = _problem()
    bad = [
        (dict(loss_type="clip_cov", clip_cov_ratio=1.5), "clip_cov_ratio must be in"),
        (dict(loss_type="kl_cov", kl_cov_ratio=-0.1), "kl_cov_ratio must be in"),
        (dict(loss_type="clip_cov", clip_cov_lb=5.0, clip_cov_ub=1.0), "clip_cov_lb"),
        (dict(loss_type="kl_cov", kl_cov_coef=-1.0), "kl_cov_coef must be"),
        (dict(loss_type="clip_cov", importance_sampling_level="sequence"), "importance_sampling_level must be"),
        (dict(loss_type="kl_cov", delta=2.0), "delta"),
        (dict(loss_type="clip_cov", delta=2.0), "delta"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            grpo_loss(lp, old, adv, mask, **kw)
    with pytest.raises(TypeError, match="generator must be"):
        grpo_loss(lp, old, adv, mask, loss_type="clip_cov", generator=0)
    hidden, weight, ids, fmask, fadv, fold, _ = _fused_problem()
    with pytest.raises(ValueError, match="clip_cov_ratio must be in"):
        fused_linear_grpo_loss(hidden, weight, ids, fmask, fadv, loss_type="clip_cov", clip_cov_ratio=2.0)

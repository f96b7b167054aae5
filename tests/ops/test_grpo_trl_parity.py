"""GRPO family against TRL 1.16.0 (and verl) on a fixed small case: values written from the formulas of
``trl/trainer/grpo_trainer.py: GRPOTrainer._compute_loss`` / ``_generate_and_score_completions`` (TRL 1.16.0),
``experimental/gmpo`` and verl's ``core_algos.py`` (they are in each reference docstring), every backend, with
gradients against the float64 reference. TRL itself is not a dependency: the numbers are pinned."""

import pytest
import torch

import ptkernels as ptk
from ptkernels.ops.grpo import grpo_loss
from ptkernels.reference import rl as ref
from tests.helpers import DEVICE, FUSED_BACKENDS, assert_close_to_truth

BACKENDS = ["reference", *FUSED_BACKENDS]
NAN = float("nan")


def t(x):
    return torch.tensor(x, dtype=torch.float64, device=DEVICE)


MASK = t([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
LP = t([[-1.0, -0.5, -2.0, -0.3], [-0.2, -1.5, -0.3, -9.0], [-0.9, -0.4, -9.0, -9.0]])
OLD = t([[-1.1, -0.3, -2.5, -0.3], [-0.25, -1.2, -0.7, -9.0], [-0.6, -0.45, -9.0, -9.0]])
REF = t([[-1.05, -0.6, -2.2, -0.35], [-0.3, -1.4, -0.8, -9.0], [-0.8, -0.5, -9.0, -9.0]])
SAMPLER = OLD - t([[0.5, 0.3, 0.4, 0.1], [-0.1, 0.05, 0.2, 0.0], [0.0, -0.2, 0.0, 0.0]])
ADV = t([1.0, -0.5, 0.8])
ENT = t([[1.2, 0.4, 2.0, 0.1], [0.8, 1.5, 0.3, 0.0], [0.6, 0.9, 0.0, 0.0]])
BASE = dict(ref_logps=REF, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=4)
IS = dict(sampler_logps=SAMPLER)

# (loss_type, options, TRL 1.16 loss): eps 0.2 / eps_high 0.28, beta 0.04, use_bias_correction_kl=True (1.16 default)
PINNED = [
    ("grpo", {}, -0.40261266719658267),
    ("bnpo", {}, -0.43971752376333773),
    ("dr_grpo", {}, -0.32978814282250329),
    ("dapo", {}, -0.43971752376333773),
    ("sapo", {}, -0.88474206897410879),
    ("sapo", dict(beta=0.0), -0.88567223920262206),
    ("cispo", dict(epsilon_high=1.2), 0.47246210034644981),
    ("cispo", dict(epsilon_high=5.0), 0.56731419331912381),
    ("luspo", dict(importance_sampling_level="sequence"), -1.4164558811680366),
    ("luspo", dict(importance_sampling_level="sequence", beta=0.0), -1.4185906906246357),
    ("luspo", dict(beta=0.0), -1.3220084092637254),
    ("luspo", {}, -1.3191525712900132),
    ("vespo", {}, 0.22584850741786625),
    ("grpo", dict(importance_sampling_level="sequence"), -0.42781169378232509),
    ("dapo", dict(delta=1.3), -0.45037445141007498),
    ("dapo", dict(beta=0.0), -0.44066946975457516),
    ("grpo", dict(bias_corrected_kl=False), -0.40287140735808197),
    ("dr_grpo", dict(bias_corrected_kl=False), -0.32999352114242725),
    ("grpo", dict(importance_sampling_level="sequence", bias_corrected_kl=False), -0.42783953391808982),
    ("vespo", dict(bias_corrected_kl=False), 0.22557466965796769),
    # the DAPO normalizer with TRL 1.16's GA / steps_per_generation factor: N = 18 * GA / spg
    ("dapo", dict(num_items_in_batch=18 * 1 / 2), -0.43971752376333773),  # GA=1, spg=2
    ("dapo", dict(num_items_in_batch=18 * 2 / 2), -0.21985876188166886),  # GA=2, spg=2
    # parity item 7: loss -= coef * token-mean entropy, for every loss type
    ("grpo", dict(entropies=ENT, entropy_coef=0.01), -0.41127933386324933),
    ("bnpo", dict(entropies=ENT, entropy_coef=0.01), -0.44838419043000438),
    ("dr_grpo", dict(entropies=ENT, entropy_coef=0.01), -0.33845480948916995),
    ("dapo", dict(entropies=ENT, entropy_coef=0.01), -0.44838419043000438),
    ("dapo", dict(entropies=ENT, top_entropy_quantile=0.5), -0.2546649703408132),
    ("dapo", dict(entropies=ENT, top_entropy_quantile=0.5, entropy_coef=0.01), -0.26746497034081318),
    ("grpo", dict(entropies=ENT, top_entropy_quantile=0.5, entropy_coef=0.01), -0.24795515821814801),
    # sampler (vLLM) importance-sampling correction, clip_max 3.0 (TRL's default)
    ("dapo", dict(IS, vllm_importance_sampling_mode="token_truncate"), -0.60082968247676605),
    ("dapo", dict(IS, vllm_importance_sampling_mode="token_mask"), -0.60082968247676605),
    ("dapo", dict(IS, vllm_importance_sampling_mode="sequence_truncate"), -1.314985202593868),
    ("dapo", dict(IS, vllm_importance_sampling_mode="sequence_mask"), 0.086315354457342092),
    ("dapo", dict(IS, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.4),
     -0.55722800158060726),
    ("dapo", dict(IS, vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_max=1.4),
     -0.18620141432439541),
    ("vespo", dict(IS, vllm_importance_sampling_mode="token_truncate"), 0.0045539839079709217),
    # GMPO (TRL 1.16 experimental GMPOTrainer: log-space clip, no bias-corrected KL)
    ("gmpo", dict(epsilon_low=0.4, epsilon_high=0.4, beta=0.0), -0.41941537492143194),
    ("gmpo", dict(epsilon_low=0.1, epsilon_high=0.1), -0.38070361301252564),
]


def _run(backend, loss_type, options):
    logps = LP.clone().requires_grad_()
    kw = {**BASE, **options}
    leaves = [logps]
    if "entropies" in kw:
        kw["entropies"] = kw["entropies"].clone().requires_grad_()
        leaves.append(kw["entropies"])
    out = grpo_loss(logps, OLD, ADV, MASK, loss_type=loss_type, backend=backend, **kw)
    grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(PINNED)))
def test_grpo_loss_pinned_trl_1_16(case, backend):
    loss_type, options, value = PINNED[case]
    ours, grads = _run(backend, loss_type, options)
    assert abs(ours.loss.item() - value) <= 1e-12 * max(1.0, abs(value)), (loss_type, options, ours.loss.item())
    if backend != "reference":
        truth, tgrads = _run("reference", loss_type, options)
        for a, b in zip(grads, tgrads):
            if b is not None:
                assert_close_to_truth(a, b, 1e-12, f"{loss_type} grad")
        for f in ("kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high", "entropy", "sampler_abs_logp_diff",
                  "is_masked_fraction", "is_weight_mean", "is_weight_max"):
            if getattr(truth, f) is not None:
                assert_close_to_truth(getattr(ours, f), getattr(truth, f), 1e-12, f"{loss_type} {f}")


def test_entropy_bonus_is_token_mean_for_every_loss_type():
    """Parity item 7: the bonus shifts every loss type of TRL's GRPOTrainer by exactly -coef * token-mean entropy
    (0.8666...); gmpo (TRL's GMPOTrainer has no bonus) refuses it (test_gmpo_refuses_what_trl_gmpo_lacks)."""
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"):
        a = grpo_loss(LP, OLD, ADV, MASK, loss_type=lt, entropies=ENT, entropy_coef=0.01, **BASE).loss
        b = grpo_loss(LP, OLD, ADV, MASK, loss_type=lt, **BASE).loss
        assert abs((a - b).item() - (-0.0086666666666666559)) < 1e-14, lt


def gmpo_by_formula(lp, old, adv, mask, *, eps_low, eps_high, beta=0.0, ref_logps=None, emask=None):
    """TRL 1.16's ``GMPOTrainer._compute_loss`` (trl/experimental/gmpo/gmpo_trainer.py), written out: no entropy
    bonus, no off-policy mask, no sampler correction."""
    log_ratio = lp - old
    clamped = torch.clamp(log_ratio, min=-eps_low, max=eps_high)
    a = adv.unsqueeze(1)
    clipped = torch.where(a > 0, torch.minimum(log_ratio, clamped), torch.maximum(log_ratio, clamped))
    seq_mask = mask if emask is None else mask * emask
    coef = torch.exp((clipped * seq_mask).sum(-1) / seq_mask.sum(-1).clamp(min=1.0))
    per_seq = -coef * adv
    if beta != 0.0:
        kl = torch.exp(ref_logps - lp) - (ref_logps - lp) - 1
        per_seq = per_seq + beta * (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_seq.mean()


GMPO_CASES = [
    dict(),
    dict(beta=0.04, ref_logps=REF),
    dict(top_entropy_quantile=0.5, entropies=ENT),  # emask = [1,0,1,0 / 1,1,0,0 / 0,1,0,0] (quantile 0.5)
    dict(old_logps=None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(GMPO_CASES)))
def test_gmpo_equals_trl_formula(case, backend):
    """Without the options TRL's GMPO lacks, loss_type="gmpo" is TRL 1.16's GMPOTrainer loss (epsilon 0.4, the
    GMPOConfig default); the top-entropy mask (which GMPOTrainer does apply) and the KL term included."""
    kw = dict(GMPO_CASES[case])
    old = kw.pop("old_logps", OLD)
    emask = None
    if "top_entropy_quantile" in kw:
        emask = t([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0]])
        assert torch.equal(ref.top_entropy_mask(ENT, MASK, 0.5).to(MASK.dtype), emask)
    want = gmpo_by_formula(LP, LP if old is None else old, ADV, MASK, eps_low=0.4, eps_high=0.4,
                           beta=kw.get("beta", 0.0), ref_logps=kw.get("ref_logps"), emask=emask)
    out = grpo_loss(LP, old, ADV, MASK, loss_type="gmpo", epsilon_low=0.4, backend=backend, **kw)
    assert abs(out.loss.item() - want.item()) < 1e-14, (kw, out.loss.item(), want.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmpo_refuses_what_trl_gmpo_lacks(backend):
    """TRL 1.16's GMPOTrainer reads no entropy_coef, off_policy_mask_threshold or sampler log-probs: ptkernels
    refuses them for gmpo (ValueError naming the argument) instead of computing a loss TRL does not have."""
    kw = dict(loss_type="gmpo", backend=backend, **BASE)
    with pytest.raises(ValueError, match=r"loss_type='gmpo' has no entropy bonus .*entropy_coef must be 0"):
        grpo_loss(LP, OLD, ADV, MASK, entropies=ENT, entropy_coef=0.01, **kw)
    with pytest.raises(ValueError, match=r"loss_type='gmpo' has no off-policy .*off_policy_mask_threshold must be"):
        grpo_loss(LP, OLD, ADV, MASK, off_policy_mask_threshold=0.0, **kw)
    with pytest.raises(ValueError, match="loss_type='gmpo' takes no sampler_logps"):
        grpo_loss(LP, OLD, ADV, MASK, sampler_logps=SAMPLER, **kw)
    # what TRL's GMPO has stays accepted: entropies (logged), the top-entropy mask, entropy_coef=0 explicitly
    out = grpo_loss(LP, OLD, ADV, MASK, entropies=ENT, entropy_coef=0.0, top_entropy_quantile=0.5, **kw)
    assert torch.isfinite(out.loss) and out.entropy is not None


def trl_sampling_logp_difference(old, sampler, mask):
    """TRL 1.16's ``sampling/sampling_logp_difference/mean`` (grpo_trainer.py, _generate_and_score_completions):
    ``delta = |old - sampler|; delta = delta[mask & ~isnan(delta)]; mean, or 0 when empty``."""
    delta = torch.abs(old - sampler)
    delta = delta[mask.bool() & ~torch.isnan(delta)]
    return torch.mean(delta) if delta.numel() > 0 else torch.tensor(0.0, dtype=old.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_sampler_abs_logp_diff_leaves_nan_tokens_out(mode, backend):
    """A token the sampler could not score (NaN log-prob) leaves both the sum and the count of the mean |diff|
    (TRL 1.16): |OLD - SAMPLER| over the 9 valid tokens sums to 1.85; without token [0, 0] (0.5) it is 1.35 over 8
    tokens, 0.16875 (not 1.35 / 9). A NaN on padding changes nothing; all NaN gives 0, as TRL. The IS weights keep
    TRL's treatment (the NaN token's diff is 0: ratio 1, counted in the mean)."""
    s = SAMPLER.clone()
    s[0, 0], s[1, 3] = NAN, NAN  # a valid token and a padding one
    opts = dict(sampler_logps=s, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=3.0)
    out = grpo_loss(LP, OLD, ADV, MASK, backend=backend, **opts, **BASE)
    assert abs(out.sampler_abs_logp_diff.item() - 1.35 / 8) < 1e-15
    assert abs(trl_sampling_logp_difference(OLD, s, MASK).item() - 1.35 / 8) < 1e-15
    ppo = ptk.ppo_policy_loss(LP, OLD, ADV, MASK, backend=backend, **opts)
    assert abs(ppo.sampler_abs_logp_diff.item() - 1.35 / 8) < 1e-15
    # TRL's importance weights: diff = nan_to_num((old - sampler) m, 0), mean/max over valid tokens (sequences)
    diff = torch.nan_to_num((OLD - s) * MASK, nan=0.0)
    r = torch.exp(diff.sum(-1)) if mode.startswith("sequence") else torch.exp(diff)[MASK.bool()]
    r = r.masked_fill(r > 3.0, 0.0) if mode.endswith("mask") else r.clamp(max=3.0)
    for o in (out, ppo):
        assert abs(o.is_weight_mean.item() - r.mean().item()) < 1e-14
        assert abs(o.is_weight_max.item() - r.max().item()) < 1e-14
    all_nan = grpo_loss(LP, OLD, ADV, MASK, backend=backend, **{**opts, "sampler_logps": torch.full_like(s, NAN)})
    assert all_nan.sampler_abs_logp_diff.item() == 0.0 == trl_sampling_logp_difference(OLD, s * NAN, MASK).item()


def test_sampler_abs_logp_diff_testers_case():
    """The reported case: one NaN among 13 valid tokens; TRL 1.16 logs 0.18518778 (ptkernels used to divide by 13)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    old = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 2
    logps = old + 0.1 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    sampler = old + 0.3 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    sampler[1, 2] = NAN
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    want = trl_sampling_logp_difference(old, sampler, mask)
    assert abs(want.item() - 0.18518778) < 5e-9
    for backend in BACKENDS:
        out = grpo_loss(*(x.to(DEVICE) for x in (logps, old, adv, mask)), sampler_logps=sampler.to(DEVICE),
                        vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0,
                        backend=backend)
        assert abs(out.sampler_abs_logp_diff.item() - want.item()) < 1e-15, backend


def test_sampler_metrics_and_ratios():
    r, m = ref.sampler_importance_weights(OLD, SAMPLER, MASK, mode="sequence_mask")
    assert torch.allclose(r.squeeze(1), t([0, 1.1618342427282831, 0.81873075307798182]), rtol=0, atol=1e-15)
    r, _ = ref.sampler_importance_weights(OLD, SAMPLER, MASK, mode="token_truncate", clip_min=0.9, clip_max=1.2)
    assert torch.allclose(r.reshape(-1), t([1.2, 1.2, 1.2, 1.1051709180756477, 0.90483741803595952, 1.0512710963760241,
                                            1.2, 1, 1, 0.9, 1, 1]), rtol=0, atol=1e-15)
    nan_sampler = SAMPLER.clone()
    nan_sampler[0, 0] = NAN  # a token vLLM could not score: ratio 1 / a 0 in the sequence sum (TRL 1.16)
    r, _ = ref.sampler_importance_weights(OLD, nan_sampler, MASK, mode="sequence_mask")
    assert abs(r[0, 0].item() - 2.2255409284924679) < 1e-14
    out = grpo_loss(LP, OLD, ADV, MASK, sampler_logps=SAMPLER, vllm_importance_sampling_mode="token_mask",
                    vllm_importance_sampling_clip_max=1.4, backend="torch")
    assert out.is_masked_fraction.item() == pytest.approx(2 / 9)  # two of nine tokens above 1.4
    assert out.sampler_abs_logp_diff.item() == pytest.approx(((OLD - SAMPLER).abs() * MASK).sum().item() / 9)
    assert out.is_weight_max.item() == pytest.approx(1.3498588075760032)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampler_correction_off_is_identical(backend):
    """sampler_logps=None gives the plain loss; equal sampler and old log-probs give ratio 1 (same loss)."""
    plain = grpo_loss(LP, OLD, ADV, MASK, backend=backend, **BASE)
    same = grpo_loss(LP, OLD, ADV, MASK, sampler_logps=OLD, vllm_importance_sampling_mode="token_truncate",
                     backend=backend, **BASE)
    assert plain.sampler_abs_logp_diff is None and plain.is_weight_mean is None
    assert abs(plain.loss.item() - same.loss.item()) < 1e-15
    assert same.is_weight_mean.item() == 1.0 and same.is_masked_fraction.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_policy_sequence_mask(backend):
    """OPSM without a sampler uses old_logps: keep = (A >= 0) | (mean_t (old - logp) <= thr); row 1 (A < 0, mean
    -0.05) is dropped at thr -0.1 and kept at thr 0."""
    drop = grpo_loss(LP, OLD, ADV, MASK, off_policy_mask_threshold=-0.1, backend=backend, **BASE)
    keep = grpo_loss(LP, OLD, ADV, MASK, off_policy_mask_threshold=0.0, backend=backend, **BASE)
    plain = grpo_loss(LP, OLD, ADV, MASK, backend=backend, **BASE)
    assert abs(keep.loss.item() - plain.loss.item()) < 1e-15
    row = ref.grpo_loss(LP[1:2], OLD[1:2], ADV[1:2], MASK[1:2], epsilon_low=0.2, epsilon_high=0.28)
    assert abs((plain.loss - drop.loss).item() - row.loss.item() * 3 / 9) < 1e-14  # row 1's policy term, dapo /9


def test_top_entropy_mask_matches_torch_quantile():
    from ptkernels.ops.grpo import top_entropy_mask

    got = top_entropy_mask(ENT, MASK, 0.5)
    assert got.reshape(-1).tolist() == [1, 0, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0]
    g = torch.Generator().manual_seed(3)
    ent = torch.rand(4, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 7, generator=g) > 0.3).double()
    for q in (0.1, 0.33, 0.8):
        assert torch.equal(top_entropy_mask(ent, mask, q).bool(), ref.top_entropy_mask(ent, mask, q))
    assert not top_entropy_mask(ent, torch.zeros_like(mask), 0.5).any()


# ------------------------------------------------------------------------------------------ advantages

R8 = t([1.0, NAN, 0.0, 2.0, 0.5, 0.5, NAN, 1.5, NAN, 3.0, NAN, NAN])
P8 = {
    "group": [0, 0, -0.99990000999900008, 0.99990000999900008, -0.57725028650713439, -0.57725028650713439, 0,
              1.1545005730142686, 0, 0, 0, 0],
    "batch": [0, 0, -0.96599845876194823, 0.96599845876194823, -0.32199948625398278, -0.32199948625398278, 0,
              0.64399897250796545, 0, 0, 0, 0],
    "none": [0, 0, -1, 1, -0.33333333333333337, -0.33333333333333337, 0, 0.66666666666666663, 0, 0, 0, 0],
}
RPF = t([[1.0, 0.0], [NAN, NAN], [0.0, 1.0], [2.0, NAN], [0.5, 0.2], [0.5, 0.8], [1.0, 1.0], [1.5, 0.0]])
W = t([1.0, 0.5])
MULTI = {
    "group": [-0.21818932254780946, 0, -0.87275729019123749, 1.0909466127390468, -1.1664074650077763,
              -0.49988891357476117, 0.83314818929126866, 0.83314818929126866],
    "batch": [-0.30618464884893498, 0, -1.2247385953957395, 1.5309232442446741, -0.96448164387414481,
              -0.41334927594606202, 0.68891545991010339, 0.68891545991010339],
    "none": [-0.16666666666666674, 0, -0.66666666666666674, 0.83333333333333326, -0.52500000000000002,
             -0.22499999999999998, 0.375, 0.375],
}
NORMALIZE_THEN_SUM = [-0.42273990038053455, 0, -0.77299862267611807, 1.1957385230566526, -1.3132706807897425,
                      -0.55988759849724568, 0.9400122817915787, 0.9331459974954095]
ADV_BACKENDS = ["reference", "torch"] + [b for b in ("native",) if b in FUSED_BACKENDS]


@pytest.mark.parametrize("backend", ADV_BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_nan_rewards(scale, backend):
    """Parity item 8: unscorable (NaN) rewards leave the group statistics and get advantage 0."""
    got = ptk.group_advantages(R8, group_size=4, scale=scale, backend=backend)
    assert torch.allclose(got, t(P8[scale]), rtol=0, atol=1e-15)
    got = ptk.group_advantages(RPF, group_size=4, scale=scale, reward_weights=W, backend=backend)
    assert torch.allclose(got, t(MULTI[scale]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", ADV_BACKENDS)
def test_group_advantages_normalize_then_sum(backend):
    got = ptk.group_advantages(RPF, group_size=4, reward_weights=W, multi_objective_aggregation="normalize_then_sum",
                               backend=backend)
    assert torch.allclose(got, t(NORMALIZE_THEN_SUM), rtol=0, atol=1e-15)
    one = ptk.group_advantages(RPF[:, :1], group_size=4, backend=backend)  # one function: the 1-D result
    assert torch.allclose(one, ptk.group_advantages(RPF[:, 0], group_size=4, backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_rloo_reinforce_pp_remax_pinned(backend):
    r = t([1.0, NAN, 0.0, 2.0, 0.5, 0.5, 1.0, 1.5])
    kl = t([0.2, 0.0, -0.1, 0.3, 0.0, 0.1, 0.05, -0.2])
    got = ptk.rloo_advantages(r, group_size=4, kl=kl, beta=0.05, backend=backend)
    want = [-0.0050000000000000044, 0, -1.4825000000000002, 1.4875000000000003, -0.50083333333333346,
            -0.50750000000000017, 0.16249999999999998, 0.84583333333333321]
    assert torch.allclose(got, t(want), rtol=0, atol=1e-14)
    got = ptk.rloo_advantages(r, group_size=4, kl=kl, beta=0.05, normalize_advantages=True, backend=backend)
    want = [-0.0051471302409237599, 0, -1.526124116433913, 1.5312712466748368, -0.51557087913253608,
            -0.52243371945376782, 0.1672817328300242, 0.87072286575627966]
    assert torch.allclose(got, t(want), rtol=0, atol=1e-14)
    m = t([[1, 1, 1], [1, 1, 0]])
    scores = t([[0, 0, 1.0], [0, 0.0, 0]])
    kl_tok = t([[-0.1, -2.0, -0.5], [-0.7, -0.2, 0.0]]) - t([[-0.3, -1.8, -0.6], [-0.9, -0.1, 0.0]])
    adv, ret = ptk.reinforce_plus_plus_advantages(scores, m, kl=kl_tok, kl_coef=0.001, backend=backend)
    assert torch.allclose(ret.reshape(-1), t([0.9999, 1.0001, 0.9999, -0.0001, 0.0001, 0]), rtol=0, atol=1e-15)
    assert torch.allclose(adv.reshape(-1), t([0.73017499971086941, 0.73054016024173551, 0.73017499971086941,
                                              -1.0956276546199446, -1.0952624940890785, 0]), rtol=0, atol=1e-13)
    adv, _ = ptk.remax_advantages(scores, m, t([0.5, 0.5]), backend=backend)
    assert torch.allclose(adv.reshape(-1), t([0.5, 0.5, 0.5, -0.5, -0.5, 0]), rtol=0, atol=0)


def test_estimator_errors():
    with pytest.raises(ValueError, match="beta != 0 needs kl"):
        ptk.rloo_advantages(t([1.0, 2.0]), group_size=2, beta=0.1)
    with pytest.raises(ValueError, match="baseline has shape"):
        ptk.remax_advantages(t([[1.0, 0.0]]), t([[1.0, 1.0]]), t([0.5, 0.5]))
    with pytest.raises(ValueError, match="token_rewards must be 2-D"):
        ptk.reinforce_plus_plus_advantages(t([1.0]), t([1.0]))


# ------------------------------------------------------------------------------------------ PPO


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_ppo_policy_loss_sampler_correction(mode):
    adv = t([[0.5, -1.0, 0.3, 0.2], [1.0, 0.4, -0.2, 0.0], [-0.3, 0.6, 0.0, 0.0]])
    opts = dict(sampler_logps=SAMPLER, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=1.4)
    lp = LP.clone().requires_grad_()
    ours = ptk.ppo_policy_loss(lp, OLD, adv, MASK, **opts)
    lp64 = LP.clone().requires_grad_()
    truth = ptk.ppo_policy_loss(lp64, OLD, adv, MASK, backend="reference", **opts)
    ratio, _ = ref.sampler_importance_weights(OLD, SAMPLER, MASK, mode=mode, clip_max=1.4)
    r = torch.exp(LP - OLD)
    by_hand = ((torch.max(-adv * r, -adv * r.clamp(0.8, 1.2)) * ratio * MASK).sum() / MASK.sum())
    assert abs(truth.loss.item() - by_hand.item()) < 1e-15
    assert_close_to_truth(ours.loss, truth.loss, 1e-12, "ppo loss")
    assert_close_to_truth(torch.autograd.grad(ours.loss, lp)[0], torch.autograd.grad(truth.loss, lp64)[0], 1e-12,
                          "ppo grad")
    for f in ("sampler_abs_logp_diff", "is_masked_fraction", "is_weight_mean", "is_weight_max"):
        assert_close_to_truth(getattr(ours, f), getattr(truth, f), 1e-12, f)
    plain = ptk.ppo_policy_loss(LP, OLD, adv, MASK)
    assert plain.is_weight_mean is None
    assert ptk.ppo_policy_loss(LP, OLD, adv, MASK, sampler_logps=OLD).loss.item() == plain.loss.item()

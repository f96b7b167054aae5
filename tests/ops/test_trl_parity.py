"""TRL 1.16.0 / Liger-Kernel 0.8.5 parity of the preference and distillation losses, on fixed small cases.

Every expected number below was written from the TRL 1.16.0 formula named beside it (``trl/trainer/dpo_trainer.py:
DPOTrainer._compute_loss``, ``trl/experimental/{orpo,cpo,gkd}``, ``trl/trainer/kto_trainer.py``), evaluated in float64;
TRL is not a dependency. Fused cases build their per-token log-probs exactly: with a two-word vocabulary, the
identity head and the hidden state ``[a, 0]``, the label 0 has ``log p = -softplus(-a)``, so ``a = -log(expm1(-lp))``.
"""

import math

import pytest
import torch

import ptkernels as ptk
from tests.helpers import DEVICE, FUSED_BACKENDS

F64 = torch.float64
BETA = 0.1


def t(x):
    return torch.tensor(x, dtype=F64, device=DEVICE)


# The common DPO case of the spec: 3 pairs, summed completion log-probs, lengths of the scored completions.
PC, PR = t([-10.0, -12.5, -8.0]), t([-11.0, -12.0, -9.5])
RC, RR = t([-10.5, -12.2, -8.4]), t([-10.8, -12.1, -9.7])
LC, LR = t([4.0, 5.0, 10.0]), t([3.0, 6.0, 2.0])


def dpo(**kw):
    return ptk.dpo_loss(PC, PR, RC, RR, beta=BETA, chosen_lengths=LC, rejected_lengths=LR, **kw)


def close(a, b, rtol=1e-12):
    a = torch.as_tensor(a, dtype=F64).detach().cpu()
    b = torch.as_tensor(b, dtype=F64).cpu()
    assert torch.allclose(a, b, rtol=rtol, atol=1e-15), f"{a.tolist()} != {b.tolist()}"


# ------------------------------------------------------------------ every TRL 1.16 DPO loss type, common case

TRL_DPO_VALUES = {  # beta = 0.1; exo_pair, robust, aot, aot_unpaired with label_smoothing = 0.1
    "sigmoid": 0.68510130083445508, "hinge": 0.98333333333333339, "ipo": 24.832071296296295,
    "exo_pair": 0.50196225899089264, "nca_pair": 1.3824589191182397, "robust": 0.68301796750112176,
    "bco_pair": 1.3782068438479662, "sppo_hard": 48.530000000000001, "aot": 0.6867679675011219,
    "aot_unpaired": 0.68655967773025317, "apo_zero": 0.99583445111777313, "apo_down": 1.0008342005623772,
    "discopop": 0.85138070154355516, "sigmoid_norm": 0.69224976943777816,
}


@pytest.mark.parametrize("loss_type", sorted(TRL_DPO_VALUES))
def test_every_trl_dpo_loss_type(loss_type):
    eps = 0.1 if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired") else 0.0
    out = dpo(loss_type=loss_type, label_smoothing=eps)
    close(out.loss, TRL_DPO_VALUES[loss_type])
    # TRL 1.16 logs beta * (pi - ref) of the summed log-ratios for every loss type
    close(out.chosen_rewards, [0.05, -0.03, 0.04], 1e-9)
    close(out.rejected_rewards, [-0.02, 0.01, 0.02], 1e-9)
    close(out.reward_accuracy, 2 / 3)
    close(out.reward_margin, 0.016666666666666666, 1e-9)


def test_aot_without_smoothing():
    close(dpo(loss_type="aot").loss, 0.68510130083445508)
    close(dpo(loss_type="aot_unpaired").loss, 0.68489301106358635)


# ------------------------------------------------------------------ parity items 1-5 (dpo_loss)


def test_p1_sigmoid_ignores_label_smoothing_and_cdpo_is_opt_in():
    with pytest.warns(UserWarning, match="cdpo"):
        out = dpo(loss_type="sigmoid", label_smoothing=0.1)
    close(out.loss, 0.68510130083445508)  # TRL 1.16: plain sigmoid
    close(dpo(loss_type="cdpo", label_smoothing=0.1).loss, 0.6867679675011219)  # -(1-e) ls(u) - e ls(-u)


def test_p2_bco_pair_has_no_offset():
    close(dpo(loss_type="bco_pair").loss, 1.3782068438479662)
    # an explicit offset is still honoured (the old batch-mean value, 0.011666..., given by hand)
    close(dpo(loss_type="bco_pair", bco_delta=0.011666666666666657).loss, 1.3781728214887579)


def test_p3_ipo_rewards_are_summed_logratios():
    out = dpo(loss_type="ipo")
    close(out.loss, 24.832071296296295)
    close(out.chosen_rewards, [0.05, -0.03, 0.04], 1e-9)
    close(out.reward_accuracy, 0.66666666666666663)  # length-averaged rewards would give 1/3
    close(out.reward_margin, 0.016666666666666666, 1e-9)
    close(out.chosen_logps, PC)


def test_p4_ipo_zero_length_completion_is_finite():
    out = ptk.dpo_loss(t([0.0, -3.0]), t([-2.0, -4.0]), t([0.0, -3.5]), t([-1.5, -3.9]), beta=BETA, loss_type="ipo",
                       chosen_lengths=t([0.0, 3.0]), rejected_lengths=t([2.0, 4.0]))
    close(out.loss, 22.841284722222223)


# ------------------------------------------------------------------ fused cases with exact per-token log-probs


def hidden_for(rows, t_len):
    """``[S, t_len, 2]`` hidden states whose label-0 log-prob at position j is rows[i][j] (0 -> unused slot)."""
    h = torch.zeros(len(rows), t_len, 2, dtype=F64)
    for i, r in enumerate(rows):
        for j, lp in enumerate(r):
            h[i, j, 0] = -math.log(math.expm1(-lp))
    return h.to(DEVICE).requires_grad_()


EYE2 = torch.eye(2, dtype=F64, device=DEVICE)


def labels_for(rows, t_len, start=None):
    y = torch.full((len(rows), t_len), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        s = 0 if start is None else start[i]
        y[i, s:s + len(r)] = 0
    return y.to(DEVICE)


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_p5_fused_ipo_with_empty_prompt_divides_by_the_unshifted_length(backend):
    # chosen: empty prompt, 4 completion tokens, 3 scored; rejected: 3 completion tokens, 2 scored (shift=True)
    pol = hidden_for([[-1.0, -2.0, -0.5], [-2.0, -1.0]], 4)
    ref = hidden_for([[-1.2, -1.5, -0.7], [-1.5, -1.1]], 4)
    labels = labels_for([[0, 0, 0, 0], [0, 0, 0]], 4)
    out = ptk.fused_linear_preference_loss(pol, EYE2, labels, ref_hidden=ref.detach(), ref_weight=EYE2,
                                           loss_type="ipo", beta=BETA, shift=True, backend=backend)
    close(out.loss, 23.928402777777777)  # TRL 1.16: divisors 4 and 3
    # pre-shifted labels: the op sees only the scored tokens (divisors 3 and 2), documented
    shifted = labels_for([[0, 0, 0], [0, 0]], 4)
    out = ptk.fused_linear_preference_loss(pol, EYE2, shifted, ref_hidden=ref.detach(), ref_weight=EYE2,
                                           loss_type="ipo", beta=BETA, backend=backend)
    close(out.loss, 23.361111111111107)


ORPO_ROWS = [[-2.0, -0.5, -0.7, -0.3], [-0.9, -0.4], [-1.2], [-0.8]]  # chosen 1, chosen 2, rejected 1, rejected 2


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_p6_orpo_nll_over_prompt_and_completion_with_nll_target(backend):
    hidden = hidden_for(ORPO_ROWS, 4)
    # completion-only labels (row 1's first scored token is the prompt's second token); nll_target adds it back
    labels = labels_for([[0, 0, 0], [0, 0], [0], [0]], 4, start=[1, 0, 0, 0])
    full = labels_for(ORPO_ROWS, 4)
    out = ptk.fused_linear_preference_loss(hidden, EYE2, labels, loss_type="orpo", beta=BETA, nll_target=full,
                                           backend=backend)
    close(out.loss, 0.84022409940741638)  # TRL 1.16 ORPOTrainer
    close(out.nll_loss, 0.8)
    close(out.log_odds_ratio, -0.40224099407416469)
    close(out.log_odds_chosen, 0.78299617543844979)
    close(out.chosen_rewards, [-0.05, -0.065])
    plain = ptk.fused_linear_preference_loss(hidden, EYE2, labels, loss_type="orpo", beta=BETA, backend=backend)
    close(plain.loss, 0.60022409940741639)  # Liger 0.8.5's default: the completion only
    grads = torch.autograd.grad(out.loss, hidden)[0]
    assert grads[0, 0].abs().sum() > 0  # the prompt token is trained only through nll_target


LD_POL = [[-0.5, -1.0, -0.2, -0.8], [-0.4], [-0.7, -0.3], [-0.2, -0.9, -1.1]]
LD_REF = [[-0.6, -0.9, -0.3, -0.5], [-0.45], [-0.4, -0.5], [-0.3, -0.8, -1.0]]


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
@pytest.mark.parametrize("ld_alpha, loss, reward0", [(None, 0.69191749290206983, -0.02),
                                                     (0.5, 0.69189874305831767, -0.01),
                                                     (0.0, 0.69190499303227626, 0.0)])
def test_ld_dpo(backend, ld_alpha, loss, reward0):
    pol, ref = hidden_for(LD_POL, 4), hidden_for(LD_REF, 4).detach()
    labels = labels_for(LD_POL, 4)
    out = ptk.fused_linear_preference_loss(pol, EYE2, labels, ref_hidden=ref, ref_weight=EYE2, beta=BETA,
                                           ld_alpha=ld_alpha, backend=backend)
    close(out.loss, loss)
    close(out.chosen_rewards, [reward0, 0.005], 1e-9)


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_mpo_weighted_loss_types(backend):
    pol, ref = hidden_for(LD_POL, 4), hidden_for(LD_REF, 4).detach()
    labels = labels_for(LD_POL, 4)
    out = ptk.fused_linear_preference_loss(pol, EYE2, labels, ref_hidden=ref, ref_weight=EYE2, beta=BETA,
                                           loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                                           backend=backend)
    close(out.loss, 1.4105506789515609)
    close(out.nll_loss, 0.58)


def test_mpo_on_sequence_logps():
    pc, pr = t([-2.5, -0.4]), t([-1.0, -2.2])
    rc, rr = t([-2.3, -0.45]), t([-0.9, -2.1])
    nll = -pc.sum() / 5.0  # TRL's sft: plain sums over 4 + 1 chosen tokens -> 0.58 (the fused case above)
    out = ptk.dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=["sigmoid", "bco_pair", "sft"],
                       loss_weights=[0.8, 0.2, 1.0], nll_loss=nll)
    close(out.loss, 1.4105506789515609)
    close(out.nll_loss, 0.58)
    with pytest.raises(ValueError, match="loss_weights has 1 entries"):
        ptk.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"], loss_weights=[1.0], nll_loss=nll)


# TRL 1.16's sft (dpo_trainer.py: -chosen_per_token_logps[shifted chosen mask].mean()) on one pair: the chosen
# completion's scored tokens -1, -2, -3, -4, the rejected's -0.5. LD-DPO (ld_alpha 0.5, shared length 1) feeds the
# loss -1 + 0.5 (-9) = -5.5 and -0.5, while TRL's sft stays the unweighted mean 2.5 (-5.5 / 4 would be 1.375).
SFT_CHOSEN, SFT_REJECTED, SFT_TRL = [-1.0, -2.0, -3.0, -4.0], [-0.5], 2.5


@pytest.mark.parametrize("loss_type", ["sft", ["sigmoid", "sft"]])
def test_sft_needs_nll_loss(loss_type):
    """dpo_loss takes the sft term from nll_loss only: the (LD-weighted) sums and the lengths cannot give TRL's value
    in general, so it is required, with lengths or without."""
    pc, pr = t([-1.0 + 0.5 * -9.0]), t([-0.5])
    for lengths in ({}, dict(chosen_lengths=t([4.0]), rejected_lengths=t([1.0]))):
        with pytest.raises(ValueError, match=r"loss_type 'sft' needs nll_loss.*ld_alpha.*shifted completion mask"):
            ptk.dpo_loss(pc, pr, pc.clone(), pr.clone(), loss_type=loss_type, **lengths)
    out = ptk.dpo_loss(pc, pr, pc.clone(), pr.clone(), loss_type="sft", nll_loss=t(SFT_TRL),
                       chosen_lengths=t([5.0]), rejected_lengths=t([2.0]))  # lengths do not enter sft
    close(out.loss, SFT_TRL)
    close(out.nll_loss, SFT_TRL)
    rpo = ptk.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=BETA, loss_type=["sigmoid", "sft"],
                       loss_weights=[1.0, 0.5], nll_loss=t(SFT_TRL))
    close(rpo.loss, math.log(2.0) + 0.5 * SFT_TRL)  # u = 0 with ref = policy


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_fused_sft_is_trls_unweighted_mean(backend, ld_alpha):
    """fused_linear_preference_loss computes TRL's sft itself from the tokens: 2.5 with or without LD-DPO."""
    pol = hidden_for([SFT_CHOSEN, SFT_REJECTED], 4)
    labels = labels_for([SFT_CHOSEN, SFT_REJECTED], 4)
    out = ptk.fused_linear_preference_loss(pol, EYE2, labels, ref_chosen_logps=t([-10.0]),
                                           ref_rejected_logps=t([-0.5]), loss_type="sft", ld_alpha=ld_alpha,
                                           backend=backend)
    close(out.loss, SFT_TRL)
    close(out.chosen_logps, [-10.0 if ld_alpha is None else -5.5])


def wpo_case():
    jj = torch.arange(4 * 3 * 5, dtype=F64).view(4, 3, 5)
    logits = (1.7 * torch.sin(0.53 * jj + 0.3)).to(DEVICE).requires_grad_()
    labels = torch.tensor([[1, 4, 0], [2, 2, 3], [0, 1, 4], [3, 0, 2]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]).bool()
    return logits, labels.masked_fill(~mask, -100).to(DEVICE)


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_wpo_weighting(backend):
    logits, labels = wpo_case()
    ref = t([-4.0, -3.5, -1.0, -5.0])
    kw = dict(ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:], beta=BETA, backend=backend)
    eye = torch.eye(5, dtype=F64, device=DEVICE)
    close(ptk.fused_linear_preference_loss(logits, eye, labels, use_weighting=True, **kw).loss, 0.22896987971991506)
    close(ptk.fused_linear_preference_loss(logits, eye, labels, **kw).loss, 0.82987024768212858)


# ------------------------------------------------------------------ f-divergences (scores keep the constant)

F_DIV = {
    ("forward_kl", "sigmoid"): 0.6880920158728635, ("forward_kl", "hinge"): 0.98939128613500549,
    ("forward_kl", "ipo"): 24.917880055825876, ("forward_kl", "sigmoid_norm"): 0.69268616253395277,
    ("js_divergence", "sigmoid"): 0.68989187331196755, ("js_divergence", "ipo"): 24.937161912938706,
    ("js_divergence", "sigmoid_norm"): 0.69281979398426008,
    ("alpha_divergence", "sigmoid"): 0.68668188773140326, ("alpha_divergence", "ipo"): 24.878181480213328,
    ("alpha_divergence", "sigmoid_norm"): 0.69248472889453139,
}


@pytest.mark.parametrize("f_div, loss_type", sorted(F_DIV))
def test_f_divergence(f_div, loss_type):
    close(dpo(loss_type=loss_type, f_divergence_type=f_div).loss, F_DIV[(f_div, loss_type)])


def test_alpha_divergence_coefficient_and_rejected_types():
    close(dpo(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3).loss,
          0.68726423018513716)
    close(dpo(loss_type="ipo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3).loss,
          24.894745823700259)
    for lt in ("nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down"):
        with pytest.raises(ValueError, match="no generalization"):
            dpo(loss_type=lt, f_divergence_type="forward_kl")


# ------------------------------------------------------------------ CPO / SimPO / AlphaPO / KTO

CAVG, RAVG = t([-0.8, -1.1, -0.5]), t([-1.0, -0.9, -1.3])


def test_cpo_keeps_cdpo_smoothing():
    close(ptk.cpo_loss(CAVG, RAVG, beta=BETA).loss, 0.68011377559028607)
    close(ptk.cpo_loss(CAVG, RAVG, beta=BETA, label_smoothing=0.1).loss, 0.68278044225695267)


def test_simpo_default_beta_is_trl_and_liger():
    close(ptk.simpo_loss(CAVG, RAVG).loss, 0.95776165412603831)  # beta=0.1, gamma=0.5
    close(ptk.simpo_loss(CAVG, RAVG, beta=2.0).loss, 0.75762861997369646)
    close(ptk.simpo_loss(CAVG, RAVG, beta=2.5, gamma_beta_ratio=0.55).loss, 1.223273438962392)


def test_alphapo():
    out = ptk.simpo_loss(CAVG, RAVG, beta=2.0, gamma=0.5, alpha=0.25)
    close(out.loss, 0.73868504083722308)
    close(out.chosen_rewards, [-1.7712220652813588, -2.5322453989409723, -1.0651876245346106])


def test_kto_values():
    kc, krc, kr, krr = t([-5.0, -7.0]), t([-5.5, -6.8]), t([-6.0]), t([-6.4])
    kl = dict(policy_kl_logps=t([-8.0, -9.0, -7.5]), ref_kl_logps=t([-8.3, -8.9, -7.9]))
    out = ptk.kto_loss(kc, kr, krc, krr, **kl)
    close(out.kl, 0.20000000000000048, 1e-9)
    close(out.loss, 0.50249968755644825)
    close(ptk.kto_loss(kc, kr, krc, krr, undesirable_weight=1.33, **kl).loss, 0.55804966922384824)
    close(ptk.kto_loss(kc, kr, krc, krr, loss_type="apo_zero_unpaired").loss, 0.50083370124525162)


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_kto_average_log_prob_is_ptkernels_option(backend):
    rows = [[-0.5, -1.0, -0.2], [-0.4], [-0.7, -0.3]]
    hidden = hidden_for(rows, 3)
    labels = labels_for(rows, 3)
    ref = t([-1.5, -0.6, -0.8])
    desirable = torch.tensor([True, False, True], device=DEVICE)
    out = ptk.fused_linear_kto_loss(hidden, EYE2, labels, desirable, ref_logps=ref, average_log_prob=True,
                                    backend=backend)
    avg = t([-1.7 / 3, -0.4, -0.5])
    x = BETA * (avg - ref)
    truth = torch.cat([torch.sigmoid(-x[[0, 2]]), torch.sigmoid(x[[1]])]).mean()  # z0 = 0
    close(out.loss, truth)


# ------------------------------------------------------------------ parity item 9: GKD's batchmean


def jsd_case():
    ii = torch.arange(2 * 3 * 4, dtype=F64).view(2, 3, 4)
    return (2.0 * torch.sin(0.37 * ii + 0.1)).to(DEVICE).requires_grad_(), (1.5 * torch.cos(0.23 * ii - 0.4)).to(DEVICE)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("beta, batchmean, per_token, with_labels", [
    (0.0, 0.31861639284499826, 0.10620546428166609, 0.11907524971168602),
    (0.5, 0.074962201470195083, 0.024987400490065027, 0.027980319819214859),
    (1.0, 0.29424282915794359, 0.098080943052647862, 0.10985135264460594)])
def test_p9_jsd_batchmean_divides_by_the_batch(backend, beta, batchmean, per_token, with_labels):
    s, te = jsd_case()
    eye = torch.eye(4, dtype=F64, device=DEVICE)
    kw = dict(beta=beta, backend=backend)
    close(ptk.linear_jsd(s, eye, te, eye, reduction="batchmean", **kw), batchmean)  # TRL GKD: / B
    close(ptk.linear_jsd(s, eye, te, eye, reduction="mean", **kw), per_token)  # per token (Liger, Distillation)
    labels = torch.tensor([[1, -100, 2], [1, 3, -100]], device=DEVICE)
    close(ptk.linear_jsd(s, eye, te, eye, labels=labels, reduction="batchmean", **kw), with_labels)

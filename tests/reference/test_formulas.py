"""The eager reference (the oracle every op is tested against) checked on values worked out by hand.

Small inputs whose results have a closed form: a wrong sign, a missing Bessel correction or a swapped KL
direction in the oracle would otherwise pass every comparison of an op against it.
"""

import math

import pytest
import torch

from ptkernels import reference
from ptkernels.reference import preference, rl, sequence

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def test_cross_entropy_of_two_equal_logits_is_ln2_with_z_loss_and_smoothing():
    logits = torch.zeros(1, 2, dtype=torch.float64)
    labels = torch.tensor([0])
    assert reference.cross_entropy(logits, labels).item() == pytest.approx(LN2)
    # z-loss adds c * lse^2, lse = ln 2
    assert reference.cross_entropy(logits, labels, z_loss=0.5).item() == pytest.approx(LN2 + 0.5 * LN2 ** 2)
    # smoothing mixes (lse - s_y) and (lse - mean s): both ln 2 here
    assert reference.cross_entropy(logits, labels, label_smoothing=0.3).item() == pytest.approx(LN2)


def test_cross_entropy_ignores_labels_and_means_over_valid_tokens():
    logits = torch.tensor([[0.0, LN3], [5.0, -5.0]], dtype=torch.float64)  # row 0: p = (1/4, 3/4)
    labels = torch.tensor([1, -100])
    assert reference.cross_entropy(logits, labels).item() == pytest.approx(-math.log(0.75))
    per_token = reference.cross_entropy(logits, labels, reduction="none")
    assert per_token.tolist() == pytest.approx([-math.log(0.75), 0.0])


def test_token_logprobs_temperature_and_softcap():
    logits = torch.tensor([[0.0, LN3]], dtype=torch.float64)
    assert reference.token_logprobs(logits, torch.tensor([1])).item() == pytest.approx(math.log(0.75))
    # temperature 2: s = (0, ln3 / 2), p_1 = sqrt(3) / (1 + sqrt(3))
    got = reference.token_logprobs(logits, torch.tensor([1]), temperature=2.0).item()
    assert got == pytest.approx(math.log(math.sqrt(3.0) / (1.0 + math.sqrt(3.0))))
    # softcap c: s = c * tanh(z / c)
    capped = reference.transform_logits(t(0.0, 10.0).view(1, 2), softcap=5.0)
    assert capped[0, 1].item() == pytest.approx(5.0 * math.tanh(2.0))


def test_shift_labels_moves_left_and_pads_with_ignore_index():
    assert reference.shift_labels(torch.tensor([[1, 2, 3]])).tolist() == [[2, 3, -100]]


def test_jsd_directions_on_a_two_word_vocabulary():
    student = torch.tensor([[0.0, LN3]], dtype=torch.float64)  # Q = (1/4, 3/4)
    teacher = torch.zeros(1, 2, dtype=torch.float64)  # P = (1/2, 1/2)
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(P || Q)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(Q || P)
    assert reference.generalized_jsd(student, teacher, beta=0.0).item() == pytest.approx(forward)
    assert reference.generalized_jsd(student, teacher, beta=1.0).item() == pytest.approx(reverse)
    m = (0.375, 0.625)  # M = P/2 + Q/2
    jsd = 0.5 * sum(p * math.log(p / mi) for p, mi in zip((0.5, 0.5), m)) + \
        0.5 * sum(q * math.log(q / mi) for q, mi in zip((0.25, 0.75), m))
    assert reference.generalized_jsd(student, teacher, beta=0.5).item() == pytest.approx(jsd)


def test_sequence_logprobs_sum_and_average_over_the_mask():
    x = t(-1.0, -2.0, -3.0).view(1, 3)
    mask = torch.tensor([[True, True, False]])
    assert sequence.sequence_logprobs(x, mask).item() == pytest.approx(-3.0)
    assert sequence.sequence_logprobs(x, mask, average=True).item() == pytest.approx(-1.5)
    empty = torch.zeros(1, 3, dtype=torch.bool)
    assert sequence.sequence_logprobs(x, empty, average=True).item() == 0.0


def test_kl_estimators_k1_k2_k3():
    logp, ref = t(0.0), t(LN2)
    assert rl.kl_penalty(logp, ref, estimator="k1").item() == pytest.approx(-LN2)
    assert rl.kl_penalty(logp, ref, estimator="k2").item() == pytest.approx(0.5 * LN2 ** 2)
    assert rl.kl_penalty(logp, ref, estimator="k3").item() == pytest.approx(2.0 - LN2 - 1.0)


def test_group_advantages_use_bessel_corrected_std():
    rewards = t(1.0, 3.0, 5.0, 5.0)
    adv = rl.group_advantages(rewards, group_size=2, eps=1e-4)
    # group (1, 3): mean 2, std sqrt(2); group (5, 5): std 0, so 0 / (0 + eps) = 0
    a = 1 / (math.sqrt(2) + 1e-4)
    assert adv.tolist() == pytest.approx([-a, a, 0.0, 0.0])
    assert rl.group_advantages(rewards, group_size=2, scale="none").tolist() == pytest.approx([-1, 1, 0, 0])


def test_gae_on_two_steps():
    rewards, values = t(0.0, 1.0).view(1, 2), t(0.5, 0.25).view(1, 2)
    mask = torch.ones(1, 2, dtype=torch.float64)
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # delta_1 = 1 - 0.25 = 0.75 = A_1; delta_0 = 0.25 - 0.5 = -0.25, A_0 = -0.25 + 0.75 = 0.5; returns = A + v
    assert adv.flatten().tolist() == pytest.approx([0.5, 0.75])
    assert ret.flatten().tolist() == pytest.approx([1.0, 1.0])


def test_sampler_abs_logp_diff_leaves_nan_tokens_out():
    old = torch.zeros(1, 4, dtype=torch.float64)
    sampler = t(-1.0, float("nan"), -3.0, float("nan")).view(1, 4)
    mask = t(1.0, 1.0, 1.0, 0.0).view(1, 4)
    ratio, m = rl.sampler_importance_weights(old, sampler, mask, mode="token_truncate", clip_max=100.0)
    # |diff| 1 and 3 over the two scored valid tokens (TRL 1.16: mask & ~isnan); the NaN token's ratio is exp(0)
    assert m["abs_diff"].item() == 2.0
    assert ratio.flatten().tolist() == pytest.approx([math.e, 1.0, math.e ** 3, 1.0])
    assert m["mean"].item() == pytest.approx((math.e + 1.0 + math.e ** 3) / 3)
    _, m = rl.sampler_importance_weights(old, torch.full_like(sampler, float("nan")), mask, mode="sequence_mask")
    assert m["abs_diff"].item() == 0.0  # nothing scored: 0, as TRL


def test_gmpo_is_the_geometric_mean_of_the_clipped_ratios_and_takes_no_bonus():
    lp, old = t(-1.0, -1.0).view(1, 2), t(-1.5, -0.5).view(1, 2)  # log-ratios 0.5, -0.5
    mask = torch.ones(1, 2, dtype=torch.float64)
    # A > 0: clip from above at 0.4 -> mean(0.4, -0.5) = -0.05, loss -exp(-0.05) A
    out = rl.grpo_loss(lp, old, t(2.0), mask, loss_type="gmpo", epsilon_low=0.4)
    assert out.loss.item() == pytest.approx(-2.0 * math.exp(-0.05), rel=1e-15)
    with pytest.raises(ValueError, match="entropy_coef must be 0"):
        rl.grpo_loss(lp, old, t(2.0), mask, loss_type="gmpo", entropies=mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match="off_policy_mask_threshold must be None"):
        rl.grpo_loss(lp, old, t(2.0), mask, loss_type="gmpo", off_policy_mask_threshold=0.0)


def test_dpo_sigmoid_loss_and_rewards():
    out = preference.dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-1.0), beta=1.0)
    # logits = (pc - pr) - (rc - rr) = 1; loss = -log sigmoid(1)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert out.chosen_rewards.tolist() == pytest.approx([0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-1.0])
    assert out.reward_accuracy.item() == 1.0

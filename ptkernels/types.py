"""The public output types and option names of the ops: what ``ptkernels`` returns and accepts.

The eager reference (``ptkernels.reference``, the oracle) and the kernels' ops (``ptkernels.ops``) both return
these, so a test can compare them field by field; both import them from here. ``compute_dtype`` is the one
numerics rule they share: math in fp32 whatever the input dtype, fp64 for fp64 input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every loss, log-sum-exp and accumulation runs in for ``dtype`` input: fp64 stays fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------- RL (GRPO, PPO)

KL_ESTIMATORS = ("k1", "k2", "k3")
# TRL 1.16's GRPO loss types, plus GMPO (TRL 1.16's experimental GMPOTrainer)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo", "gmpo", "clip_cov", "kl_cov")
COV_LOSS_TYPES = ("clip_cov", "kl_cov")  # verl's entropy-collapse controls: a batch-level token selection
IS_LEVELS = ("token", "sequence")
REWARD_SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")  # TRL's multi_objective_aggregation
# TRL 1.16's vllm_importance_sampling_mode: sampler/trainer mismatch correction (TIS: truncate, MIS: mask)
SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass(frozen=True)
class GRPOOutput:
    """What ``grpo_loss`` / ``fused_linear_grpo_loss`` return.

    loss             the scalar to backpropagate (fp32, fp64 for fp64 input); the only differentiable field
    kl               mean per-token k3 KL to the reference over completion tokens (0 without ``ref_logps``)
    clip_ratio       TRL's ``clip_ratio/region_mean``: fraction of tokens (sequences for GSPO) clipped
    clip_ratio_low   TRL's ``clip_ratio/low_mean``:  coef_1 < 1 - epsilon_low  and A < 0
    clip_ratio_high  TRL's ``clip_ratio/high_mean``: coef_1 > 1 + epsilon_high and A > 0
    entropy          mean per-token entropy over completion tokens (when computed or given), else None
    (with ``sampler_logps``, the sampler/trainer mismatch metrics, else None:)
    sampler_abs_logp_diff  mean |old_logps - sampler_logps| over the completion tokens the sampler scored: a NaN
                           sampler log-prob is left out of the sum and the count (TRL 1.16); 0 if none is left
    is_masked_fraction     fraction of tokens (sequence modes: sequences) whose ratio left [clip_min, clip_max]
                           (set to 0 by the mask modes, truncated by the truncate modes)
    is_weight_mean         mean importance weight over tokens (sequences), after truncation / masking
    is_weight_max          largest importance weight, after truncation / masking
    cov_selected_fraction  (loss_type clip_cov / kl_cov) fraction of completion tokens the covariance selected:
                           clip_cov's gradient-cut tokens (verl's pg_clipfrac), kl_cov's KL-penalized ones
    """

    loss: torch.Tensor
    kl: torch.Tensor
    clip_ratio: torch.Tensor
    clip_ratio_low: torch.Tensor
    clip_ratio_high: torch.Tensor
    entropy: torch.Tensor | None = None
    sampler_abs_logp_diff: torch.Tensor | None = None
    is_masked_fraction: torch.Tensor | None = None
    is_weight_mean: torch.Tensor | None = None
    is_weight_max: torch.Tensor | None = None
    cov_selected_fraction: torch.Tensor | None = None

    @property
    def clip_ratio_region(self) -> torch.Tensor:
        """Alias of ``clip_ratio`` (TRL logs it as ``clip_ratio/region_mean``)."""
        return self.clip_ratio


@dataclass(frozen=True)
class PPOPolicyOutput:
    """``ppo_policy_loss``: ``loss`` (differentiable), ``clip_frac`` and ``approx_kl`` (detached metrics); with
    ``sampler_logps`` also the mismatch metrics of ``GRPOOutput`` (same names and meaning), else None."""

    loss: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor
    sampler_abs_logp_diff: torch.Tensor | None = None
    is_masked_fraction: torch.Tensor | None = None
    is_weight_mean: torch.Tensor | None = None
    is_weight_max: torch.Tensor | None = None


@dataclass(frozen=True)
class PPOValueOutput:
    """``ppo_value_loss``: ``loss`` (differentiable) and ``clip_frac`` (detached metric)."""

    loss: torch.Tensor
    clip_frac: torch.Tensor


# ------------------------------------------------------------------------------- preference (DPO family, KTO)

# TRL 1.16.0's 15 DPO loss types (DPOTrainer._compute_loss), in TRL's order, then ptkernels' own "cdpo"
# (conservative DPO: sigmoid with label smoothing, which TRL 1.16 no longer has).
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "bco_pair", "apo_zero", "apo_down", "nca_pair",
                  "sppo_hard", "aot", "aot_unpaired", "discopop", "sigmoid_norm", "sft", "cdpo")
# TRL 1.16 DPOConfig.f_divergence_type, and the loss types that accept a non-default one (DPOTrainer.__init__)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "cdpo")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Result of a paired preference loss.

    loss               scalar, the mean of ``losses`` (+ ``nll_weight * nll_loss`` when there is an NLL term)
    losses             [B] per-pair losses
    chosen_rewards     [B] implicit rewards of the chosen completions (detached)
    rejected_rewards   [B] implicit rewards of the rejected completions (detached)
    reward_accuracy    scalar, mean(chosen_rewards > rejected_rewards)
    reward_margin      scalar, mean(chosen_rewards - rejected_rewards)
    chosen_logps       [B] policy log-probs of the chosen completions as the loss saw them (detached)
    rejected_logps     [B] same for the rejected completions
    nll_loss           scalar NLL term when there is one (detached), else None
    log_odds_ratio     ORPO only: mean(log sigma(log_odds)) (TRL's ``log_odds_ratio`` metric), else None
    log_odds_chosen    ORPO only: mean(log_odds) (TRL's ``log_odds_chosen`` metric), else None
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    chosen_logps: torch.Tensor | None = None
    rejected_logps: torch.Tensor | None = None
    nll_loss: torch.Tensor | None = None
    log_odds_ratio: torch.Tensor | None = None
    log_odds_chosen: torch.Tensor | None = None


@dataclass(frozen=True)
class KTOLossOutput:
    """Result of the (unpaired) KTO loss.

    loss               scalar, the mean of ``losses``
    losses             [n_chosen + n_rejected] weighted per-example losses, desirable ones first (TRL's order)
    chosen_rewards     [n_chosen] beta * (pi - ref) of the desirable examples (detached)
    rejected_rewards   [n_rejected] same for the undesirable examples
    kl                 scalar reference point z0 = clamp(mean(pi_KL - ref_KL), min=0) (detached)
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    kl: torch.Tensor

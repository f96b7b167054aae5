"""Argument checks of the GRPO family, shared by ``grpo_loss`` and ``fused_linear_grpo_loss`` (and the sampler
options by ``ppo_policy_loss``): each names the argument it rejects, and the option checks turn the keyword
arguments into what the row functions take (``GRPOParams``, ``WeightOptions``).
"""

from __future__ import annotations

import math

import torch

from ..reference.grpo import check_gmpo_options
from ..types import COV_LOSS_TYPES, IS_LEVELS, LOSS_TYPES
from .backends.base import GRPO_KINDS, GRPOParams
from .core.checks import check_float, check_same
from .grpo_weights import WeightOptions, check_is_mode


def check_grpo_options(*, beta, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level,
                       max_completion_length, num_items_in_batch, has_ref: bool, bias_corrected_kl=True,
                       sapo_temperature_pos=1.0, sapo_temperature_neg=1.05) -> GRPOParams:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {', '.join(IS_LEVELS)}; "
                         f"got {importance_sampling_level!r}")
    if not epsilon_low >= 0:
        raise ValueError(f"epsilon_low must be >= 0, got {epsilon_low}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if not epsilon_high >= 0:
        raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high}")
    if delta is not None and not delta > 0:
        raise ValueError(f"delta must be None or > 0 (TRL recommends > 1 + epsilon_high), got {delta}")
    if delta is not None and GRPO_KINDS[loss_type] != 0:
        raise ValueError(f"delta (two-sided clipping) applies to the clipped loss types, not loss_type={loss_type!r}")
    if beta != 0.0 and not has_ref:
        raise ValueError("beta != 0 needs ref_logps (the reference model's per-token log-probs)")
    if max_completion_length is not None and (not isinstance(max_completion_length, int)
                                              or max_completion_length <= 0):
        raise ValueError(f"max_completion_length must be None or a positive int, got {max_completion_length!r}")
    if isinstance(num_items_in_batch, (int, float)) and not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
    if not (sapo_temperature_pos > 0 and sapo_temperature_neg > 0):
        raise ValueError(f"sapo_temperature_pos/neg must be > 0, got {sapo_temperature_pos}, {sapo_temperature_neg}")
    kind = GRPO_KINDS[loss_type]
    return GRPOParams(float(epsilon_low), float(epsilon_high), None if delta is None else float(delta),
                      float(beta), importance_sampling_level == "sequence" or kind == 4, has_ref, kind=kind,
                      bias_kl=bool(bias_corrected_kl) and kind != 4 and has_ref, cap=float(epsilon_high),
                      tau_pos=float(sapo_temperature_pos), tau_neg=float(sapo_temperature_neg))


def check_weight_options(*, loss_type, sampler_logps, vllm_importance_sampling_mode,
                         vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max,
                         off_policy_mask_threshold, top_entropy_quantile, entropy_coef, vespo) -> WeightOptions:
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}")
    if not math.isfinite(entropy_coef):
        raise ValueError(f"entropy_coef must be finite, got {entropy_coef}")
    # TRL 1.16's GMPOTrainer has no entropy bonus or off-policy mask: the reference's check, the spec's words
    check_gmpo_options(loss_type, entropy_coef, off_policy_mask_threshold, None)
    is_mode = None
    if sampler_logps is not None:
        check_is_mode(vllm_importance_sampling_mode)
        lo, hi = vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max
        if vllm_importance_sampling_mode.endswith("truncate") and lo is None and hi is None:
            raise ValueError("vllm_importance_sampling_mode='*_truncate' needs vllm_importance_sampling_clip_min or "
                             "vllm_importance_sampling_clip_max")
        if lo is not None and hi is not None and not lo < hi:
            raise ValueError(f"vllm_importance_sampling_clip_min ({lo}) must be < vllm_importance_sampling_clip_max "
                             f"({hi})")
        if loss_type == "gmpo":
            raise ValueError("loss_type='gmpo' takes no sampler_logps (TRL's GMPOTrainer has no importance-sampling "
                             "correction)")
        is_mode = vllm_importance_sampling_mode
    return WeightOptions(
        is_mode=is_mode,
        clip_min=None if vllm_importance_sampling_clip_min is None else float(vllm_importance_sampling_clip_min),
        clip_max=None if vllm_importance_sampling_clip_max is None else float(vllm_importance_sampling_clip_max),
        opsm_threshold=None if off_policy_mask_threshold is None else float(off_policy_mask_threshold),
        vespo=tuple(float(x) for x in vespo) if loss_type == "vespo" else None, fold_is=loss_type != "vespo")


# The non-tensor keyword options of grpo_loss and fused_linear_grpo_loss that the reference takes as they are.
LOSS_OPTIONS = ("beta", "epsilon_low", "epsilon_high", "delta", "loss_type", "importance_sampling_level",
                "max_completion_length", "num_items_in_batch", "bias_corrected_kl", "entropy_coef",
                "top_entropy_quantile", "off_policy_mask_threshold", "vllm_importance_sampling_mode",
                "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max", "sapo_temperature_pos",
                "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
                "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "kl_cov_coef", "generator")


def loss_options(arguments: dict) -> dict:
    """``LOSS_OPTIONS`` picked from an entry point's ``locals()`` taken before anything else is bound: one list of
    names for both entry points, their checks and the reference call, rather than a copy of 21 keywords each."""
    return {k: arguments[k] for k in LOSS_OPTIONS}


_PARAM_KEYS = ("beta", "epsilon_low", "epsilon_high", "delta", "loss_type", "importance_sampling_level",
               "max_completion_length", "num_items_in_batch", "bias_corrected_kl", "sapo_temperature_pos",
               "sapo_temperature_neg")
_WEIGHT_KEYS = ("loss_type", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_min",
                "vllm_importance_sampling_clip_max", "off_policy_mask_threshold", "top_entropy_quantile",
                "entropy_coef")


def check_loss_options(options: dict, *, ref_logps, sampler_logps) -> tuple[GRPOParams, WeightOptions]:
    """The option checks of both entry points. ``options``: ``grpo_loss``'s non-tensor keyword arguments by name
    (the ones it hands to the reference as they are); returns the kernel's parameters and the weight options."""
    p = check_grpo_options(has_ref=ref_logps is not None, **{k: options[k] for k in _PARAM_KEYS})
    vespo = tuple(options[k] for k in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"))
    wo = check_weight_options(sampler_logps=sampler_logps, vespo=vespo, **{k: options[k] for k in _WEIGHT_KEYS})
    check_cov_options(options)
    return p, wo


def check_cov_options(o: dict) -> None:
    """Clip-Cov / KL-Cov's options (checked whatever the loss type: a bad value is a typo either way)."""
    for name in ("clip_cov_ratio", "kl_cov_ratio"):
        if not 0.0 <= o[name] <= 1.0:
            raise ValueError(f"{name} must be in [0, 1] (a fraction of the completion tokens), got {o[name]}")
    if not o["clip_cov_lb"] < o["clip_cov_ub"]:
        raise ValueError(f"clip_cov_lb ({o['clip_cov_lb']}) must be < clip_cov_ub ({o['clip_cov_ub']})")
    if not (math.isfinite(o["kl_cov_coef"]) and o["kl_cov_coef"] >= 0):
        raise ValueError(f"kl_cov_coef must be finite and >= 0, got {o['kl_cov_coef']}")
    if o["generator"] is not None and not isinstance(o["generator"], torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {type(o['generator']).__name__}")
    if o["loss_type"] in COV_LOSS_TYPES:
        if o["importance_sampling_level"] != "token":
            raise ValueError(f"loss_type={o['loss_type']!r} is token-level (verl): importance_sampling_level must "
                             f"be 'token', got {o['importance_sampling_level']!r}")
        if o["delta"] is not None:
            raise ValueError(f"delta (two-sided clipping) is not part of verl's {o['loss_type']}: pass delta=None")


def check_token_tensor(name: str, t: torch.Tensor, shape, like: torch.Tensor, like_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {like_name} implies {tuple(shape)}")
    check_same(name, t, like_name, like, dtype=False)


def check_token_floats(shape, like: torch.Tensor, like_name: str, **tensors) -> None:
    """Each given (not None) ``[B, T]`` float tensor of ``tensors`` (name -> tensor) against ``like``."""
    for name, x in tensors.items():
        if x is not None:
            check_float(name, x)
            check_token_tensor(name, x, shape, like, like_name)


def check_mask(name: str, mask: torch.Tensor, shape, like: torch.Tensor, like_name: str) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(mask.shape)}")
    check_token_tensor(name, mask, shape, like, like_name)


def check_advantages(advantages: torch.Tensor, b: int, like: torch.Tensor, like_name: str) -> None:
    check_float("advantages", advantages)
    if tuple(advantages.shape) != (b,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)} but {like_name} implies ({b},): "
                         "one advantage per sequence")
    check_same("advantages", advantages, like_name, like, dtype=False)

"""PPO pieces with TRL's semantics: GAE (a Triton reverse scan, or PyTorch), the clipped policy and value
losses, and TRL's masked statistics (``masked_mean``, ``masked_var``, ``masked_whiten``).

Every function takes ``[B, T]`` tensors and a ``mask [B, T]`` (bool, integer or float weights) of the valid
(completion) tokens, right-padded or not. Outputs are fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

import functools

import torch

from ..reference import rl as ref_rl
from ..types import PPOPolicyOutput, PPOValueOutput, compute_dtype
from . import backends
from .core.checks import check_float, check_same
from .core.dispatch import resolve_backend
from .grpo_checks import check_weight_options
from .grpo_weights import WeightOptions, finish_is_metrics, is_partials, policy_weights

__all__ = ["PPOPolicyOutput", "PPOValueOutput", "gae", "masked_mean", "masked_var", "masked_whiten",
           "ppo_policy_loss", "ppo_value_loss"]


def _cd(*ts: torch.Tensor) -> torch.dtype:
    """The compute dtype of several inputs together: fp64 when any of them is fp64."""
    return functools.reduce(torch.promote_types, (compute_dtype(t.dtype) for t in ts))


def _check_pair(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor, *, is_float: bool = True) -> None:
    if is_float:
        check_float(name, t)
    elif not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {like_name} has shape {tuple(like.shape)}; "
                         "they must match")
    check_same(name, t, like_name, like, dtype=False)


def _check_2d(name: str, t: torch.Tensor) -> None:
    check_float(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(t.shape)}")


# ------------------------------------------------------------------------------------------ statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """TRL's ``masked_mean``: ``sum(values * mask) / sum(mask)``, over ``axis`` when given.

    Unlike TRL (0 / 0 = NaN), an empty mask gives 0. ``mask`` broadcasts against ``values``. Differentiable.
    """
    check_float("values", values)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    check_same("values", values, "mask", mask, dtype=False)
    cd = compute_dtype(values.dtype)
    m = mask.to(cd)
    x = torch.where(m != 0, values.to(cd) * m, torch.zeros((), dtype=cd, device=values.device))
    if axis is None:
        num, den = x.sum(), m.expand_as(x).sum()
    else:
        num, den = x.sum(dim=axis), m.expand_as(x).sum(dim=axis)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _check_count(mask: torch.Tensor, need: int, what: str) -> None:
    """mask.sum() >= need: an eager ValueError on CPU, ``torch._assert_async`` on CUDA (no synchronization)."""
    count = mask.sum()
    msg = f"{what} needs at least {need} unmasked values (sum of mask >= {need})"
    if mask.device.type == "cuda":
        torch._assert_async(count >= need, msg)
    elif not torch.compiler.is_compiling() and bool(count < need):
        raise ValueError(f"{msg}, got {float(count):g}")


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """TRL's ``masked_var``: ``masked_mean((values - masked_mean(values))^2)``, times ``n / (n - 1)`` with
    n = sum(mask) when ``unbiased``. A mask sum below 2 (below 1 when biased) raises ValueError (TRL raises on
    0 and divides by zero on 1)."""
    check_float("values", values)
    _check_count(mask.to(compute_dtype(values.dtype)).expand_as(values), 2 if unbiased else 1, "masked_var")
    mean = masked_mean(values, mask)
    variance = masked_mean((values.to(mean.dtype) - mean) ** 2, mask)
    if unbiased:
        n = mask.to(mean.dtype).expand_as(values).sum()
        variance = variance * (n / (n - 1))
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """TRL's ``masked_whiten``: ``(values - mean) * rsqrt(var + 1e-8)`` with the masked mean and the unbiased
    masked variance; ``shift_mean=False`` adds the mean back (whitens the scale only). Masked positions are
    transformed like the others (TRL's behavior); zero them with the mask if needed. Differentiable."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values.to(mean.dtype) - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# ------------------------------------------------------------------------------------------ GAE


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95, backend: str = "auto"):
    """Generalized advantage estimation (TRL's ``PPOTrainer`` loop) → ``(advantages, returns)``, ``[B, T]``.

    With m = mask, r = rewards * m, v = values * m (so the value after a sequence's last valid token is 0,
    i.e. no bootstrap past the end of a right-padded sequence)::

        delta_t = r_t + gamma * v_{t+1} - v_t            (v_T = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}        (A_T = 0)
        advantages = A * m,   returns = (A + v) * m

    A gap inside a mask is not skipped (the recursion runs through it with r = v = 0), as in TRL. TRL then
    whitens the advantages: ``masked_whiten(advantages, mask)``. Not differentiable (inputs are detached).
    ``backend``: "torch" (a reverse loop over T of [B]-vector ops), "triton" (one program per sequence),
    "native" (csrc/: one OpenMP thread per sequence on CPU, the CUDA scan on GPU for fp32; fp64 on CUDA takes the
    torch loop), "reference", "auto".
    """
    _check_2d("rewards", rewards)
    _check_pair("values", values, "rewards", rewards)
    _check_pair("mask", mask, "rewards", rewards, is_float=False)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    name = resolve_backend(backend, values.device)
    if name == "reference":
        return ref_rl.gae(rewards, values, mask, gamma=gamma, lam=lam)
    cd = _cd(rewards, values)
    with torch.no_grad():
        r, v, m = (x.detach().to(cd) for x in (rewards, values, mask))
        return backends.get(name, "gae")(r, v, m, float(gamma), float(lam))


# ------------------------------------------------------------------------------------------ losses


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    *, clip_range: float = 0.2, sampler_logps: torch.Tensor | None = None,
                    vllm_importance_sampling_mode: str = "token_truncate",
                    vllm_importance_sampling_clip_min: float | None = None,
                    vllm_importance_sampling_clip_max: float | None = 3.0,
                    backend: str = "auto") -> PPOPolicyOutput:
    """TRL's PPO clipped policy loss on per-token log-probs ``[B, T]``::

        ratio = exp(logps - old_logps)
        pg_losses = -A * ratio;   pg_losses2 = -A * clamp(ratio, 1 - clip_range, 1 + clip_range)
        loss      = masked_mean(max(pg_losses, pg_losses2) * is_ratio, m)        (is_ratio = 1 without sampler_logps)
        clip_frac = masked_mean(pg_losses2 > pg_losses, m)
        approx_kl = 0.5 * masked_mean((logps - old_logps)^2, m)

    ``sampler_logps`` (the rollout engine's log-probs of the sampled tokens) turns on the sampler/trainer mismatch
    correction with TRL 1.16's definitions (see ``ptkernels.grpo_loss``): ``diff = nan_to_num((old - sampler) m, 0)``,
    ``token_truncate`` (TIS, the default here: per-token PPO) ``clamp(exp(diff), clip_min, clip_max)``,
    ``token_mask`` (MIS) 0 outside the bounds, ``sequence_truncate`` / ``sequence_mask`` the same on
    ``exp(sum_t diff)``; the output then carries the mismatch metrics. Off by default (the numerics are then
    exactly the plain loss).

    ``advantages`` is ``[B, T]`` (per token, e.g. from ``gae``) or ``[B]`` (one per sequence). ``loss`` is
    differentiable w.r.t. ``logps``; metrics detached. approx_kl is a masked mean (TRL averages over padded
    positions too, where the difference is 0). ``backend``: "reference" (the float64 oracle's eager code) or any
    other (the same PyTorch ops: O(B T) elementwise work with no kernel of its own).
    """
    _check_2d("logps", logps)
    _check_pair("old_logps", old_logps, "logps", logps)
    _check_pair("mask", mask, "logps", logps, is_float=False)
    check_float("advantages", advantages)
    if sampler_logps is not None:
        _check_pair("sampler_logps", sampler_logps, "logps", logps)
        check_weight_options(loss_type="ppo", sampler_logps=sampler_logps,
                             vllm_importance_sampling_mode=vllm_importance_sampling_mode,
                             vllm_importance_sampling_clip_min=vllm_importance_sampling_clip_min,
                             vllm_importance_sampling_clip_max=vllm_importance_sampling_clip_max,
                             off_policy_mask_threshold=None, top_entropy_quantile=1.0, entropy_coef=0.0, vespo=None)
    if tuple(advantages.shape) == (logps.shape[0],):
        advantages = advantages.unsqueeze(1)
    elif tuple(advantages.shape) != tuple(logps.shape):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)} but logps has shape "
                         f"{tuple(logps.shape)}; expected that or ({logps.shape[0]},)")
    check_same("advantages", advantages, "logps", logps, dtype=False)
    if not clip_range >= 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    if resolve_backend(backend, logps.device) == "reference":
        return ref_rl.ppo_policy_loss(logps, old_logps, advantages, mask, clip_range=clip_range,
                                      sampler_logps=sampler_logps,
                                      vllm_importance_sampling_mode=vllm_importance_sampling_mode,
                                      vllm_importance_sampling_clip_min=vllm_importance_sampling_clip_min,
                                      vllm_importance_sampling_clip_max=vllm_importance_sampling_clip_max)
    cd = _cd(logps)
    m = mask.to(cd)
    zero = torch.zeros((), dtype=cd, device=logps.device)
    valid = m != 0
    old = old_logps.detach().to(cd)
    diff = torch.where(valid, logps.to(cd) - old, zero)
    a = advantages.detach().to(cd)
    ratio = torch.exp(diff)
    pg_losses = -a * ratio
    pg_losses2 = -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.max(pg_losses, pg_losses2)
    extra = {}
    if sampler_logps is not None:
        wo = WeightOptions(is_mode=vllm_importance_sampling_mode, clip_min=vllm_importance_sampling_clip_min,
                           clip_max=vllm_importance_sampling_clip_max)
        acc = is_partials(cd, logps.device)
        is_ratio = policy_weights(logps.detach().to(cd), old, a, m, wo, sampler=sampler_logps.detach().to(cd), acc=acc)
        per_token = per_token * is_ratio
        extra = dict(zip(("sampler_abs_logp_diff", "is_masked_fraction", "is_weight_mean", "is_weight_max"),
                         finish_is_metrics(acc)))
    loss = masked_mean(per_token, m)
    with torch.no_grad():
        clip_frac = masked_mean((pg_losses2 > pg_losses).to(cd), m)
        approx_kl = 0.5 * masked_mean(diff * diff, m)
    return PPOPolicyOutput(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl, **extra)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   *, clip_range_value: float = 0.2) -> PPOValueOutput:
    """TRL's clipped value loss on per-token values ``[B, T]``::

        v_clipped = clamp(values, old_values - c, old_values + c)
        loss      = 0.5 * masked_mean(max((values - returns)^2, (v_clipped - returns)^2), m)
        clip_frac = masked_mean((v_clipped - returns)^2 > (values - returns)^2, m)

    ``loss`` is differentiable w.r.t. ``values``; ``old_values`` and ``returns`` are constants.
    """
    _check_2d("values", values)
    _check_pair("old_values", old_values, "values", values)
    _check_pair("returns", returns, "values", values)
    _check_pair("mask", mask, "values", values, is_float=False)
    if not clip_range_value >= 0:
        raise ValueError(f"clip_range_value must be >= 0, got {clip_range_value}")
    cd = _cd(values)
    m = mask.to(cd)
    v = values.to(cd)
    old = old_values.detach().to(cd)
    ret = returns.detach().to(cd)
    vclipped = torch.clamp(v, old - clip_range_value, old + clip_range_value)
    vf1 = torch.square(v - ret)
    vf2 = torch.square(vclipped - ret)
    loss = 0.5 * masked_mean(torch.max(vf1, vf2), m)
    with torch.no_grad():
        clip_frac = masked_mean((vf2 > vf1).to(cd), m)
    return PPOValueOutput(loss=loss, clip_frac=clip_frac)

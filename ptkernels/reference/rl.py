"""Eager definitions of the RL losses and utilities (TRL 1.16.0's semantics; verl's for REINFORCE++ and ReMax): the
spec and the test oracle.

Written the way TRL writes them (``GRPOTrainer._compute_loss``, ``GRPOTrainer._generate_and_score_completions``,
``trl.trainer.utils.masked_mean / masked_var / masked_whiten`` and the GAE loop of ``PPOTrainer.train``), with
autograd doing the derivatives. Every fused or kernel path in ``ptkernels.ops`` is tested against these in
float64. Both return the output types of ``ptkernels.types``.

Notation: ``logps``, ``old_logps``, ``ref_logps``, ``mask`` are ``[B, T]`` (B sequences of T completion tokens),
``advantages`` is ``[B]``; ``m`` is the mask, ``L_b = sum_t m[b, t]``.
"""

from __future__ import annotations

import torch

from ..types import (  # noqa: F401 - re-exported: the oracle returns the public types
    AGGREGATIONS,
    IS_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    REWARD_SCALES,
    GRPOOutput,
    PPOPolicyOutput,
    PPOValueOutput,
)
from .grpo import (  # noqa: F401 - the GRPO loss's oracle (reference/grpo.py), re-exported here
    POLICY_TERMS,
    aggregate,
    gmpo_loss,
    grpo_loss,
    grpo_normalizer,
    importance_weight_log,
    linear_grpo_loss,
    off_policy_sequence_mask,
    sampler_importance_weights,
    top_entropy_mask,
)

# --------------------------------------------------------------------------------------------------- KL


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, *, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimators (Schulman, http://joschu.net/blog/kl-approx.html):

        k1 = logp - ref
        k2 = 0.5 * (logp - ref)^2
        k3 = exp(ref - logp) - (ref - logp) - 1
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    d = logps - ref_logps
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(-d) + d - 1.0


# ------------------------------------------------------------------------------------------------- GRPO


def nanstd(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """TRL's ``trainer/utils.py: nanstd``: Bessel-corrected std of the non-NaN values, NaN when fewer than 2."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    cnt = (~torch.isnan(x)).sum(dim=dim, keepdim=True).to(x.dtype)
    s = torch.sqrt(var * torch.where(cnt > 1, cnt / (cnt - 1), torch.full_like(cnt, float("nan"))))
    if keepdim:
        return s
    return s.reshape(()) if dim is None else s.squeeze(dim)


def group_advantages(rewards: torch.Tensor, *, group_size: int, scale: str = "group", eps: float = 1e-4,
                     reward_weights: torch.Tensor | None = None,
                     multi_objective_aggregation: str = "sum_then_normalize"):
    """GRPO advantages, TRL 1.16's ``GRPOTrainer._generate_and_score_completions``, of ``rewards [N]`` or
    ``[N, R]`` (R reward functions, NaN = unscorable) laid out as consecutive groups of ``group_size``:

        unscorable = all rewards of a row NaN
        sum_then_normalize:  r = nansum_k(w_k r_k), NaN where unscorable
                             A = r - nanmean_g(r);  unless scale="none": A /= nanstd(r) + eps, nanstd over the group
                             ("group") or the batch ("batch"); the mean is always the group's
        normalize_then_sum:  r = nansum_k(w_k (r_k - nanmean_g(r_k)) / (nanstd_g(r_k) + eps)), NaN where unscorable
                             A = (r - nanmean(r)) / (nanstd(r) + eps) over the batch (scale is not used, as TRL)
        A = nan_to_num(A, 0)
    nanstd is Bessel-corrected and NaN with fewer than 2 values (so a group with one scorable member gives 0).
    """
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale must be one of {REWARD_SCALES}, got {scale!r}")
    rpf = rewards.unsqueeze(1) if rewards.dim() == 1 else rewards
    w = torch.ones(rpf.shape[1], dtype=rpf.dtype) if reward_weights is None else reward_weights
    w = w.to(device=rpf.device, dtype=rpf.dtype)
    unscorable = torch.isnan(rpf).all(dim=1)
    g = group_size
    if multi_objective_aggregation == "sum_then_normalize":
        r = (rpf * w.unsqueeze(0)).nansum(dim=1)
        r[unscorable] = float("nan")
        mean = torch.nanmean(r.view(-1, g), dim=1).repeat_interleave(g)
        if scale == "batch":
            std = nanstd(r).expand_as(r)
        else:
            std = nanstd(r.view(-1, g), dim=1).repeat_interleave(g)
        a = r - mean
        if scale != "none":
            a = a / (std + eps)
    elif multi_objective_aggregation == "normalize_then_sum":
        k = rpf.shape[1]
        grouped = rpf.view(-1, g, k)
        rk = ((grouped - torch.nanmean(grouped, dim=1, keepdim=True))
              / (nanstd(grouped, dim=1, keepdim=True) + eps)).view(-1, k)
        r = (rk * w.unsqueeze(0)).nansum(dim=1)
        r[unscorable] = float("nan")
        a = (r - torch.nanmean(r)) / (nanstd(r) + eps)
    else:
        raise ValueError(f"multi_objective_aggregation must be one of {AGGREGATIONS}, got "
                         f"{multi_objective_aggregation!r}")
    return torch.nan_to_num(a, nan=0.0)


def rloo_advantages(rewards: torch.Tensor, *, group_size: int, normalize_advantages: bool = False,
                    eps: float = 1e-4, kl: torch.Tensor | None = None, beta: float = 0.0):
    """TRL 1.16's ``RLOOTrainer`` advantages: ``r = rewards - beta * kl`` (kl: the summed per-sequence k1 KL
    ``sum_t (old - ref) m``), baseline the mean of the scorable siblings ``(nansum_g(r) - r) / (count_g - 1)``,
    ``A = r - baseline``; with ``normalize_advantages``: ``(A - nanmean(A)) / (nanstd(A) + eps)``; NaN -> 0."""
    r = rewards if kl is None or beta == 0.0 else rewards - beta * kl
    grouped = r.view(-1, group_size)
    cnt = (~torch.isnan(grouped)).sum(1, keepdim=True).to(r.dtype)
    base = (torch.nansum(grouped, 1, keepdim=True) - grouped) / (cnt - 1)
    a = r - base.reshape(-1)
    if normalize_advantages:
        a = (a - torch.nanmean(a)) / (nanstd(a) + eps)
    return torch.nan_to_num(a, nan=0.0)


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                            kl: torch.Tensor | None = None, kl_coef: float = 0.0):
    """verl's ``compute_reinforce_plus_plus_outcome_advantage`` (with ``apply_kl_penalty`` when kl is given):

        r_t = token_rewards_t - kl_coef * kl_t * m_t
        G_t = r_t + gamma * G_{t+1}, the running return reset to 0 where m_t = 0
        A = verl's masked_whiten(G, m) * m: mu = sum(G m) / (sum m + 1e-8),
            var = sum((G - mu)^2 m) / (sum m + 1e-8) * sum m / (sum m - 1),  (G - mu) * rsqrt(var + 1e-8)
    Returns ``(advantages, returns)``."""
    m = mask.to(token_rewards.dtype)
    r = token_rewards if kl is None else token_rewards - kl_coef * kl * m
    returns = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        returns[:, t] = running
        running = running * m[:, t]
    n = m.sum()
    mu = (returns * m).sum() / (n + 1e-8)
    var = ((returns - mu) ** 2 * m).sum() / (n + 1e-8) * (n / (n - 1))
    return (returns - mu) * torch.rsqrt(var + 1e-8) * m, returns


def remax_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, baseline: torch.Tensor):
    """verl's ``compute_remax_outcome_advantage``: ``returns = reverse-cumsum(r m)``, ``A = returns - b m``,
    ``b [B]`` the reward of one greedy rollout of the same prompt. Returns ``(advantages, returns)``."""
    m = mask.to(token_rewards.dtype)
    returns = (token_rewards * m).flip(-1).cumsum(-1).flip(-1)
    return returns - baseline.unsqueeze(1) * m, returns


# -------------------------------------------------------------------------------------------------- PPO


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """TRL's ``masked_mean``: ``sum(values * mask) / sum(mask)`` (over ``axis`` when given)."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """TRL's ``masked_var``: masked mean of squared deviations, times ``n / (n - 1)`` when unbiased."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(variance.dtype).sum()  # TRL: mask.sum(); a bool mask would make n / (n - 1) float32
        variance = variance * (n / (n - 1))
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """TRL's ``masked_whiten``: ``(values - mean) * rsqrt(var + 1e-8)`` (+ mean again when not shift_mean)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95):
    """Generalized advantage estimation, TRL's ``PPOTrainer`` loop on masked inputs.

        r_t, v_t = rewards * m, values * m        (v after the last valid token is 0: no bootstrap)
        delta_t  = r_t + gamma * v_{t+1} - v_t    (v_T = 0)
        A_t      = delta_t + gamma * lam * A_{t+1} (A_T = 0)
        returns  = A + v
    Both outputs are 0 where ``mask`` is 0. Returns ``(advantages, returns)``, not differentiable.
    """
    with torch.no_grad():
        m = mask.to(values.dtype)
        rewards = rewards * m
        values = values * m
        lastgaelam = 0
        advantages_reversed = []
        gen_length = rewards.shape[1]
        for t in reversed(range(gen_length)):
            nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
        return advantages * m, returns * m


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    *, clip_range: float = 0.2, sampler_logps: torch.Tensor | None = None,
                    vllm_importance_sampling_mode: str = "token_truncate",
                    vllm_importance_sampling_clip_min: float | None = None,
                    vllm_importance_sampling_clip_max: float | None = 3.0) -> PPOPolicyOutput:
    """TRL's PPO policy loss, with the sampler/trainer correction of ``sampler_importance_weights`` when
    ``sampler_logps`` is given:

        ratio = exp(logps - old_logps)
        loss = masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range)) * is_ratio, m)
        clip_frac = masked_mean(pg_losses2 > pg_losses, m);  approx_kl = 0.5 * masked_mean((logps - old)^2, m)
    """
    mask = mask.to(logps.dtype)
    logprobs_diff = logps - old_logps
    ratio = torch.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    extra = {}
    if sampler_logps is not None:
        is_ratio, mt = sampler_importance_weights(old_logps, sampler_logps, mask, mode=vllm_importance_sampling_mode,
                                                  clip_min=vllm_importance_sampling_clip_min,
                                                  clip_max=vllm_importance_sampling_clip_max)
        pg_loss_max = pg_loss_max * is_ratio
        extra = dict(sampler_abs_logp_diff=mt["abs_diff"], is_masked_fraction=mt["masked"],
                     is_weight_mean=mt["mean"], is_weight_max=mt["max"])
    loss = masked_mean(pg_loss_max, mask)
    with torch.no_grad():
        clip_frac = masked_mean((pg_losses2 > pg_losses).to(logps.dtype), mask)
        approx_kl = 0.5 * masked_mean(logprobs_diff**2, mask)
    return PPOPolicyOutput(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl, **extra)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   *, clip_range_value: float = 0.2) -> PPOValueOutput:
    """TRL's clipped value loss:

        v_clipped = clamp(values, old_values - c, old_values + c)
        loss = 0.5 * masked_mean(max((values - returns)^2, (v_clipped - returns)^2), m)
        clip_frac = masked_mean((v_clipped - returns)^2 > (values - returns)^2, m)
    """
    mask = mask.to(values.dtype)
    vpredclipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    vf_losses1 = torch.square(values - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    loss = 0.5 * masked_mean(vf_loss_max, mask)
    with torch.no_grad():
        clip_frac = masked_mean((vf_losses2 > vf_losses1).to(values.dtype), mask)
    return PPOValueOutput(loss=loss, clip_frac=clip_frac)

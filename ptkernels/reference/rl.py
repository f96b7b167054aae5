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

import dataclasses
import math

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
    w = torch.ones(rpf.shape[1], dtype=rpf.dtype) if reward_weights is None else reward_weights.to(rpf.dtype)
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
    running = torch.zeros(r.shape[0], dtype=r.dtype)
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


def grpo_normalizer(mask: torch.Tensor, loss_type: str, max_completion_length=None, num_items_in_batch=None):
    """The divisor of ``sum(per_token_loss * mask)`` in each of TRL's loss types (a scalar or ``[B]``)."""
    b, t = mask.shape
    if loss_type in ("grpo", "sapo"):
        return b * mask.sum(-1).clamp(min=1.0)
    if loss_type == "bnpo":
        return mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return b * (max_completion_length if max_completion_length is not None else t)
    if loss_type in ("dapo", "cispo", "vespo"):
        return num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1.0)
    if loss_type == "luspo":
        return b
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def top_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask`` (one process): ``thr = torch.quantile(valid entropies, 1 - quantile)``,
    ``(H m >= thr) & m``; all False when no token is valid."""
    valid = mask.bool()
    if not valid.any():
        return torch.zeros_like(valid)
    thr = torch.quantile(entropies.detach()[valid], 1.0 - quantile)
    return ((entropies.detach() * mask) >= thr) & valid


def sampler_importance_weights(old_logps, sampler_logps, mask, *, mode="sequence_mask", clip_min=None,
                               clip_max=3.0):
    """TRL 1.16's vLLM importance-sampling correction (``_generate_and_score_completions``):
    ``diff = nan_to_num((old - sampler) m, 0)``;

        token_truncate     clamp(exp(diff), clip_min, clip_max)               [B, T]   (TIS)
        token_mask         exp(diff), 0 outside [clip_min, clip_max]          [B, T]   (MIS)
        sequence_truncate  clamp(exp(sum_t diff), clip_min, clip_max)         [B, 1]
        sequence_mask      exp(sum_t diff), 0 outside [clip_min, clip_max]    [B, 1]
    A bound of None is no bound. Returns ``(ratio, metrics)``: metrics mean |diff| over valid tokens, the
    fraction of tokens (sequences) outside the bounds, the mean and max ratio over valid tokens (sequences)."""
    m = mask.to(old_logps.dtype)
    diff = torch.nan_to_num((old_logps - sampler_logps) * m, nan=0.0)
    seq = mode.startswith("sequence")
    raw = torch.exp(diff.sum(-1, keepdim=True)) if seq else torch.exp(diff)
    lo = -float("inf") if clip_min is None else clip_min
    hi = float("inf") if clip_max is None else clip_max
    outside = (raw < lo) | (raw > hi)
    ratio = raw.clamp(min=clip_min, max=clip_max) if mode.endswith("truncate") else raw.masked_fill(outside, 0.0)
    count = m.sum().clamp(min=1.0)
    if seq:
        metrics = dict(masked=outside.to(m.dtype).mean(), mean=ratio.mean(), max=ratio.max())
    else:
        sel = m != 0
        metrics = dict(masked=(outside.to(m.dtype) * m).sum() / count, mean=(ratio * m).sum() / count,
                       max=ratio[sel].max() if sel.any() else torch.zeros((), dtype=m.dtype))
    metrics["abs_diff"] = diff.abs().sum() / count
    return ratio, metrics


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    entropies: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    bias_corrected_kl: bool = True,
    top_entropy_quantile: float = 1.0,
    off_policy_mask_threshold: float | None = None,
    sampler_logps: torch.Tensor | None = None,
    vllm_importance_sampling_mode: str = "sequence_mask",
    vllm_importance_sampling_clip_min: float | None = None,
    vllm_importance_sampling_clip_max: float | None = 3.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> GRPOOutput:
    """TRL 1.16.0's ``GRPOTrainer._compute_loss`` (one process, gradient accumulation 1) on given per-token
    log-probs, line for line; ``loss_type="gmpo"`` is TRL 1.16's ``experimental/gmpo`` ``GMPOTrainer``.

        old_logps None: logps.detach();  A = advantages[:, None]
        emask = top_entropy_mask(entropies, m, q)                    when top_entropy_quantile q < 1
        keep  = (A >= 0) | (sum_t nan_to_num(s - logps.detach()) m / max(L, 1) <= thr)   OPSM, s = sampler
                                                                       logps, else old
        log_ratio = logps - old;  w = log_ratio (token) or sum_t(log_ratio m) / max(L_b, 1) [B, 1] (sequence)
        coef_1 = exp(w);  kl = k3(logps, ref) * (coef_1 if bias_corrected_kl)
        grpo, bnpo, dr_grpo, dapo, luspo: l = -min(min(coef_1, delta) A, clamp(coef_1, 1-eps_low, 1+eps_high) A)
        cispo: l = -sg(min(coef_1, eps_high)) A logps            (eps_high the raw bound)
        sapo:  l = -sigmoid(tau (coef_1 - 1)) 4 / tau A,  tau = tau_pos if A > 0 else tau_neg
        vespo: l = -phi A logps, phi = sg(exp(lam + k lw - lam e^lw)), lw = clamp(sum_t clamp(log_ratio, -20, 20) m
               (+ sum_t clamp(log is_ratio, log 1e-8, 20)), log 1e-8, 20), (k, lam) by sign(A >= 0)
        l = l * keep * emask * is_ratio (not for vespo) + beta * kl
        grpo, sapo: mean_b(sum_t l m / max(L_b, 1));  bnpo: sum l m / max(sum m, 1)
        dr_grpo: sum l m / (B max_completion_length);  dapo, cispo, vespo: sum l m / num_items_in_batch
        luspo: mean_b(sum_t l m)
        loss -= entropy_coef * sum(H m emask) / max(sum(m emask), 1)        (every loss type)
        gmpo: l_b = -exp(sum_t clip_t m emask / max(sum_t m emask, 1)) A_b + beta sum_t k3 m / max(L_b, 1),
              clip_t = min(log_ratio, clamp(log_ratio, -eps_low, eps_high)) if A > 0 else max(...); loss = mean_b
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    if old_logps is None:
        old_logps = logps.detach()
    A = advantages.unsqueeze(1)
    emask = None
    if top_entropy_quantile < 1.0:
        emask = top_entropy_mask(entropies, mask, top_entropy_quantile).to(logps.dtype)
    is_ratio, is_metrics = None, None
    if sampler_logps is not None:
        is_ratio, is_metrics = sampler_importance_weights(
            old_logps, sampler_logps, mask, mode=vllm_importance_sampling_mode,
            clip_min=vllm_importance_sampling_clip_min, clip_max=vllm_importance_sampling_clip_max)
    keep = None
    if off_policy_mask_threshold is not None:
        sampling = sampler_logps if sampler_logps is not None else old_logps
        kl_s = torch.nan_to_num(sampling - logps.detach(), nan=0.0)
        avg = (kl_s * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        keep = ((A >= 0) | (avg <= off_policy_mask_threshold)).to(logps.dtype)
    per_token_kl = None
    if ref_logps is not None:
        per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
    elif beta != 0.0:
        raise ValueError("beta != 0 needs ref_logps")
    log_ratio = logps - old_logps
    low = high = None
    if loss_type == "gmpo":
        cl = torch.clamp(log_ratio, -epsilon_low, epsilon_high)
        clipped = torch.where(A > 0, torch.minimum(log_ratio, cl), torch.maximum(log_ratio, cl))
        em = mask if emask is None else mask * emask
        pm = em if keep is None else em * keep
        coef = torch.exp((clipped * pm).sum(-1) / pm.sum(-1).clamp(min=1.0))
        per_seq = -coef * advantages
        if beta != 0.0:
            per_seq = per_seq + beta * (per_token_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        loss = per_seq.mean()
    else:
        if importance_sampling_level == "token":
            liw = log_ratio
        elif importance_sampling_level == "sequence":
            liw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        else:
            raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, "
                             f"got {importance_sampling_level!r}")
        coef_1 = torch.exp(liw)
        if per_token_kl is not None and bias_corrected_kl:
            per_token_kl = per_token_kl * coef_1
        if loss_type == "cispo":
            per_token_loss = -torch.clamp(coef_1, max=epsilon_high).detach() * A * logps
            high = (coef_1 > epsilon_high) & (A > 0)
        elif loss_type == "sapo":
            tau = torch.where(A > 0, torch.full_like(A, sapo_temperature_pos), torch.full_like(A, sapo_temperature_neg))
            per_token_loss = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * A
        elif loss_type == "vespo":
            with torch.no_grad():
                lower = math.log(1e-8)
                slr = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
                if is_ratio is not None:
                    slr = slr + torch.clamp(torch.log(is_ratio), lower, 20.0).sum(-1, keepdim=True)
                lw = torch.clamp(slr, lower, 20.0)
                nonneg = A >= 0
                k = torch.where(nonneg, torch.full_like(A, vespo_k_pos), torch.full_like(A, vespo_k_neg))
                lam = torch.where(nonneg, torch.full_like(A, vespo_lambda_pos),
                                  torch.full_like(A, vespo_lambda_neg)).clamp(min=1e-4)
                phi = torch.exp(lam + k * lw - lam * torch.exp(lw)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            per_token_loss = -phi * A * logps
        else:
            coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
            if delta is not None:
                coef_1 = torch.clamp(coef_1, max=delta)
            per_token_loss = -torch.min(coef_1 * A, coef_2 * A)
            low = (coef_1 < 1 - epsilon_low) & (A < 0)
            high = (coef_1 > 1 + epsilon_high) & (A > 0)
        if keep is not None:
            per_token_loss = per_token_loss * keep
        if emask is not None:
            per_token_loss = per_token_loss * emask
        if is_ratio is not None and loss_type != "vespo":
            per_token_loss = per_token_loss * is_ratio
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * per_token_kl
        per_token_loss = per_token_loss.expand_as(mask)
        if loss_type in ("grpo", "sapo"):
            loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        elif loss_type == "luspo":
            loss = (per_token_loss * mask).sum(-1).mean()
        else:
            loss = (per_token_loss * mask).sum() / grpo_normalizer(mask, loss_type, max_completion_length,
                                                                     num_items_in_batch)
    ent = None
    if entropy_coef != 0.0:
        eff = mask if emask is None else mask * emask
        loss = loss - entropy_coef * (entropies * eff).sum() / eff.sum().clamp(min=1.0)
    count = mask.sum().clamp(min=1.0)
    seq_metrics = importance_sampling_level == "sequence" and loss_type != "gmpo"

    def masked_batch_mean(x):
        if seq_metrics and x.shape[1] == 1:
            return x.mean()
        return (x.expand_as(mask) * mask).sum() / count

    with torch.no_grad():
        zero = torch.zeros((), dtype=logps.dtype)
        kl = masked_batch_mean(per_token_kl) if per_token_kl is not None else zero
        low_m = masked_batch_mean(low.to(logps.dtype)) if low is not None else zero
        high_m = masked_batch_mean(high.to(logps.dtype)) if high is not None else zero
        region = masked_batch_mean((low | high).to(logps.dtype)) if low is not None else high_m
        if entropies is not None:
            ent = (entropies.detach() * mask).sum() / count
        extra = {}
        if is_metrics is not None:
            extra = dict(sampler_abs_logp_diff=is_metrics["abs_diff"], is_masked_fraction=is_metrics["masked"],
                         is_weight_mean=is_metrics["mean"], is_weight_max=is_metrics["max"])
        return GRPOOutput(loss=loss, kl=kl, clip_ratio=region, clip_ratio_low=low_m, clip_ratio_high=high_m,
                          entropy=ent, **extra)


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    **options,
) -> GRPOOutput:
    """``grpo_loss`` on log-probs from the full logits ``hidden [B, T, D] @ weight.T (+ bias)``, divided by the
    temperature (``hidden[b, t]`` predicts ``completion_ids[b, t]``); entropies (differentiable) as TRL's
    ``entropy_from_logits`` of the same tempered logits. ``options``: those of ``grpo_loss``."""
    from .cross_entropy import linear_token_logprobs

    logps, entropies = linear_token_logprobs(hidden, weight, completion_ids, bias=bias, temperature=temperature,
                                             return_entropy=True)
    out = grpo_loss(logps, old_logps, advantages, completion_mask, entropies=entropies, **options)
    if not (return_entropy or options.get("entropy_coef", 0.0) != 0.0):
        out = dataclasses.replace(out, entropy=None)
    return out


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

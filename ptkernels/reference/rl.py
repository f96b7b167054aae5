"""Eager definitions of the RL losses and utilities (TRL's semantics): the spec and the test oracle.

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


def group_advantages(rewards: torch.Tensor, *, group_size: int, scale: str = "group", eps: float = 1e-4):
    """GRPO advantages of ``rewards [N]`` laid out as consecutive groups of ``group_size`` completions.

        A_i = (r_i - mean_g(r)) / (std + eps)     scale="group": std = std_g(r), Bessel-corrected (torch.std)
                                                   scale="batch": std = std(r) over the whole batch
        A_i =  r_i - mean_g(r)                     scale="none"
    A std of a single value (group_size 1, or N 1 with "batch") counts as 0, as TRL does.
    """
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale must be one of {REWARD_SCALES}, got {scale!r}")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    adv = rewards - mean
    if scale == "none":
        return adv
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    else:
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return adv / (std + eps)


def grpo_normalizer(mask: torch.Tensor, loss_type: str, max_completion_length=None, num_items_in_batch=None):
    """The divisor of ``sum(per_token_loss * mask)`` in each of TRL's loss types (a scalar or ``[B]``)."""
    b, t = mask.shape
    if loss_type == "grpo":
        return b * mask.sum(-1).clamp(min=1.0)
    if loss_type == "bnpo":
        return mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return b * (max_completion_length if max_completion_length is not None else t)
    if loss_type == "dapo":
        return num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1.0)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


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
) -> GRPOOutput:
    """TRL's ``GRPOTrainer._compute_loss`` on given per-token log-probs, line for line.

        log_ratio = logps - old_logps                           (old_logps=None: logps.detach())
        w = log_ratio                                           importance_sampling_level="token"
        w = sum_t(log_ratio * m) / clamp(L_b, 1)  [B, 1]        "sequence" (GSPO)
        coef_1 = exp(w);  coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high)
        coef_1 = clamp(coef_1, max=delta)                       when delta is set (two-sided GRPO)
        per_token_loss = -min(coef_1 * A, coef_2 * A) + beta * k3(logps, ref_logps)
                         - entropy_coef * entropies             (entropy bonus, not in TRL; see below)
        grpo:    mean_b( sum_t(l * m) / clamp(L_b, 1) )
        bnpo:    sum(l * m) / clamp(sum(m), 1)
        dr_grpo: sum(l * m) / (B * max_completion_length)       (default max_completion_length: T)
        dapo:    sum(l * m) / num_items_in_batch                (default: clamp(sum(m), 1))

    Metrics as TRL logs them: ``kl`` = masked mean of k3, clip ratios = masked mean of the indicators
    (token level) or plain mean over sequences (sequence level). The entropy bonus adds
    ``-entropy_coef * H_t`` to each token's loss before aggregation (verl's convention).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    if old_logps is None:
        old_logps = logps.detach()
    per_token_kl = None
    if ref_logps is not None:
        per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
    elif beta != 0.0:
        raise ValueError("beta != 0 needs ref_logps")
    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    else:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {importance_sampling_level!r}")
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss1 = coef_1 * advantages.unsqueeze(1)
    per_token_loss2 = coef_2 * advantages.unsqueeze(1)
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if entropy_coef != 0.0:
        per_token_loss = per_token_loss - entropy_coef * entropies
    per_token_loss = per_token_loss.expand_as(mask)
    normalizer = grpo_normalizer(mask, loss_type, max_completion_length, num_items_in_batch)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    else:
        loss = (per_token_loss * mask).sum() / normalizer

    count = mask.sum().clamp(min=1.0)

    def masked_batch_mean(x):
        if importance_sampling_level == "sequence" and x.shape[1] == 1:
            return x.mean()
        return (x * mask).sum() / count

    with torch.no_grad():
        kl = masked_batch_mean(per_token_kl) if per_token_kl is not None else torch.zeros((), dtype=logps.dtype)
        low = (coef_1 < 1 - epsilon_low) & (advantages.unsqueeze(1) < 0)
        high = (coef_1 > 1 + epsilon_high) & (advantages.unsqueeze(1) > 0)
        region = low | high
        ent = masked_batch_mean(entropies.detach()) if entropies is not None else None
        return GRPOOutput(loss=loss, kl=kl, clip_ratio=masked_batch_mean(region.to(logps.dtype)),
                          clip_ratio_low=masked_batch_mean(low.to(logps.dtype)),
                          clip_ratio_high=masked_batch_mean(high.to(logps.dtype)), entropy=ent)


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    return_entropy: bool = False,
) -> GRPOOutput:
    """``grpo_loss`` on log-probs from the full logits ``hidden [B, T, D] @ weight.T (+ bias)``, divided by the
    temperature (``hidden[b, t]`` predicts ``completion_ids[b, t]``); entropies as TRL's
    ``entropy_from_logits`` of the same tempered logits."""
    from .cross_entropy import linear_token_logprobs

    want_entropy = return_entropy or entropy_coef != 0.0
    out = linear_token_logprobs(hidden, weight, completion_ids, bias=bias, temperature=temperature,
                                return_entropy=want_entropy)
    logps, entropies = out if want_entropy else (out, None)
    return grpo_loss(logps, old_logps, advantages, completion_mask, ref_logps=ref_logps, beta=beta,
                     epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
                     importance_sampling_level=importance_sampling_level,
                     max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
                     entropies=entropies, entropy_coef=entropy_coef)


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
                    *, clip_range: float = 0.2) -> PPOPolicyOutput:
    """TRL's PPO policy loss:

        ratio = exp(logps - old_logps)
        loss = masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range)), m)
        clip_frac = masked_mean(pg_losses2 > pg_losses, m);  approx_kl = 0.5 * masked_mean((logps - old)^2, m)
    """
    mask = mask.to(logps.dtype)
    logprobs_diff = logps - old_logps
    ratio = torch.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    loss = masked_mean(pg_loss_max, mask)
    with torch.no_grad():
        clip_frac = masked_mean((pg_losses2 > pg_losses).to(logps.dtype), mask)
        approx_kl = 0.5 * masked_mean(logprobs_diff**2, mask)
    return PPOPolicyOutput(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl)


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

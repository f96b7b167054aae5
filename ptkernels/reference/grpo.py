"""Eager definition of the GRPO-family loss (TRL 1.16.0's ``GRPOTrainer._compute_loss``, its experimental
``GMPOTrainer``): the spec and the test oracle of ``ptkernels.grpo_loss`` / ``fused_linear_grpo_loss``, with
autograd doing the derivatives. The policy term of each loss type is one small function (``POLICY_TERMS``);
``ptkernels.reference.rl`` re-exports everything here.

Notation: ``logps``, ``old_logps``, ``ref_logps``, ``mask`` are ``[B, T]`` (B sequences of T completion tokens),
``advantages`` is ``[B]``; ``m`` is the mask, ``L_b = sum_t m[b, t]``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..types import IS_LEVELS, LOSS_TYPES, GRPOOutput


def grpo_normalizer(mask: torch.Tensor, loss_type: str, max_completion_length=None, num_items_in_batch=None):
    """The divisor of ``sum(per_token_loss * mask)`` in each of TRL's loss types (a scalar or ``[B]``)."""
    b, t = mask.shape
    if loss_type in ("grpo", "sapo"):
        return b * mask.sum(-1).clamp(min=1.0)
    if loss_type == "bnpo":
        return mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return b * (max_completion_length if max_completion_length is not None else t)
    if loss_type in ("dapo", "cispo", "vespo", "clip_cov", "kl_cov"):
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
    A bound of None is no bound. Returns ``(ratio, metrics)``: metrics the mean |old - sampler| over the valid
    tokens whose difference is not NaN (TRL 1.16 leaves the tokens the sampler could not score out of both sums;
    0 when none is left), the fraction of tokens (sequences) outside the bounds, the mean and max ratio over
    valid tokens (sequences; a NaN token counts there, with diff 0, as TRL)."""
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
                       max=ratio[sel].max() if sel.any() else torch.zeros((), dtype=m.dtype, device=m.device))
    scored = torch.where(torch.isnan(old_logps - sampler_logps), torch.zeros_like(m), m)
    metrics["abs_diff"] = diff.abs().sum() / scored.sum().clamp(min=1.0)
    return ratio, metrics


def off_policy_sequence_mask(logps, sampling_logps, A, mask, threshold):
    """TRL 1.16's OPSM: ``keep = (A >= 0) | (sum_t nan_to_num(s - logps.detach()) m / max(L, 1) <= threshold)``;
    None when ``threshold`` is None (the option is off)."""
    if threshold is None:
        return None
    kl_s = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    avg = (kl_s * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((A >= 0) | (avg <= threshold)).to(logps.dtype)


def importance_weight_log(log_ratio, mask, level: str):
    """``log_ratio`` (token) or its masked sequence mean ``[B, 1]`` (sequence, GSPO)."""
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {level!r}")


def gmpo_loss(log_ratio, advantages, mask, emask, per_token_kl, beta, epsilon_low, epsilon_high):
    """TRL 1.16's ``GMPOTrainer``: mean_b of ``-exp(sum_t clip_t m e / max(sum_t m e, 1)) A_b`` (+ beta times
    the sequence mean k3), ``clip_t`` the log-ratio clipped into [-eps_low, eps_high] on A's side. No entropy
    bonus, off-policy mask or sampler correction: TRL's GMPO has none (``check_gmpo_options``)."""
    A = advantages.unsqueeze(1)
    cl = torch.clamp(log_ratio, -epsilon_low, epsilon_high)
    clipped = torch.where(A > 0, torch.minimum(log_ratio, cl), torch.maximum(log_ratio, cl))
    em = mask if emask is None else mask * emask
    coef = torch.exp((clipped * em).sum(-1) / em.sum(-1).clamp(min=1.0))
    per_seq = -coef * advantages
    if beta != 0.0:
        per_seq = per_seq + beta * (per_token_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_seq.mean()


# The policy term of each loss type: (coef_1, A, logps, log_ratio, mask, is_ratio, o) -> (per-token loss, low,
# high), low / high the clip indicators (None: the type has none).

def _clipped(coef_1, A, logps, log_ratio, mask, is_ratio, o):
    coef_2 = torch.clamp(coef_1, 1 - o["epsilon_low"], 1 + o["epsilon_high"])
    if o["delta"] is not None:
        coef_1 = torch.clamp(coef_1, max=o["delta"])
    low = (coef_1 < 1 - o["epsilon_low"]) & (A < 0)
    high = (coef_1 > 1 + o["epsilon_high"]) & (A > 0)
    return -torch.min(coef_1 * A, coef_2 * A), low, high


def _cispo(coef_1, A, logps, log_ratio, mask, is_ratio, o):
    high = (coef_1 > o["epsilon_high"]) & (A > 0)
    return -torch.clamp(coef_1, max=o["epsilon_high"]).detach() * A * logps, None, high


def _sapo(coef_1, A, logps, log_ratio, mask, is_ratio, o):
    tau = torch.where(A > 0, torch.full_like(A, o["tau_pos"]), torch.full_like(A, o["tau_neg"]))
    return -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * A, None, None


def _vespo(coef_1, A, logps, log_ratio, mask, is_ratio, o):
    k_pos, lam_pos, k_neg, lam_neg = o["vespo"]
    with torch.no_grad():
        lower = math.log(1e-8)
        slr = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
        if is_ratio is not None:
            slr = slr + torch.clamp(torch.log(is_ratio), lower, 20.0).sum(-1, keepdim=True)
        lw = torch.clamp(slr, lower, 20.0)
        nonneg = A >= 0
        k = torch.where(nonneg, torch.full_like(A, k_pos), torch.full_like(A, k_neg))
        lam = torch.where(nonneg, torch.full_like(A, lam_pos), torch.full_like(A, lam_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * lw - lam * torch.exp(lw)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * A * logps, None, None


def _clip_cov(coef_1, A, logps, log_ratio, mask, is_ratio, o):
    loss, low, high = _clipped(coef_1, A, logps, log_ratio, mask, is_ratio, o)
    return loss * (1.0 - o["sel"]), low, high  # verl's corr: 0 on the selected tokens


def _kl_cov(coef_1, A, logps, log_ratio, mask, is_ratio, o):
    return -A * coef_1 + o["kl_cov_coef"] * o["sel"] * log_ratio.abs(), None, None  # no clip (verl)


POLICY_TERMS = {"grpo": _clipped, "bnpo": _clipped, "dr_grpo": _clipped, "dapo": _clipped, "luspo": _clipped,
                "cispo": _cispo, "sapo": _sapo, "vespo": _vespo, "clip_cov": _clip_cov, "kl_cov": _kl_cov}


def verl_masked_mean(x, mask):
    """verl's ``masked_mean``: ``sum(x m) / (sum(m) + 1e-8)``."""
    return (x * mask).sum() / (mask.sum() + 1e-8)


def clip_cov_selection(logps, old_logps, A, mask, *, epsilon_low, epsilon_high, ratio, lb, ub, generator=None):
    """verl's ``compute_policy_loss_clip_cov`` token choice, 1 where ``corr = 0`` (the gradient is cut)::

        cov = (A - masked_mean(A, m)) * (logp - masked_mean(logp.detach(), m))
        candidates: m != 0, not already clipped (-A clamp(r, 1-eps_low, 1+eps_high) > -A r), lb < cov < ub
        clip_num = max(int(ratio * sum(m)), 1) of them, chosen by torch.randperm(#candidates, generator)
    """
    with torch.no_grad():
        lp, A = logps.detach(), A.expand_as(mask)
        r = torch.exp(lp - old_logps)
        pg1, pg2 = -A * r, -A * torch.clamp(r, 1 - epsilon_low, 1 + epsilon_high)
        valid = mask != 0
        cov = (A - verl_masked_mean(A, mask)) * (lp - verl_masked_mean(lp, mask))
        cov = cov.masked_fill(~valid | ((pg2 > pg1) & valid), -math.inf)
        clip_num = max(int(ratio * mask.sum().item()), 1)
        idx = torch.nonzero((cov < ub) & (cov > lb) & valid)
        sel = torch.zeros_like(mask)
        if len(idx) > 0:
            perm = torch.randperm(len(idx), generator=generator,  # on the generator's device (CPU without one)
                                  device=generator.device if generator is not None else "cpu")
            idx = idx[perm[: min(clip_num, len(idx))].to(idx.device)]
            sel[idx[:, 0], idx[:, 1]] = 1.0
        return sel


def kl_cov_selection(logps, A, mask, *, ratio):
    """verl's ``compute_policy_loss_kl_cov`` token choice, 1 on the top-``max(1, int(N ratio))`` valid tokens
    (N of them) by ``cov = (A - mean A)(logp - mean logp)`` (plain means over the valid tokens; torch.topk);
    none when ``ratio`` is 0 or no token is valid (verl's ``k = min(ratio, N)`` test)."""
    with torch.no_grad():
        valid = mask != 0
        sel = torch.zeros_like(mask)
        vidx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
        if ratio == 0 or len(vidx) == 0:
            return sel
        va, vl = A.expand_as(mask)[valid], logps.detach()[valid]
        cov = (va - va.mean()) * (vl - vl.mean())
        top = vidx[torch.topk(cov, max(1, int(len(cov) * ratio)), largest=True).indices]
        sel.view(-1)[top] = 1.0
        return sel


def cov_selection(loss_type, logps, old_logps, A, mask, epsilon_low, epsilon_high, clip_cov_ratio, clip_cov_lb,
                  clip_cov_ub, kl_cov_ratio, generator):
    """The selection of ``loss_type`` clip_cov / kl_cov (None for the other types)."""
    if loss_type == "clip_cov":
        return clip_cov_selection(logps, old_logps, A, mask, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                                  ratio=clip_cov_ratio, lb=clip_cov_lb, ub=clip_cov_ub, generator=generator)
    if loss_type == "kl_cov":
        return kl_cov_selection(logps, A, mask, ratio=kl_cov_ratio)
    return None


def k3_to_reference(logps, ref_logps, beta):
    """Per-token k3 = exp(ref - logp) - (ref - logp) - 1 (None without ``ref_logps``)."""
    if ref_logps is None:
        if beta != 0.0:
            raise ValueError("beta != 0 needs ref_logps")
        return None
    return torch.exp(ref_logps - logps) - (ref_logps - logps) - 1


def check_gmpo_options(loss_type, entropy_coef, off_policy_mask_threshold, sampler_logps) -> None:
    """TRL 1.16's ``GMPOTrainer._compute_loss`` reads no entropy bonus, off-policy mask or sampler correction:
    ``loss_type="gmpo"`` refuses them (ValueError) rather than define a loss TRL does not have."""
    if loss_type != "gmpo":
        return
    if entropy_coef != 0.0:
        raise ValueError(f"loss_type='gmpo' has no entropy bonus (TRL 1.16's GMPOTrainer): entropy_coef must be 0, "
                         f"got {entropy_coef}")
    if off_policy_mask_threshold is not None:
        raise ValueError("loss_type='gmpo' has no off-policy sequence mask (TRL 1.16's GMPOTrainer): "
                         f"off_policy_mask_threshold must be None, got {off_policy_mask_threshold}")
    if sampler_logps is not None:
        raise ValueError("loss_type='gmpo' takes no sampler_logps (TRL's GMPOTrainer has no importance-sampling "
                         "correction)")


def entropy_bonus(loss, entropies, mask, emask, entropy_coef):
    """``loss - entropy_coef * sum(H m emask) / max(sum(m emask), 1)`` (TRL 1.16's GRPOTrainer, every loss type
    but gmpo, which refuses it)."""
    if entropy_coef == 0.0:
        return loss
    eff = mask if emask is None else mask * emask
    return loss - entropy_coef * (entropies * eff).sum() / eff.sum().clamp(min=1.0)


def aggregate(per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch):
    """The loss type's reduction of ``per_token_loss * mask`` (see ``grpo_loss``)."""
    if loss_type in ("grpo", "sapo"):
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "luspo":
        return (per_token_loss * mask).sum(-1).mean()
    return (per_token_loss * mask).sum() / grpo_normalizer(mask, loss_type, max_completion_length,
                                                             num_items_in_batch)


def grpo_output(loss, mask, per_token_kl, low, high, entropies, is_metrics, seq_metrics: bool,
                sel=None) -> GRPOOutput:
    """The output with TRL's logged metrics: masked batch means (over sequences for GSPO's [B, 1] values)."""
    count = mask.sum().clamp(min=1.0)

    def masked_batch_mean(x):
        if seq_metrics and x.shape[1] == 1:
            return x.mean()
        return (x.expand_as(mask) * mask).sum() / count

    with torch.no_grad():
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        kl = masked_batch_mean(per_token_kl) if per_token_kl is not None else zero
        low_m = masked_batch_mean(low.to(loss.dtype)) if low is not None else zero
        high_m = masked_batch_mean(high.to(loss.dtype)) if high is not None else zero
        region = masked_batch_mean((low | high).to(loss.dtype)) if low is not None else high_m
        ent = (entropies.detach() * mask).sum() / count if entropies is not None else None
        extra = {}
        if is_metrics is not None:
            extra = dict(sampler_abs_logp_diff=is_metrics["abs_diff"], is_masked_fraction=is_metrics["masked"],
                         is_weight_mean=is_metrics["mean"], is_weight_max=is_metrics["max"])
        if sel is not None:
            extra["cov_selected_fraction"] = (sel * mask).sum() / count
        return GRPOOutput(loss=loss, kl=kl, clip_ratio=region, clip_ratio_low=low_m, clip_ratio_high=high_m,
                          entropy=ent, **extra)


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
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 2e-4,
    kl_cov_coef: float = 0.1,
    generator: torch.Generator | None = None,
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
        loss -= entropy_coef * sum(H m emask) / max(sum(m emask), 1)        (every loss type but gmpo)
        gmpo: l_b = -exp(sum_t clip_t m emask / max(sum_t m emask, 1)) A_b + beta sum_t k3 m / max(L_b, 1),
              clip_t = min(log_ratio, clamp(log_ratio, -eps_low, eps_high)) if A > 0 else max(...); loss = mean_b;
              no entropy bonus, keep or is_ratio (TRL's GMPOTrainer has none): entropy_coef != 0,
              off_policy_mask_threshold or sampler_logps raise ValueError
        clip_cov, kl_cov: verl's ``compute_policy_loss_clip_cov`` / ``_kl_cov`` (``clip_cov_selection``,
              ``kl_cov_selection``), normalized as dapo:
              clip_cov: l = -min(coef_1 A, clamp(coef_1, 1-eps_low, 1+eps_high) A) * (1 - sel)
              kl_cov:   l = -coef_1 A + kl_cov_coef * sel * |logps - old|
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    check_gmpo_options(loss_type, entropy_coef, off_policy_mask_threshold, sampler_logps)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    if old_logps is None:
        old_logps = logps.detach()
    A = advantages.unsqueeze(1)
    emask = top_entropy_mask(entropies, mask, top_entropy_quantile).to(logps.dtype) \
        if top_entropy_quantile < 1.0 else None
    is_ratio, is_metrics = None, None
    if sampler_logps is not None:
        is_ratio, is_metrics = sampler_importance_weights(
            old_logps, sampler_logps, mask, mode=vllm_importance_sampling_mode,
            clip_min=vllm_importance_sampling_clip_min, clip_max=vllm_importance_sampling_clip_max)
    keep = off_policy_sequence_mask(logps, sampler_logps if sampler_logps is not None else old_logps, A, mask,
                                    off_policy_mask_threshold)
    per_token_kl = k3_to_reference(logps, ref_logps, beta)
    log_ratio = logps - old_logps
    sel = cov_selection(loss_type, logps, old_logps, A, mask, epsilon_low, epsilon_high, clip_cov_ratio, clip_cov_lb,
                        clip_cov_ub, kl_cov_ratio, generator)
    low = high = None
    if loss_type == "gmpo":
        loss = gmpo_loss(log_ratio, advantages, mask, emask, per_token_kl, beta, epsilon_low, epsilon_high)
    else:
        coef_1 = torch.exp(importance_weight_log(log_ratio, mask, importance_sampling_level))
        if per_token_kl is not None and bias_corrected_kl:
            per_token_kl = per_token_kl * coef_1
        o = dict(epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, tau_pos=sapo_temperature_pos,
                 tau_neg=sapo_temperature_neg, vespo=(vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg),
                 sel=sel, kl_cov_coef=kl_cov_coef)
        per_token_loss, low, high = POLICY_TERMS[loss_type](coef_1, A, logps, log_ratio, mask, is_ratio, o)
        for w in (keep, emask, is_ratio if loss_type != "vespo" else None):
            if w is not None:
                per_token_loss = per_token_loss * w
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * per_token_kl
        loss = aggregate(per_token_loss.expand_as(mask), mask, loss_type, max_completion_length, num_items_in_batch)
    loss = entropy_bonus(loss, entropies, mask, emask, entropy_coef)
    seq_metrics = importance_sampling_level == "sequence" and loss_type != "gmpo"
    return grpo_output(loss, mask, per_token_kl, low, high, entropies, is_metrics, seq_metrics, sel)


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

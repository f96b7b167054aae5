"""GRPO family: group-relative advantages and the loss on per-token log-probs (TRL 1.16.0's semantics).

``grpo_loss`` computes, per token, the loss type's policy term (clipped ratio, CISPO, SAPO, VESPO, GMPO), the
k3 KL to the reference (optionally bias-corrected), the clip indicators and the derivative d loss / d logp in one
pass (the Triton kernel ``ptkernels/kernels/grpo.py`` or the same math in PyTorch ops), with the loss type's
normalizer folded into a per-token weight that is known before the pass:

    grpo, sapo, gmpo  1 / (B * max(L_b, 1))     bnpo  1 / max(sum L, 1)     luspo  1 / B
    dr_grpo  1 / (B * max_completion_length)    dapo, cispo, vespo, clip_cov, kl_cov  1 / num_items_in_batch
                                                (default 1 / max(sum L, 1))

and the policy term's per-token weights (sampler IS ratio, off-policy mask, top-entropy mask, VESPO's phi;
``grpo_weights.py``; Clip-Cov / KL-Cov's token selection, ``grpo_cov.py``) computed before it, so the loss is a
plain sum of per-row partial sums and the gradient is ready after the forward pass (backward only scales it by
the incoming scalar gradient). The same row function is the loss half of ``fused_linear_grpo_loss``. Argument
checks: ``grpo_checks.py``; the batch-level normalizers, masks and metrics: ``grpo_terms.py``.
"""

from __future__ import annotations

import math

import torch

from ..reference import rl as ref_rl
from ..types import AGGREGATIONS, REWARD_SCALES, GRPOOutput, compute_dtype
from . import backends
from .backends.base import GRPOParams
from .core.checks import check_float
from .core.dispatch import resolve_backend
from .core.grad_mode import for_autograd
from .grpo_checks import check_advantages, check_loss_options, check_mask, check_token_floats, loss_options
from .grpo_cov import cov_selection, policy_token_weight, selected_fraction, with_kl_cov
from .grpo_terms import entropy_terms, finish_metrics, make_output, row_normalizers, top_entropy_mask
from .grpo_weights import is_partials, policy_weights

__all__ = ["GRPOOutput", "grpo_loss", "group_advantages", "top_entropy_mask"]


# ------------------------------------------------------------------------------------------ advantages


def group_advantages(rewards: torch.Tensor, *, group_size: int, scale: str = "group", eps: float = 1e-4,
                     reward_weights=None, multi_objective_aggregation: str = "sum_then_normalize",
                     backend: str = "auto"):
    """GRPO advantages of ``rewards [N]`` (or ``[N, R]``: R reward functions) laid out as N / group_size
    consecutive groups (TRL's layout: the completions of one prompt are adjacent), TRL 1.16.0's
    ``GRPOTrainer._generate_and_score_completions``:

        scale="group":  A_i = (r_i - mean_g) / (std_g + eps)     std_g Bessel-corrected, as torch.std
        scale="batch":  A_i = (r_i - mean_g) / (std + eps)       std over the whole batch (TRL's "batch")
        scale="none":   A_i =  r_i - mean_g                       (Dr. GRPO: no std division, TRL's
                                                                   scale_rewards=False / "none")

    Unscorable rewards (NaN; TRL's reward function returning None) are left out of the statistics (nanmean,
    Bessel nanstd, which is NaN below 2 values) and every NaN advantage becomes 0 (TRL's ``nan_to_num``): the
    unscorable rows, a group with a single scorable member, an all-NaN group. A group whose rewards are all
    equal gives exactly 0.

    Several reward functions, ``rewards [N, R]`` with ``reward_weights [R]`` (default ones), TRL's
    ``multi_objective_aggregation``:
        "sum_then_normalize" (TRL's default): r = nansum_k(w_k r_k) (NaN when the whole row is NaN), then the above.
        "normalize_then_sum": each function normalized in its group, (r_k - nanmean_g) / (nanstd_g + eps), then
            r = nansum_k(w_k .) and A = (r - nanmean(r)) / (nanstd(r) + eps) over the batch; ``scale`` is not
            used (as TRL).

    Returns fp32 (fp64 for fp64 input); not differentiable. ``group_size`` must divide N. ``backend``: "native"
    (csrc/ kernels: C++ on CPU, CUDA for fp32 on GPU, for finite 1-D rewards; NaN takes the PyTorch ops, after
    one host check), "reference", or "torch" / "triton" (PyTorch ops on the device: O(N) work with no Triton
    kernel of its own); "auto" picks the native kernels on CPU when they are built. The multi-reward
    aggregation itself is PyTorch ops on every backend.
    """
    check_float("rewards", rewards)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [N] or [N, R], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the number of rewards {rewards.shape[0]}")
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale must be one of {REWARD_SCALES}, got {scale!r}")
    if multi_objective_aggregation not in AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation must be one of {', '.join(AGGREGATIONS)}; "
                         f"got {multi_objective_aggregation!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    n_funcs = rewards.shape[1] if rewards.dim() == 2 else 1
    cd = compute_dtype(rewards.dtype)
    if reward_weights is not None:
        reward_weights = torch.as_tensor(reward_weights, dtype=cd, device=rewards.device)
        if tuple(reward_weights.shape) != (n_funcs,):
            raise ValueError(f"reward_weights has shape {tuple(reward_weights.shape)} but rewards implies "
                             f"({n_funcs},): one weight per reward function")
    name = resolve_backend(backend, rewards.device)
    if name == "reference":
        return ref_rl.group_advantages(rewards.detach().to(cd), group_size=group_size, scale=scale, eps=eps,
                                       reward_weights=reward_weights,
                                       multi_objective_aggregation=multi_objective_aggregation)
    with torch.no_grad():
        r = rewards.detach().to(cd)
        if r.dim() == 1 and (reward_weights is not None or multi_objective_aggregation == "normalize_then_sum"):
            r = r.unsqueeze(1)
        if r.dim() == 2:
            w = reward_weights if reward_weights is not None else torch.ones(n_funcs, dtype=cd, device=r.device)
            unscorable = torch.isnan(r).all(dim=1)
            nan = torch.full((), math.nan, dtype=cd, device=r.device)
            if multi_objective_aggregation == "normalize_then_sum":
                per = torch.stack([backends.get("torch", "group_advantages")(
                    torch.where(torch.isnan(r[:, k]), nan, r[:, k]), group_size, "group", float(eps))
                    for k in range(n_funcs)], dim=1)
                per = torch.where(torch.isnan(r), nan, per)  # nansum leaves the unscorable terms out
                total = torch.where(unscorable, nan, (per * w).nansum(dim=1))
                return backends.get("torch", "group_advantages")(total, total.shape[0], "group", float(eps))
            r = torch.where(unscorable, nan, (r * w).nansum(dim=1))
        return backends.get(name, "group_advantages")(r, group_size, scale, float(eps))


# ------------------------------------------------------------------------------------------ autograd


class GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, old, ref, adv, mask, norm, pw, p: GRPOParams, rows_fn):
        cd = compute_dtype(logps.dtype)
        lp = logps.detach().to(cd)
        old = lp if old is None else old.detach().to(cd)
        ref = ref.detach().to(cd) if ref is not None else None
        want_grad = ctx.needs_input_grad[0]
        out = rows_fn(lp, old, ref, mask, adv.unsqueeze(1), norm.unsqueeze(1), p, want_grad, pw=pw)
        ctx.grad = out.grad
        ctx.dtype = logps.dtype
        kl, region, low, high = finish_metrics(out.kl.sum(), out.low.sum(), out.high.sum(), out.region.sum(),
                                               mask.sum(), mask.shape[0], p.seq_level)
        metrics = (kl, region, low, high)
        ctx.mark_non_differentiable(*metrics)
        return (out.loss.sum(), *metrics)

    @staticmethod
    def backward(ctx, g_loss, *unused):
        grad = ctx.grad
        ctx.grad = None
        if grad is None or g_loss is None:
            return (None,) * 9
        return (grad * g_loss).to(ctx.dtype), None, None, None, None, None, None, None, None


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
    bias_corrected_kl: bool = True,
    entropies: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
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
    backend: str = "auto",
) -> GRPOOutput:
    """GRPO-family loss on per-token log-probs ``[B, T]``: TRL 1.16.0's ``GRPOTrainer._compute_loss`` (and its
    experimental ``GMPOTrainer`` for ``loss_type="gmpo"``), with TRL 1.16's defaults.

    With m = mask, L_b = sum_t m[b, t], A = advantages [B], eps_high defaulting to eps_low::

        log_ratio = logps - old_logps                                  (old_logps None: logps.detach())
        w = log_ratio                                  importance_sampling_level="token"
        w_b = sum_t(log_ratio * m) / max(L_b, 1)       "sequence" (GSPO: one ratio per sequence)
        coef_1 = exp(w);  kl_t = k3 = exp(ref - logp) - (ref - logp) - 1, times coef_1 when bias_corrected_kl
        policy term P_t by loss type:
          grpo, bnpo, dr_grpo, dapo, luspo:  -min(min(coef_1, delta) A, clamp(coef_1, 1 - eps_low, 1 + eps_high) A)
          cispo:  -sg(min(coef_1, eps_high)) A logp       (eps_high is the raw cap, TRL's; it recommends 5.0)
          sapo:   -sigmoid(tau (coef_1 - 1)) 4 A / tau,  tau = sapo_temperature_pos if A > 0 else _neg
          vespo:  -phi_b A logp,  phi_b = sg(exp(lam + k lw - lam e^lw)), lw = clamp(sum_t clamp(log_ratio, -20, 20) m
                  (+ sum_t clamp(log is_ratio, log 1e-8, 20)), log 1e-8, 20), (k, lam) = vespo_*_pos if A >= 0
        l_t = P_t * keep_b * emask_t * is_ratio (not vespo) + beta * kl_t   (the KL is never masked or weighted)
        grpo, sapo: (1/B) sum_b sum_t l m / max(L_b, 1);   bnpo: sum l m / max(sum m, 1)
        dr_grpo: sum l m / (B * max_completion_length)  (default T);   luspo: (1/B) sum_b sum_t l m
        dapo, cispo, vespo, clip_cov, kl_cov: sum l m / num_items_in_batch  (default: max(sum m, 1))
        gmpo: (1/B) sum_b [-exp(sum_t c_t m e_t / max(sum_t m e_t, 1)) A_b + beta sum_t k3 m / max(L_b, 1)],
              c_t = log_ratio clipped into [-eps_low, eps_high] on A's side (min if A > 0, max otherwise); TRL's
              GMPOConfig default is epsilon 0.4 (pass it: ptkernels keeps 0.2 as every loss type's default).
              TRL's GMPOTrainer has no entropy bonus, off-policy mask or sampler correction, so gmpo refuses
              entropy_coef != 0, off_policy_mask_threshold and sampler_logps (ValueError); top_entropy_quantile
              applies (e_t above)
        loss -= entropy_coef * sum(H m e) / max(sum(m e), 1)     (e = emask or 1; every loss type but gmpo, TRL 1.16)
        clip_cov, kl_cov: verl's entropy-collapse controls (``compute_policy_loss_clip_cov`` / ``_kl_cov``),
              token-level, normalized as dapo (verl's token-mean), over the batch's valid tokens with
              cov = (A - mean A)(logp - mean logp):
          clip_cov: P = -min(r A, clamp(r, 1 - eps_low, 1 + eps_high) A) * (1 - sel), sel = 1 on
              max(int(clip_cov_ratio sum m), 1) tokens drawn at random (``torch.randperm`` with ``generator``)
              among the valid, not already clipped ones with clip_cov_lb < cov < clip_cov_ub (their gradient is
              cut; verl's clip_ratio is eps_low / eps_high, default 0.2)
          kl_cov:   P = -r A + kl_cov_coef * sel * |logp - old|, sel = 1 on the top-max(1, int(N kl_cov_ratio)) of
              the N valid tokens by cov (none when kl_cov_ratio = 0); no clip
          Defaults are verl's (clip_cov_ratio 2e-4, lb 1, ub 5; kl_cov_ratio 2e-4, ppo_kl_coef 0.1). The selection
          is a batch-level step before the row pass (one host synchronization); ``cov_selected_fraction`` reports it.

    Options (all off by default; the numerics are then those of the plain loss):
        bias_corrected_kl: TRL 1.16's ``use_bias_correction_kl`` (default True there and here, so the KL term's
            gradient is coef_1 (logp - ref) rather than 1 - exp(ref - logp); same value on-policy).
        entropies [B, T] (may carry grad) with entropy_coef (the bonus) and top_entropy_quantile q < 1:
            emask_t = [H_t m_t >= torch.quantile(valid H, 1 - q)] (TRL's get_high_entropy_mask, one process).
        off_policy_mask_threshold: keep_b = [A_b >= 0 or sum_t nan_to_num(s - logp.detach()) m / max(L_b, 1) <= thr],
            s = sampler_logps if given else old_logps (TRL 1.16's OPSM).
        sampler_logps [B, T]: the rollout engine's log-probs of the sampled tokens (vLLM's); turns on TRL 1.16's
            vLLM importance-sampling correction, ``diff = nan_to_num((old - sampler) m, 0)``:
              token_truncate (TIS)  is_ratio = clamp(exp(diff), clip_min, clip_max)          per token
              token_mask     (MIS)  exp(diff), 0 outside [clip_min, clip_max]                per token
              sequence_truncate     clamp(exp(sum_t diff), clip_min, clip_max)               per sequence
              sequence_mask         exp(sum_t diff), 0 outside the bounds (TRL's default)   per sequence
            with ``vllm_importance_sampling_mode`` / ``_clip_min`` (None: no bound) / ``_clip_max`` (3.0), TRL's
            names and defaults. The output then carries the mismatch metrics (``GRPOOutput``).

    ``num_items_in_batch`` (int or tensor) is the number of completion tokens the step's loss is divided by:
    TRL 1.16 uses ``num_items_in_batch / num_processes * gradient_accumulation_steps / steps_per_generation``
    (num_items_in_batch counted over the whole generation batch); pass that quotient. As in TRL's
    per-micro-batch ``_compute_loss``, the other types (and the entropy bonus) are not divided by the
    gradient-accumulation steps here (the caller does).

    Returns ``GRPOOutput``: ``loss`` (differentiable w.r.t. ``logps`` and ``entropies``; old/ref/sampler/advantages
    are constants), ``kl`` (masked mean of kl_t as TRL logs it, 0 without ref_logps), ``clip_ratio`` / ``_low`` /
    ``_high`` (TRL's region/low/high for the clipped types, cispo's ``cispo_clip_ratio`` as high, 0 for the
    others: masked token means, or means over sequences for GSPO), ``entropy`` (when ``entropies`` is given).
    fp32 (fp64 for fp64 input). ``mask`` may be bool, integer or float (token weights). ``backend``: "auto",
    "reference", "torch", "triton", "native" (see ``ptkernels.backends()``).
    """
    options = loss_options(locals())  # the loss's keyword options by name, as the reference takes them
    check_float("logps", logps)
    if logps.dim() != 2:
        raise ValueError(f"logps must be 2-D [B, T], got shape {tuple(logps.shape)}")
    shape = tuple(logps.shape)
    check_token_floats(shape, logps, "logps", old_logps=old_logps, ref_logps=ref_logps, sampler_logps=sampler_logps,
                       entropies=entropies)
    check_mask("mask", mask, shape, logps, "logps")
    check_advantages(advantages, shape[0], logps, "logps")
    p, wo = check_loss_options(options, ref_logps=ref_logps, sampler_logps=sampler_logps)
    if (entropy_coef != 0.0 or top_entropy_quantile < 1.0) and entropies is None:
        raise ValueError("entropy_coef != 0 and top_entropy_quantile < 1 need entropies [B, T] (the per-token "
                         "entropies of the policy; fused_linear_grpo_loss computes them itself)")
    name = resolve_backend(backend, logps.device)
    if name == "reference":
        return ref_rl.grpo_loss(logps, old_logps, advantages, mask, ref_logps=ref_logps, entropies=entropies,
                                sampler_logps=sampler_logps, **options)
    cd = compute_dtype(logps.dtype)
    m = mask.detach().to(cd)
    norm = row_normalizers(m, loss_type, max_completion_length, num_items_in_batch)
    adv = advantages.detach().to(cd)
    emask = top_entropy_mask(entropies, m, top_entropy_quantile) if top_entropy_quantile < 1.0 else None
    lp = logps.detach().to(cd)
    old = lp if old_logps is None else old_logps.detach().to(cd)
    sel = cov_selection(options, lp, old, adv, m)  # clip_cov / kl_cov's tokens (None for the other types)
    tokw = policy_token_weight(emask, sel, loss_type)
    pw, acc = None, None
    if wo.any or tokw is not None:
        sampler = sampler_logps.detach().to(cd) if sampler_logps is not None else None
        acc = is_partials(cd, logps.device) if wo.is_mode is not None else None
        pw = policy_weights(lp, old, adv.unsqueeze(1), m, wo, sampler=sampler, emask=tokw, acc=acc)
    rows_fn = backends.get(name, "grpo_rows")
    if loss_type == "kl_cov":
        rows_fn = with_kl_cov(rows_fn, sel, float(kl_cov_coef))
    (logps,) = for_autograd(logps)
    loss, kl, region, low, high = GRPOLossFunction.apply(logps, old_logps, ref_logps, adv, m, norm, pw, p, rows_fn)
    loss, entropy = entropy_terms(loss, entropies, m, emask, entropy_coef)
    return make_output(loss, kl, region, low, high, entropy, acc, selected_fraction(sel, m))

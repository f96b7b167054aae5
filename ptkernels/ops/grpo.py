"""GRPO: group-relative advantages and the clipped surrogate loss on per-token log-probs (TRL's semantics).

``grpo_loss`` computes, per token, the clipped objective, the k3 KL to the reference, the clip indicators and
the derivative d loss / d logp in one pass (the Triton kernel ``ptkernels/kernels/grpo.py`` or the same math in
PyTorch ops), with the loss type's normalizer folded into a per-token weight that is known before the pass:

    grpo     1 / (B * max(L_b, 1))        bnpo  1 / max(sum L, 1)
    dr_grpo  1 / (B * max_completion_length)    dapo  1 / num_items_in_batch   (default 1 / max(sum L, 1))

so the loss is a plain sum of per-row partial sums and the gradient is ready after the forward pass
(backward only scales it by the incoming scalar gradient). The same row function is the loss half of
``fused_linear_grpo_loss``.
"""

from __future__ import annotations

import torch

from ..reference import rl as ref_rl
from ..types import IS_LEVELS, LOSS_TYPES, REWARD_SCALES, GRPOOutput, compute_dtype
from . import backends
from .backends.base import GRPOParams
from .core.checks import check_float, check_same
from .core.dispatch import resolve_backend

__all__ = ["GRPOOutput", "grpo_loss", "group_advantages"]


# ------------------------------------------------------------------------------------------ advantages


def group_advantages(rewards: torch.Tensor, *, group_size: int, scale: str = "group", eps: float = 1e-4,
                     backend: str = "auto"):
    """GRPO advantages of ``rewards [N]`` laid out as N / group_size consecutive groups (TRL's layout:
    the completions of one prompt are adjacent).

        scale="group":  A_i = (r_i - mean_g) / (std_g + eps)     std_g Bessel-corrected, as torch.std
        scale="batch":  A_i = (r_i - mean_g) / (std + eps)       std over the whole batch (TRL's "batch")
        scale="none":   A_i =  r_i - mean_g                       (Dr. GRPO)

    A group whose rewards are all equal gives exactly 0 (never NaN); the std of a single value counts as 0.
    Returns fp32 (fp64 for fp64 input); not differentiable. ``group_size`` must divide N. ``backend``: "native"
    (csrc/ kernels: C++ on CPU, CUDA for fp32 on GPU; else the PyTorch ops), "reference", or "torch" / "triton"
    (PyTorch ops on the device: O(N) work with no Triton kernel of its own); "auto" picks the native kernels on CPU
    when they are built.
    """
    check_float("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the number of rewards {rewards.numel()}")
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale must be one of {REWARD_SCALES}, got {scale!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    name = resolve_backend(backend, rewards.device)
    if name == "reference":
        return ref_rl.group_advantages(rewards.detach().to(compute_dtype(rewards.dtype)), group_size=group_size,
                                       scale=scale, eps=eps)
    with torch.no_grad():
        r = rewards.detach().to(compute_dtype(rewards.dtype))
        return backends.get(name, "group_advantages")(r, group_size, scale, float(eps))


# ------------------------------------------------------------------------------------------ arguments


def check_grpo_options(*, beta, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level,
                       max_completion_length, num_items_in_batch, has_ref: bool) -> GRPOParams:
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
    if beta != 0.0 and not has_ref:
        raise ValueError("beta != 0 needs ref_logps (the reference model's per-token log-probs)")
    if max_completion_length is not None and (not isinstance(max_completion_length, int)
                                              or max_completion_length <= 0):
        raise ValueError(f"max_completion_length must be None or a positive int, got {max_completion_length!r}")
    if isinstance(num_items_in_batch, (int, float)) and not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
    return GRPOParams(float(epsilon_low), float(epsilon_high), None if delta is None else float(delta),
                      float(beta), importance_sampling_level == "sequence", has_ref)


def check_token_tensor(name: str, t: torch.Tensor, shape, like: torch.Tensor, like_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {like_name} implies {tuple(shape)}")
    check_same(name, t, like_name, like, dtype=False)


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


def row_normalizers(mask: torch.Tensor, loss_type: str, max_completion_length, num_items_in_batch):
    """``[B]`` per-sequence weights 1 / normalizer of the loss type (see the module docstring); no sync."""
    b, t = mask.shape
    cd = mask.dtype
    if loss_type == "grpo":
        return 1.0 / (b * mask.sum(-1).clamp(min=1.0))
    if loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else t
        return torch.full((b,), 1.0 / (b * length), dtype=cd, device=mask.device)
    if loss_type == "dapo" and num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            n = num_items_in_batch.detach().to(device=mask.device, dtype=cd).reshape(())
            return (1.0 / n).expand(b)
        return torch.full((b,), 1.0 / float(num_items_in_batch), dtype=cd, device=mask.device)
    # bnpo, and dapo without num_items_in_batch: every completion token of the batch
    return (1.0 / mask.sum().clamp(min=1.0)).expand(b)


def finish_metrics(kl_sum, low_sum, high_sum, region_sum, n_tokens, n_seqs, seq_level: bool):
    """Batch metrics from the summed per-row partials, as TRL's masked_batch_mean."""
    count = n_tokens.clamp(min=1.0)
    kl = kl_sum / count
    den = max(n_seqs, 1) if seq_level else count
    return kl, region_sum / den, low_sum / den, high_sum / den


# ------------------------------------------------------------------------------------------ autograd


class GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, old, ref, adv, mask, norm, p: GRPOParams, rows_fn):
        cd = compute_dtype(logps.dtype)
        lp = logps.detach().to(cd)
        old = lp if old is None else old.detach().to(cd)
        ref = ref.detach().to(cd) if ref is not None else None
        want_grad = ctx.needs_input_grad[0]
        out = rows_fn(lp, old, ref, mask, adv.unsqueeze(1), norm.unsqueeze(1), p, want_grad)
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
            return (None,) * 8
        return (grad * g_loss).to(ctx.dtype), None, None, None, None, None, None, None


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
    backend: str = "auto",
) -> GRPOOutput:
    """GRPO loss on per-token log-probs ``[B, T]``, TRL's ``GRPOTrainer._compute_loss``.

    With m = mask, L_b = sum_t m[b, t], A = advantages [B], eps_high defaulting to eps_low::

        log_ratio = logps - old_logps                                  (old_logps None: logps.detach())
        w = log_ratio                                  importance_sampling_level="token"
        w_b = sum_t(log_ratio * m) / max(L_b, 1)       "sequence" (GSPO: one ratio per sequence)
        coef_1 = exp(w);   coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high)
        coef_1 = min(coef_1, delta)                    when delta is set (two-sided clipping, after coef_2)
        l_t = -min(coef_1 * A, coef_2 * A) + beta * (exp(ref - logp) - (ref - logp) - 1)
        grpo:    (1/B) sum_b sum_t l m / max(L_b, 1)
        bnpo:    sum l m / max(sum m, 1)
        dr_grpo: sum l m / (B * max_completion_length)          (default max_completion_length: T)
        dapo:    sum l m / num_items_in_batch                   (default: max(sum m, 1))

    ``num_items_in_batch`` (int or tensor) is the number of completion tokens in the whole accumulated batch
    (all gradient-accumulation micro-batches; under data parallelism TRL divides it by the number of
    processes: pass that quotient). As in TRL's per-micro-batch ``_compute_loss``, grpo/bnpo/dr_grpo are not
    divided by the gradient-accumulation steps here (the trainer does it).

    Returns ``GRPOOutput``: ``loss`` (differentiable w.r.t. ``logps`` only; old/ref/advantages are constants),
    ``kl`` (masked mean k3, 0 without ref_logps), ``clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high``
    (TRL's region/low/high: masked token means, or means over sequences for GSPO). fp32 (fp64 for fp64 input).
    ``mask`` may be bool, integer or float (token weights). Tokens with mask 0 contribute nothing, whatever
    their log-probs. ``backend``: "auto", "reference", "torch", "triton" (see ``ptkernels.backends()``).
    """
    check_float("logps", logps)
    if logps.dim() != 2:
        raise ValueError(f"logps must be 2-D [B, T], got shape {tuple(logps.shape)}")
    shape = tuple(logps.shape)
    if old_logps is not None:
        check_float("old_logps", old_logps)
        check_token_tensor("old_logps", old_logps, shape, logps, "logps")
    if ref_logps is not None:
        check_float("ref_logps", ref_logps)
        check_token_tensor("ref_logps", ref_logps, shape, logps, "logps")
    check_mask("mask", mask, shape, logps, "logps")
    check_advantages(advantages, shape[0], logps, "logps")
    p = check_grpo_options(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
                           loss_type=loss_type, importance_sampling_level=importance_sampling_level,
                           max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
                           has_ref=ref_logps is not None)
    name = resolve_backend(backend, logps.device)
    if name == "reference":
        return ref_rl.grpo_loss(logps, old_logps, advantages, mask, ref_logps=ref_logps, beta=beta,
                                epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
                                loss_type=loss_type, importance_sampling_level=importance_sampling_level,
                                max_completion_length=max_completion_length,
                                num_items_in_batch=num_items_in_batch)
    cd = compute_dtype(logps.dtype)
    m = mask.detach().to(cd)
    norm = row_normalizers(m, loss_type, max_completion_length, num_items_in_batch)
    adv = advantages.detach().to(cd)
    loss, kl, region, low, high = GRPOLossFunction.apply(logps, old_logps, ref_logps, adv, m, norm, p,
                                                         backends.get(name, "grpo_rows"))
    return GRPOOutput(loss=loss, kl=kl, clip_ratio=region, clip_ratio_low=low, clip_ratio_high=high)

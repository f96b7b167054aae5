"""Batch-level pieces of the GRPO loss that both entry points (``grpo_loss``, ``fused_linear_grpo_loss``) compute
around the row pass: the loss type's per-sequence normalizer, the top-entropy mask, the entropy bonus and the
metrics from the summed per-row partials (formulas in ``ptkernels.ops.grpo``'s docstring). PyTorch ops, no
host synchronization.
"""

from __future__ import annotations

import math

import torch

from ..types import GRPOOutput
from .grpo_weights import finish_is_metrics

# loss types divided by num_items_in_batch (default: the batch's completion tokens); verl's clip_cov / kl_cov
# aggregate by token-mean, the same
TOKEN_MEAN = ("dapo", "cispo", "vespo", "clip_cov", "kl_cov")


def row_normalizers(mask: torch.Tensor, loss_type: str, max_completion_length, num_items_in_batch):
    """``[B]`` per-sequence weights 1 / normalizer of the loss type (see ops/grpo.py's docstring); no sync."""
    b, t = mask.shape
    cd = mask.dtype
    if loss_type in ("grpo", "sapo", "gmpo"):
        return 1.0 / (b * mask.sum(-1).clamp(min=1.0))
    if loss_type == "luspo":
        return torch.full((b,), 1.0 / b, dtype=cd, device=mask.device)
    if loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else t
        return torch.full((b,), 1.0 / (b * length), dtype=cd, device=mask.device)
    if loss_type in TOKEN_MEAN and num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            n = num_items_in_batch.detach().to(device=mask.device, dtype=cd).reshape(())
            return (1.0 / n).expand(b)
        return torch.full((b,), 1.0 / float(num_items_in_batch), dtype=cd, device=mask.device)
    # bnpo, and the token means without num_items_in_batch: every completion token of the batch
    return (1.0 / mask.sum().clamp(min=1.0)).expand(b)


def finish_metrics(kl_sum, low_sum, high_sum, region_sum, n_tokens, n_seqs, seq_level: bool):
    """Batch metrics from the summed per-row partials, as TRL's masked_batch_mean."""
    count = n_tokens.clamp(min=1.0)
    kl = kl_sum / count
    den = max(n_seqs, 1) if seq_level else count
    return kl, region_sum / den, low_sum / den, high_sum / den


def top_entropy_mask(entropies: torch.Tensor, m: torch.Tensor, quantile: float) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask`` (one process): 1 where ``H m >= quantile(valid H, 1 - quantile)`` and m != 0.
    ``torch.quantile`` of the valid entropies (linear interpolation); no token valid: all 0. No host sync."""
    valid = m != 0
    h = entropies.detach().to(m.dtype)
    # the valid entropies sorted first, +inf after them: quantile by hand over the first n (n is a tensor)
    n = valid.sum()
    srt = torch.sort(torch.where(valid, h, torch.full_like(h, math.inf)).reshape(-1)).values
    pos = (1.0 - quantile) * (n - 1).clamp(min=0).to(m.dtype)
    i0 = pos.floor().long()
    i1 = (i0 + 1).clamp(max=(n - 1).clamp(min=0))
    frac = pos - i0.to(m.dtype)
    lo_v, hi_v = srt[i0.clamp(min=0)], srt[i1.clamp(min=0)]
    thr = lo_v + frac * (hi_v - lo_v)
    return ((h * m >= thr) & valid & (n > 0)).to(m.dtype)


def entropy_terms(loss, entropies, m, emask, entropy_coef: float):
    """(loss minus the entropy bonus, mean entropy) for given per-token ``entropies`` (None: (loss, None)):
    ``loss - coef * sum(H m e) / max(sum(m e), 1)`` (e the top-entropy mask or 1; TRL 1.16's GRPOTrainer, every
    loss type but gmpo: ``reference.grpo.check_gmpo_options`` refuses a non-zero coef there, as TRL's GMPOTrainer has no
    bonus)."""
    if entropies is None:
        return loss, None
    h = entropies.to(m.dtype)
    zero = torch.zeros((), dtype=m.dtype, device=m.device)
    entropy = torch.where(m != 0, h.detach() * m, zero).sum() / m.sum().clamp(min=1.0)
    if entropy_coef != 0.0:
        eff = m if emask is None else m * emask
        loss = loss - entropy_coef * torch.where(eff != 0, h * eff, zero).sum() / eff.sum().clamp(min=1.0)
    return loss, entropy


def make_output(loss, kl, region, low, high, entropy, is_metrics=None, cov_fraction=None) -> GRPOOutput:
    """``GRPOOutput`` from the loss, the metrics, the sampler's mismatch metrics (``is_partials`` sums or the
    finished four-tuple; None without ``sampler_logps``) and Clip-Cov / KL-Cov's selected fraction."""
    extra = {} if cov_fraction is None else {"cov_selected_fraction": cov_fraction}
    if is_metrics is not None:
        if torch.is_tensor(is_metrics):
            is_metrics = finish_is_metrics(is_metrics)
        extra.update(zip(("sampler_abs_logp_diff", "is_masked_fraction", "is_weight_mean", "is_weight_max"),
                         is_metrics))
    return GRPOOutput(loss=loss, kl=kl, clip_ratio=region, clip_ratio_low=low, clip_ratio_high=high,
                      entropy=entropy, **extra)

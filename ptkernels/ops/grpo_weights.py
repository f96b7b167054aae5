"""Per-token weights of the GRPO policy term, computed before the kernel pass (PyTorch ops, no synchronization):
the sampler/trainer importance-sampling correction, the off-policy sequence mask, the top-entropy mask and
VESPO's phi (TRL 1.16.0's ``GRPOTrainer``; formulas in ``ptkernels.reference.rl``). The kernel multiplies the
policy term of each token by their product ``pw``; the KL term is never weighted (as TRL).

Everything here takes rows ``[R, C]`` of one compute dtype: whole sequences (``grpo_loss``, or the fused op's
sequence chunks) or one flat run of tokens (the fused op's token-level chunks; only token-local weights then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..types import SAMPLER_IS_MODES


@dataclass(frozen=True)
class WeightOptions:
    """What ``policy_weights`` computes; built once per call by ``ops.grpo_checks.check_weight_options``."""

    is_mode: str | None = None  # a SAMPLER_IS_MODES entry when sampler_logps is given
    clip_min: float | None = None
    clip_max: float | None = 3.0
    opsm_threshold: float | None = None
    vespo: tuple[float, float, float, float] | None = None  # (k_pos, lambda_pos, k_neg, lambda_neg)
    fold_is: bool = True  # multiply the IS ratio into pw (VESPO folds it into phi instead)

    @property
    def sequence_wide(self) -> bool:
        """Whether a weight needs a whole sequence (so the fused op chunks whole sequences)."""
        return (self.opsm_threshold is not None or self.vespo is not None
                or (self.is_mode is not None and self.is_mode.startswith("sequence")))

    @property
    def any(self) -> bool:
        return self.is_mode is not None or self.opsm_threshold is not None or self.vespo is not None


def is_partials(dt, device) -> torch.Tensor:
    """Accumulator of the mismatch metrics: |diff| sum, scored tokens (valid, sampler log-prob not NaN),
    outside-count, ratio sum, units, ratio max."""
    return torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -math.inf], dtype=dt, device=device)


def finish_is_metrics(acc: torch.Tensor):
    """(mean |diff|, masked fraction, weight mean, weight max) from ``is_partials`` sums. The mean |diff| is over
    the scored tokens (TRL 1.16 leaves NaN sampler log-probs out of it), 0 when there is none (as TRL)."""
    tok = acc[1].clamp(min=1.0)
    units = acc[4].clamp(min=1.0)
    mx = torch.where(acc[4] > 0, acc[5], torch.zeros_like(acc[5]))
    return acc[0] / tok, acc[2] / units, acc[3] / units, mx


def policy_weights(lp, old, adv, m, o: WeightOptions, *, sampler=None, emask=None, acc=None):
    """pw ``[R, C]`` (or ``[R, 1]``, or None when every weight is 1) for rows of detached current log-probs
    ``lp``, behaviour log-probs ``old`` (``lp`` itself on-policy), advantages ``adv`` (``[R, 1]`` or
    ``[R, C]``), mask ``m``, sampler log-probs ``sampler`` and a 0/1 ``emask``; the mismatch metrics' partial
    sums are added into ``acc`` (``is_partials``) when given."""
    valid = m != 0
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    pw = None
    is_ratio = None
    if o.is_mode is not None:
        delta = torch.where(valid, (old - sampler) * m, zero)  # NaN where the sampler could not score a token
        diff = torch.nan_to_num(delta, nan=0.0)
        seq = o.is_mode.startswith("sequence")
        raw = torch.exp(diff.sum(1, keepdim=True)) if seq else torch.exp(diff)
        lo = -math.inf if o.clip_min is None else o.clip_min
        hi = math.inf if o.clip_max is None else o.clip_max
        outside = (raw < lo) | (raw > hi)
        if o.is_mode.endswith("truncate"):
            is_ratio = raw.clamp(min=o.clip_min, max=o.clip_max)
        else:
            is_ratio = torch.where(outside, zero, raw)
        if acc is not None:
            unit = torch.ones_like(is_ratio) if seq else m
            sel = unit != 0
            scored = torch.where(torch.isnan(delta), zero, m).sum()  # TRL's mask & ~isnan(delta)
            acc += torch.stack([diff.abs().sum(), scored, torch.where(sel, outside.to(lp.dtype) * unit, zero).sum(),
                                torch.where(sel, is_ratio * unit, zero).sum(), unit.sum(), zero])
            acc[5] = torch.maximum(acc[5], torch.where(sel, is_ratio, torch.full_like(is_ratio, -math.inf)).max())
        if o.fold_is:
            pw = is_ratio
    if o.opsm_threshold is not None:
        sampling = sampler if sampler is not None else old
        kl = torch.nan_to_num(torch.where(valid, sampling - lp, zero), nan=0.0)
        avg = (kl * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
        keep = ((adv >= 0) | (avg <= o.opsm_threshold)).to(lp.dtype)
        pw = keep if pw is None else pw * keep
    if o.vespo is not None:
        k_pos, lam_pos, k_neg, lam_neg = o.vespo
        lower = math.log(1e-8)
        lr = torch.where(valid, lp - old, zero).clamp(-20.0, 20.0)
        s = (lr * m).sum(1, keepdim=True)
        if is_ratio is not None:
            s = s + torch.log(is_ratio).clamp(lower, 20.0).sum(1, keepdim=True)
        lw = s.clamp(lower, 20.0)
        a = adv[:, :1]
        nonneg = a >= 0
        k = torch.where(nonneg, torch.full_like(a, k_pos), torch.full_like(a, k_neg))
        lam = torch.where(nonneg, torch.full_like(a, lam_pos), torch.full_like(a, lam_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * lw - lam * torch.exp(lw)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        pw = phi if pw is None else pw * phi
    if emask is not None:
        pw = emask if pw is None else pw * emask
    return pw


def check_is_mode(mode: str) -> None:
    if mode not in SAMPLER_IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {', '.join(SAMPLER_IS_MODES)}; got {mode!r}")

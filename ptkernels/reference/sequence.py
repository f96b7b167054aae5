"""Eager definitions of sequence log-probabilities (padded and packed): the spec and the test oracle.

Per sequence, with per-token log-probs ``logp[t]`` and mask weights ``m[t]`` (a bool mask counts as 0/1)::

    sum      = sum_t m[t] * logp[t]
    average  = sum_t m[t] * logp[t] / sum_t m[t]      (0 for a sequence with sum_t m[t] == 0)

This is TRL's ``(per_token_logps * loss_mask).sum(-1)`` (and ``/ loss_mask.sum(-1)`` with
``average_log_prob=True``), except that an empty sequence averages to 0 instead of NaN.
"""

from __future__ import annotations

import torch

from ..types import compute_dtype


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean over the mask) of ``token_logps [..., T]`` along the last dimension -> ``[...]``."""
    x = token_logps.to(compute_dtype(token_logps.dtype))
    m = mask.to(x.dtype)
    total = (x * m).sum(dim=-1)
    if not average:
        return total
    den = m.sum(dim=-1)
    return torch.where(den != 0, total / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(total))


def packed_sequence_logprobs(token_logps: torch.Tensor, cu_seqlens: torch.Tensor, *, mask: torch.Tensor | None = None,
                             average: bool = False) -> torch.Tensor:
    """Per-sequence sums (or means) of a padding-free batch ``token_logps [total]``; sequence ``s`` holds
    tokens ``cu_seqlens[s]:cu_seqlens[s + 1]`` -> ``[S]``. ``mask [total]`` (optional) weights the tokens."""
    x = token_logps.to(compute_dtype(token_logps.dtype))
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        out.append(sequence_logprobs(x[start:end], m[start:end], average=average))
    if not out:
        return x.new_zeros(0)
    return torch.stack(out)

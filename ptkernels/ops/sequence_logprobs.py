"""Sequence log-probabilities from per-token log-probs: padded ``[..., T]`` batches and packed (padding-free) ones.

Per sequence, with mask weights ``m`` (bool masks count 0/1)::

    sum      = sum_t m[t] * logp[t]
    average  = sum_t m[t] * logp[t] / sum_t m[t]      (0 when sum_t m[t] == 0)

The gradient is a broadcast, ``d out[s] / d logp[t] = m[t]`` (``/ sum_t m[t]`` when averaging). Backends:
``torch`` (reductions / ``index_add_``), ``triton`` (one program per sequence, ptkernels/kernels/sequence.py),
``native`` (the C++ / CUDA segment sums of csrc/, through the ``ptkernels::segment_sums`` custom ops) and
``reference`` (eager). Outputs are fp32 (fp64 for fp64 input); never synchronizes on CUDA.
"""

from __future__ import annotations

import torch

from ..reference import sequence as reference
from . import backends
from .core.checks import check_float
from .core.dispatch import resolve_backend


def _resolve(backend: str, device: torch.device) -> str:
    return resolve_backend(backend, device)


def _check_mask(mask: torch.Tensor, token_logps: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be a bool, integer or float tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(token_logps.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but token_logps has shape {tuple(token_logps.shape)}")
    if mask.device != token_logps.device:
        raise ValueError(f"mask is on {mask.device} but token_logps is on {token_logps.device}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [S + 1] with S >= 0, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but token_logps is on {device}")
    first_ok = cu_seqlens[0] == 0
    last_ok = cu_seqlens[-1] == total
    sorted_ok = (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    msg = (f"cu_seqlens must start at 0, never decrease and end at token_logps.shape[0] = {total}")
    if device.type == "cuda":  # no synchronization: a bad value fails the next synchronizing call
        torch._assert_async(first_ok & last_ok & sorted_ok, msg)
        return
    if torch.compiler.is_compiling():
        return
    if not bool(first_ok & last_ok & sorted_ok):
        raise ValueError(f"{msg}; got {cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}")


class SequenceLogprobsFunction(torch.autograd.Function):
    """Padded ``[S, T]`` (cu None) or packed ``[total]`` (cu [S + 1]) sums; ``impl`` is "torch", "triton" or
    "native"."""

    @staticmethod
    def forward(ctx, x, mask, cu, seg, n_seq: int, average: bool, impl: str):
        packed = cu is not None
        seq_len = 0 if packed else x.shape[-1]
        out, den = backends.get(impl, "sequence_fwd")(x, mask, cu, seg, n_seq, seq_len, packed, average)
        ctx.save_for_backward(mask, cu, seg, den)
        ctx.args = (n_seq, seq_len, packed, average, impl, x.shape, x.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        mask, cu, seg, den = ctx.saved_tensors
        n_seq, seq_len, packed, average, impl, shape, dtype = ctx.args
        if g is None or not ctx.needs_input_grad[0]:
            return (None,) * 7
        g = g.to(den.dtype)
        grad = backends.get(impl, "sequence_bwd")(g, den, mask, cu, seg, n_seq, seq_len, packed, average, shape,
                                                  dtype)
        return grad, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ public


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor, *, average: bool = False,
                      backend: str = "auto") -> torch.Tensor:
    """Per-sequence log-probability of a padded batch: ``token_logps [..., T]``, ``mask [..., T]`` -> ``[...]``.

    ``out = sum_t m[t] * logp[t]``, or with ``average=True`` ``sum_t m[t] * logp[t] / sum_t m[t]`` (0 for a
    fully masked sequence), as TRL's ``get_batch_logps(..., average_log_prob)``. ``mask`` is bool (or 0/1
    integers, or float weights). Differentiable w.r.t. ``token_logps``; the output is fp32 (fp64 for fp64).
    """
    check_float("token_logps", token_logps)
    _check_mask(mask, token_logps)
    if token_logps.dim() < 1:
        raise ValueError("token_logps must have at least one dimension [..., T]")
    name = _resolve(backend, token_logps.device)
    if name == "reference":
        return reference.sequence_logprobs(token_logps, mask, average=average)
    if name == "native" and not backends.module("native").sequence_supported(token_logps):
        name = "torch"  # e.g. fp64 on CUDA: the CUDA segment sums are fp32 only
    lead = token_logps.shape[:-1]
    t = token_logps.shape[-1]
    x2d = token_logps.reshape(lead.numel(), t).contiguous()  # lead.numel(): T may be 0
    m2d = mask.reshape(lead.numel(), t).contiguous()
    out = SequenceLogprobsFunction.apply(x2d, m2d, None, None, x2d.shape[0], bool(average), name)
    return out.view(lead)


def packed_sequence_logprobs(token_logps: torch.Tensor, cu_seqlens: torch.Tensor, *,
                             mask: torch.Tensor | None = None, average: bool = False,
                             backend: str = "auto") -> torch.Tensor:
    """Per-sequence log-probability of a padding-free batch: ``token_logps [total]`` holds S sequences
    back to back, sequence ``s`` being ``token_logps[cu_seqlens[s]:cu_seqlens[s + 1]]`` -> ``[S]``.

    ``cu_seqlens`` is int32/int64 ``[S + 1]``, starting at 0, non-decreasing, ending at ``total`` (checked;
    on CUDA with ``torch._assert_async``, no synchronization). ``mask [total]`` optionally weights tokens
    (bool / 0-1 / float). Same formulas as ``sequence_logprobs``; differentiable w.r.t. ``token_logps``.
    """
    check_float("token_logps", token_logps)
    if token_logps.dim() != 1:
        raise ValueError(f"token_logps must be 1-D [total_tokens] for a packed batch, got {tuple(token_logps.shape)}")
    _check_cu_seqlens(cu_seqlens, token_logps.shape[0], token_logps.device)
    if mask is not None:
        _check_mask(mask, token_logps)
    name = _resolve(backend, token_logps.device)
    if name == "reference":
        return reference.packed_sequence_logprobs(token_logps, cu_seqlens, mask=mask, average=average)
    if name == "native" and not backends.module("native").sequence_supported(token_logps):
        name = "torch"  # e.g. fp64 on CUDA: the CUDA segment sums are fp32 only
    n_seq = cu_seqlens.shape[0] - 1
    x = token_logps.contiguous()
    m = mask.contiguous() if mask is not None else None
    cu = cu_seqlens.contiguous()
    seg = None
    if name == "torch":
        lengths = (cu[1:] - cu[:-1]).long()
        seg = torch.repeat_interleave(torch.arange(n_seq, device=x.device), lengths, output_size=x.shape[0])
    return SequenceLogprobsFunction.apply(x, m, cu, seg, n_seq, bool(average), name)

"""Custom ops of the segment sums (csrc/*/sequence.*): per-sequence sums / means of padded [S, T] or packed
[total] token values, and their backward."""

from __future__ import annotations

import torch

from .common import (
    DTYPE_CODES,
    VEC_DTYPES,
    check_device,
    check_tensor,
    check_vector,
    cuda_stream,
    lib,
    ptr,
    threads,
)


def _check_segments(x, mask, cu_seqlens, n_seqs):
    """-> (packed, seq_len, total). Padded: x [S, T], cu None. Packed: x [total], cu int64 [S + 1]."""
    check_tensor("x", x, x.device)
    check_device("x", x)
    check_tensor("x", x, x.device, dtypes=VEC_DTYPES[x.device.type])
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous, got strides {x.stride()}")
    if mask is not None:
        check_tensor("mask", mask, x.device, dtypes=(x.dtype,))
        if tuple(mask.shape) != tuple(x.shape) or not mask.is_contiguous():
            raise ValueError(f"mask must be contiguous with x's shape {tuple(x.shape)}, got {tuple(mask.shape)}")
    if n_seqs < 0:
        raise ValueError(f"n_seqs must be >= 0, got {n_seqs}")
    if cu_seqlens is None:
        if x.dim() != 2 or x.shape[0] != n_seqs:
            raise ValueError(f"padded x must be [n_seqs={n_seqs}, T], got {tuple(x.shape)}")
        return False, x.shape[1], x.numel()
    if x.dim() != 1:
        raise ValueError(f"packed x must be 1-D [total], got {tuple(x.shape)}")
    check_tensor("cu_seqlens", cu_seqlens, x.device, dtypes=(torch.int64,))
    check_vector("cu_seqlens", cu_seqlens, n_seqs + 1, torch.int64)
    if x.device.type == "cpu":  # the kernel checks again; this gives the message before anything runs
        cu = cu_seqlens
        if int(cu[0]) != 0 or int(cu[-1]) != x.shape[0] or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0, never decrease and end at {x.shape[0]}")
    else:
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == x.shape[0]) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
        torch._assert_async(ok, f"cu_seqlens must start at 0, never decrease and end at {x.shape[0]}")
    return True, 0, x.shape[0]


@torch.library.custom_op("ptkernels::segment_sums", mutates_args=())
def segment_sums(x: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, n_seqs: int,
                 average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [S], den [S]): per-sequence sums of x * mask (means with ``average``; 0 for an empty mask) and the mask
    sums, over rows of a padded ``x [S, T]`` (cu_seqlens None) or segments of a packed ``x [total]``."""
    packed, seq_len, total = _check_segments(x, mask, cu_seqlens, n_seqs)
    out = torch.empty(n_seqs, dtype=x.dtype, device=x.device)
    den = torch.empty(n_seqs, dtype=x.dtype, device=x.device)
    if n_seqs == 0:
        return out, den
    if x.device.type == "cuda":
        cu = cu_seqlens if packed else torch.arange(0, total + 1, max(seq_len, 1), device=x.device)[: n_seqs + 1]
        if not packed and seq_len == 0:
            cu = torch.zeros(n_seqs + 1, dtype=torch.int64, device=x.device)
        with torch.cuda.device(x.device):
            stream = cuda_stream(x)
            lib().cuda_segment_sums(x.data_ptr(), ptr(mask), cu.data_ptr(), out.data_ptr(), n_seqs, average,
                                    stream)
            if mask is not None:
                lib().cuda_segment_sums(mask.data_ptr(), 0, cu.data_ptr(), den.data_ptr(), n_seqs, False, stream)
            else:
                den.copy_(cu[1:] - cu[:-1])
        return out, den
    lib().cpu_segment_sums(x.data_ptr(), ptr(mask), ptr(cu_seqlens), out.data_ptr(), den.data_ptr(), n_seqs,
                           seq_len, total, average, DTYPE_CODES[x.dtype], threads())
    return out, den


@segment_sums.register_fake
def _(x, mask, cu_seqlens, n_seqs, average):
    return x.new_empty(n_seqs), x.new_empty(n_seqs)


@torch.library.custom_op("ptkernels::segment_sums_bwd", mutates_args=())
def segment_sums_bwd(g: torch.Tensor, den: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                     total: int, seq_len: int, average: bool) -> torch.Tensor:
    """The gradient of ``segment_sums``' out w.r.t. x: [S, T] (padded) or [total] (packed), ``g``'s dtype."""
    check_tensor("g", g, g.device, dim=1)
    n_seqs = g.shape[0]
    shape = (total,) if cu_seqlens is not None else (n_seqs, seq_len)
    if total < 0 or seq_len < 0 or (cu_seqlens is None and n_seqs * seq_len != total):
        raise ValueError(f"inconsistent sizes: n_seqs={n_seqs}, seq_len={seq_len}, total={total}")
    grad = torch.empty(shape, dtype=g.dtype, device=g.device)
    _check_segments(grad, mask, cu_seqlens, n_seqs)
    check_tensor("den", den, g.device)
    check_vector("den", den, n_seqs, g.dtype)
    g = g.contiguous()
    if n_seqs == 0 or total == 0:
        return grad.zero_()
    if g.device.type == "cuda":  # a broadcast: PyTorch ops on the device, no synchronization
        gs = torch.where(den != 0, g / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(g)) \
            if average else g
        if cu_seqlens is None:
            grad.copy_(gs.unsqueeze(1).expand(shape))
        else:
            seg = torch.repeat_interleave(torch.arange(n_seqs, device=g.device), cu_seqlens[1:] - cu_seqlens[:-1],
                                          output_size=total)
            grad.copy_(gs.index_select(0, seg))
        return grad.mul_(mask) if mask is not None else grad
    lib().cpu_segment_sums_bwd(g.data_ptr(), den.data_ptr(), ptr(mask), ptr(cu_seqlens), grad.data_ptr(), n_seqs,
                               seq_len, total, average, DTYPE_CODES[g.dtype], threads())
    return grad


@segment_sums_bwd.register_fake
def _(g, den, mask, cu_seqlens, total, seq_len, average):
    shape = (total,) if cu_seqlens is not None else (g.shape[0], seq_len)
    return g.new_empty(shape)



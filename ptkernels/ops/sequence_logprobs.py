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
from .checks import check_float
from .dispatch import resolve_backend
from .logit_rows import compute_dtype

MAX_BLOCK_T = 1024


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


# ------------------------------------------------------------------------------------------------ torch


def _torch_fwd(x2d, m2d, seg, n_seq, average):
    """(out [S], den [S]). Padded: x2d/m2d are [S, T], seg None. Packed: x2d/m2d are [total], seg [total]."""
    cd = compute_dtype(x2d.dtype)
    x = x2d.to(cd)
    m = None if m2d is None else m2d.to(cd)
    xm = x if m is None else x * m
    if seg is None:
        total = xm.sum(dim=-1)
        den = m.sum(dim=-1) if m is not None else torch.full((n_seq,), x.shape[-1], dtype=cd, device=x.device)
    else:
        total = torch.zeros(n_seq, dtype=cd, device=x.device).index_add_(0, seg, xm)
        w = m if m is not None else torch.ones_like(x)
        den = torch.zeros(n_seq, dtype=cd, device=x.device).index_add_(0, seg, w)
    if average:
        total = torch.where(den != 0, total / torch.where(den != 0, den, torch.ones_like(den)),
                            torch.zeros_like(total))
    return total, den


def _torch_bwd(g, den, m2d, seg, shape, average, dtype):
    cd = g.dtype
    if average:
        g = torch.where(den != 0, g / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(g))
    per_tok = g.unsqueeze(-1).expand(shape) if seg is None else g.index_select(0, seg)
    if m2d is not None:
        per_tok = per_tok * m2d.to(cd)
    return per_tok.to(dtype).contiguous()


# ----------------------------------------------------------------------------------------------- triton


def _block_t(n: int) -> int:
    import triton

    return min(MAX_BLOCK_T, triton.next_power_of_2(max(int(n), 16)))


def _tl_compute(dtype):
    import triton.language as tl

    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def _mask_arg(m):
    return m.view(torch.uint8) if m.dtype == torch.bool else m


def _triton_fwd(x, m, cu, n_seq, seq_len, packed, average):
    from ..kernels.sequence import sequence_logprobs_fwd_kernel

    cd = compute_dtype(x.dtype)
    out = torch.empty(n_seq, dtype=cd, device=x.device)
    den = torch.empty(n_seq, dtype=cd, device=x.device)
    if n_seq == 0:
        return out, den
    block = _block_t(seq_len if not packed else max(x.numel() // max(n_seq, 1), 1))
    sequence_logprobs_fwd_kernel[(n_seq,)](
        x, _mask_arg(m) if m is not None else x, cu if packed else x, out, den, seq_len, seq_len,
        HAS_MASK=m is not None, PACKED=packed, AVERAGE=average, BLOCK_T=block, COMPUTE=_tl_compute(x.dtype),
        num_warps=4,
    )
    return out, den


def _triton_bwd(g, den, m, cu, n_seq, seq_len, packed, average, like):
    from ..kernels.sequence import sequence_logprobs_bwd_kernel

    grad = torch.empty_like(like)
    if n_seq == 0 or grad.numel() == 0:
        return grad.zero_()
    if packed:  # tokens outside every sequence (none when cu_seqlens is valid) keep a zero gradient
        grad.zero_()
    block = _block_t(seq_len if not packed else max(like.numel() // max(n_seq, 1), 1))
    sequence_logprobs_bwd_kernel[(n_seq,)](
        grad, g.contiguous(), den, _mask_arg(m) if m is not None else g, cu if packed else g, seq_len, seq_len,
        HAS_MASK=m is not None, PACKED=packed, AVERAGE=average, BLOCK_T=block, COMPUTE=_tl_compute(like.dtype),
        num_warps=4,
    )
    return grad


# ----------------------------------------------------------------------------------------------- native


def _native_ok(x: torch.Tensor) -> bool:
    from . import native

    return native.supports("vector", x.device, compute_dtype(x.dtype))


def _native_fwd(x, m, cu, n_seq, average):
    """The native segment sums in the compute dtype: (out [S], den [S])."""
    from . import native

    cd = compute_dtype(x.dtype)
    xc = x.to(cd).contiguous()
    mc = None if m is None else m.to(cd).contiguous()
    return native.segment_sums(xc, mc, None if cu is None else cu.to(torch.int64).contiguous(), n_seq, average)


def _native_bwd(g, den, m, cu, n_seq, seq_len, packed, average, shape, dtype):
    from . import native

    cd = g.dtype
    total = shape[0] if packed else n_seq * seq_len
    mc = None if m is None else m.to(cd).contiguous()
    grad = native.segment_sums_bwd(g.contiguous(), den.to(cd).contiguous(), mc,
                                   cu.to(torch.int64).contiguous() if packed else None, total, seq_len, average)
    return grad.to(dtype)


# --------------------------------------------------------------------------------------------- autograd


class SequenceLogprobsFunction(torch.autograd.Function):
    """Padded ``[S, T]`` (cu None) or packed ``[total]`` (cu [S + 1]) sums; ``impl`` is "torch", "triton" or
    "native"."""

    @staticmethod
    def forward(ctx, x, mask, cu, seg, n_seq: int, average: bool, impl: str):
        packed = cu is not None
        seq_len = 0 if packed else x.shape[-1]
        if impl == "triton":
            out, den = _triton_fwd(x, mask, cu, n_seq, seq_len, packed, average)
        elif impl == "native":
            out, den = _native_fwd(x, mask, cu, n_seq, average)
        else:
            out, den = _torch_fwd(x, mask, seg, n_seq, average)
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
        if impl == "triton":
            like = torch.empty(shape, dtype=dtype, device=g.device)
            grad = _triton_bwd(g, den, mask, cu, n_seq, seq_len, packed, average, like)
        elif impl == "native":
            grad = _native_bwd(g, den, mask, cu, n_seq, seq_len, packed, average, shape, dtype)
        else:
            grad = _torch_bwd(g, den, mask, seg, shape, average, dtype)
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
    if name == "native" and not _native_ok(token_logps):
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
    if name == "native" and not _native_ok(token_logps):
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

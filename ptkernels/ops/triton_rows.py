"""Launchers for the Triton row kernels (ptkernels/kernels/logit_rows.py), behind the TorchRows interface."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernels.logit_rows import ce_rows_kernel, logprob_rows_bwd_kernel, logprob_rows_fwd_kernel
from .grpo import split_fp32
from .logit_rows import RowOptions, compute_dtype

MAX_BLOCK_V = 4096


def block_v(n_cols: int) -> int:
    """Columns per loop step: a power of two, at most 4096 (16 fp32 values per thread at 8 warps)."""
    return min(MAX_BLOCK_V, triton.next_power_of_2(max(n_cols, 16)))


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _tl_compute(dtype: torch.dtype):
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def _row_major(t: torch.Tensor, name: str) -> torch.Tensor:
    # The kernels index rows by stride and columns contiguously.
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got {tuple(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


def _transform_args(o: RowOptions):
    """(softcap hi, lo, 1/temperature hi, lo), has_softcap: the kernels' scalar floats as fp32 pairs."""
    scalars = (*split_fp32(1.0 if o.softcap is None else o.softcap), *split_fp32(1.0 / o.temperature))
    return scalars, o.softcap is not None


class TritonRows:
    name = "triton"

    def ce(self, z, labels, o: RowOptions, *, want_grad=False, grad_scale=None, grad_out=None, scratch=False,
           all_valid=False):
        z = _row_major(z, "logits")
        n, v = z.shape
        cd = compute_dtype(z.dtype)
        loss = torch.empty(n, dtype=cd, device=z.device)
        lse = torch.empty(n, dtype=cd, device=z.device)
        grad = None
        if want_grad:
            grad = grad_out if grad_out is not None else (z if scratch else torch.empty_like(z))
            if grad.stride(-1) != 1:
                raise ValueError("grad_out must have unit stride along V")
        if n == 0:
            return loss, lse, grad
        if want_grad:
            scale = grad_scale.to(cd) if grad_scale is not None else torch.ones((), dtype=cd, device=z.device)
            g_ptr, g_stride, s_stride = grad, grad.stride(0), (scale.stride(0) if scale.dim() else 0)
        else:  # dummies: WRITE_GRAD=False never touches them
            g_ptr, g_stride, scale, s_stride = z, 0, loss, 0
        scalars, has_softcap = _transform_args(o)
        bv = block_v(v)
        ce_rows_kernel[(n,)](
            z, z.stride(0), g_ptr, g_stride, labels, scale, s_stride, loss, lse,
            v, o.ignore_index, *split_fp32(o.label_smoothing), *split_fp32(o.z_loss), *scalars,
            HAS_SOFTCAP=has_softcap, WRITE_GRAD=want_grad, BLOCK_V=bv, COMPUTE=_tl_compute(z.dtype),
            num_warps=num_warps(bv),
        )
        return loss, lse, grad

    def logprob_fwd(self, z, targets, o: RowOptions, want_entropy: bool):
        z = _row_major(z, "logits")
        n, v = z.shape
        cd = compute_dtype(z.dtype)
        logp = torch.empty(n, dtype=cd, device=z.device)
        lse = torch.empty(n, dtype=cd, device=z.device)
        mean_s = torch.empty(n, dtype=cd, device=z.device) if want_entropy else None
        if n == 0:
            return logp, lse, mean_s
        scalars, has_softcap = _transform_args(o)
        bv = block_v(v)
        logprob_rows_fwd_kernel[(n,)](
            z, z.stride(0), targets, logp, lse, mean_s if want_entropy else lse,
            v, o.ignore_index, *scalars,
            HAS_SOFTCAP=has_softcap, WANT_ENTROPY=want_entropy, BLOCK_V=bv, COMPUTE=_tl_compute(z.dtype),
            num_warps=num_warps(bv),
        )
        return logp, lse, mean_s

    def logprob_bwd(self, z, targets, lse, mean_s, g_logp, g_ent, o: RowOptions, grad_out):
        z = _row_major(z, "logits")
        n, v = z.shape
        if n == 0:
            return
        if grad_out.stride(-1) != 1:
            raise ValueError("grad_out must have unit stride along V")
        cd = compute_dtype(z.dtype)
        g_logp = g_logp.to(cd).contiguous()
        has_ent = g_ent is not None
        g_ent = g_ent.to(cd).contiguous() if has_ent else g_logp
        scalars, has_softcap = _transform_args(o)
        bv = block_v(v)
        logprob_rows_bwd_kernel[(n,)](
            z, z.stride(0), grad_out, grad_out.stride(0), targets, lse.contiguous(),
            mean_s.contiguous() if has_ent else lse, g_logp, g_ent,
            v, o.ignore_index, *scalars,
            HAS_SOFTCAP=has_softcap, HAS_ENTROPY_GRAD=has_ent, BLOCK_V=bv, COMPUTE=_tl_compute(z.dtype),
            num_warps=num_warps(bv),
        )


TRITON_ROWS = TritonRows()

"""The triton backend: every Triton launcher, one section per kernel family of ptkernels/kernels/.

Each launcher brings its arguments into the kernel's layout (row-major, contiguous per-row vectors, the
compute dtype), picks the block size and warps, and launches one program per row (or sequence). Imported only
when the triton backend is used (it imports triton). Interfaces: ptkernels/ops/backends/base.py.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from ...kernels.gae import gae_kernel
from ...kernels.grpo import grpo_rows_kernel
from ...kernels.jsd import jsd_rows_kernel
from ...kernels.rows import block_grad_kernel, ce_rows_kernel, logprob_rows_bwd_kernel, logprob_rows_fwd_kernel
from ...kernels.sequence import sequence_logprobs_bwd_kernel, sequence_logprobs_fwd_kernel
from ...types import compute_dtype
from .base import GRPOParams, GRPORows, JSDRowOptions, RowOptions

MAX_BLOCK_T = 1024


def split_fp32(x: float) -> tuple[float, float]:
    """(hi, lo) with hi = fp32(x), lo = fp32(x - hi): how every Triton kernel here takes a float argument, rebuilt
    as hi + lo in its compute dtype (ptkernels/kernels/scalars.py: Triton passes Python floats as fp32)."""
    hi = struct.unpack("f", struct.pack("f", x))[0] if math.isfinite(x) else x
    lo = x - hi if math.isfinite(x) else 0.0
    return hi, struct.unpack("f", struct.pack("f", lo))[0]


MAX_BLOCK_V = 4096


def block_v(n_cols: int) -> int:
    """Columns per loop step: a power of two, at most 4096 (16 fp32 values per thread at 8 warps)."""
    return min(MAX_BLOCK_V, triton.next_power_of_2(max(n_cols, 16)))


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def tl_compute(dtype: torch.dtype):
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def row_major(t: torch.Tensor, name: str) -> torch.Tensor:
    # The kernels index rows by stride and columns contiguously.
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got {tuple(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


def _transform_args(o: RowOptions):
    """(softcap hi, lo, 1/temperature hi, lo), has_softcap: the kernels' scalar floats as fp32 pairs."""
    scalars = (*split_fp32(1.0 if o.softcap is None else o.softcap), *split_fp32(1.0 / o.temperature))
    return scalars, o.softcap is not None


# ------------------------------------------------------------------------------------------- logit rows


class TritonRows:
    name = "triton"

    def ce(self, z, labels, o: RowOptions, *, want_grad=False, grad_scale=None, grad_out=None, scratch=False,
           all_valid=False):
        z = row_major(z, "logits")
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
            HAS_SOFTCAP=has_softcap, WRITE_GRAD=want_grad, BLOCK_V=bv, COMPUTE=tl_compute(z.dtype),
            num_warps=num_warps(bv),
        )
        return loss, lse, grad

    def logprob_fwd(self, z, targets, o: RowOptions, want_entropy: bool):
        z = row_major(z, "logits")
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
            HAS_SOFTCAP=has_softcap, WANT_ENTROPY=want_entropy, BLOCK_V=bv, COMPUTE=tl_compute(z.dtype),
            num_warps=num_warps(bv),
        )
        return logp, lse, mean_s

    def logprob_bwd(self, z, targets, lse, mean_s, g_logp, g_ent, o: RowOptions, grad_out):
        z = row_major(z, "logits")
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
            HAS_SOFTCAP=has_softcap, HAS_ENTROPY_GRAD=has_ent, BLOCK_V=bv, COMPUTE=tl_compute(z.dtype),
            num_warps=num_warps(bv),
        )


TRITON_ROWS = TritonRows()
ROWS = TRITON_ROWS


class TritonBlockRows:
    """The compact-memory backward's block gradient (base.py: ``grad_block``) in one Triton kernel."""

    name = "triton"

    def grad_block(self, z, labels, lse, coef, col0: int, o: RowOptions, *, has_b: bool, grad_out=None):
        z = row_major(z, "logits")
        n, v = z.shape
        grad = z if grad_out is None else grad_out
        if grad.stride(-1) != 1:
            raise ValueError("grad_out must have unit stride along V")
        if n == 0:
            return grad
        cd = compute_dtype(z.dtype)
        scalars, has_softcap = _transform_args(o)
        bv = block_v(v)
        block_grad_kernel[(n,)](
            z, z.stride(0), grad, grad.stride(0), labels.contiguous(), lse.to(cd).contiguous(),
            coef.to(cd).contiguous(), v, col0, o.ignore_index, *scalars,
            HAS_SOFTCAP=has_softcap, HAS_B=has_b, BLOCK_V=bv, COMPUTE=tl_compute(z.dtype), num_warps=num_warps(bv),
        )
        return grad


BLOCK_ROWS = TritonBlockRows()


# ------------------------------------------------------------------------------------------------- JSD rows


JSD_MAX_BLOCK_V = 2048


def jsd_block_v(n_cols: int) -> int:
    """Columns per loop step of ``jsd_rows_kernel``: half the other row kernels' cap, because each step holds a
    block of the student's and of the teacher's logits (at 4096 columns, fp32, 8 warps, Triton 3.6 spilled)."""
    return min(JSD_MAX_BLOCK_V, block_v(n_cols))


class TritonJSDRows:
    """Launches ``jsd_rows_kernel`` (ptkernels/kernels/jsd.py) behind the TorchJSDRows interface."""

    name = "triton"

    def jsd(self, zs, zt, labels, o: JSDRowOptions, *, want_grad=False, grad_scale=None, scratch=False):
        zs = row_major(zs, "logits")
        zt = row_major(zt, "ref_logits")
        n, v = zs.shape
        cd = compute_dtype(zs.dtype)
        loss = torch.empty(n, dtype=cd, device=zs.device)
        grad = None
        if want_grad:
            grad = zs if scratch else torch.empty_like(zs)
        if n == 0:
            return loss, grad
        if want_grad:
            scale = grad_scale.to(cd) if grad_scale is not None else torch.ones((), dtype=cd, device=zs.device)
            g_ptr, g_stride, s_stride = grad, grad.stride(0), (scale.stride(0) if scale.dim() else 0)
        else:  # dummies: WRITE_GRAD=False never touches them
            g_ptr, g_stride, scale, s_stride = zs, 0, loss, 0
        has_labels = labels is not None
        bv = jsd_block_v(v)
        jsd_rows_kernel[(n,)](
            zs, zs.stride(0), zt, zt.stride(0), g_ptr, g_stride, labels if has_labels else loss, scale, s_stride,
            loss, v, o.ignore_index, *split_fp32(float(o.beta)), *split_fp32(1.0 / o.temperature),
            MODE=o.mode, HAS_LABELS=has_labels, WRITE_GRAD=want_grad, BLOCK_V=bv, COMPUTE=tl_compute(zs.dtype),
            num_warps=num_warps(bv),
        )
        return loss, grad


JSD_ROWS = TritonJSDRows()


# ------------------------------------------------------------------------------------------------ GRPO rows


def grpo_rows(logp, old, ref, mask, adv, norm, p: GRPOParams, want_grad: bool, pw=None) -> GRPORows:
    """The same as torch.grpo_rows through ``ptkernels.kernels.grpo.grpo_rows_kernel``."""
    r_, c_ = mask.shape
    cd = logp.dtype
    dev = logp.device
    logp, old, mask = logp.contiguous(), old.contiguous(), mask.contiguous()
    ref = ref.contiguous() if ref is not None else logp
    adv = adv.expand(r_, c_)
    norm = norm.expand(r_, c_)
    pw_arg = pw.to(cd).expand(r_, c_) if pw is not None else adv
    outs = [torch.empty(r_, dtype=cd, device=dev) for _ in range(5)]
    grad = torch.empty(r_, c_, dtype=cd, device=dev) if want_grad else None
    if r_ == 0 or c_ == 0:
        for o in outs:
            o.zero_()
        if grad is not None:
            grad.zero_()
        return GRPORows(*outs, grad)
    delta = p.delta if p.delta is not None else 1.0
    scalars = [x for v in (p.lo, p.hi, delta, p.beta, p.cap, p.tau_pos, p.tau_neg) for x in split_fp32(v)]
    block = min(1024, triton.next_power_of_2(max(c_, 16)))
    grpo_rows_kernel[(r_,)](
        logp, old, ref, mask, adv, adv.stride(0), adv.stride(1), norm, norm.stride(0), norm.stride(1),
        pw_arg, pw_arg.stride(0), pw_arg.stride(1), grad if want_grad else logp, *outs, c_, *scalars,
        HAS_REF=p.has_ref, HAS_DELTA=p.delta is not None, SEQ_LEVEL=p.seq_level, WRITE_GRAD=want_grad,
        KIND=p.kind, BIAS_KL=p.bias_kl and p.has_ref, HAS_PW=pw is not None, BLOCK=block, COMPUTE=tl_compute(cd),
        num_warps=4,
    )
    return GRPORows(*outs, grad)


# ------------------------------------------------------------------------------------------------------ GAE


def gae(rewards, values, mask, gamma: float, lam: float):
    b, t = values.shape
    adv = torch.empty_like(values)
    ret = torch.empty_like(values)
    if b == 0 or t == 0:
        return adv, ret
    gae_kernel[(b,)](rewards.contiguous(), values.contiguous(), mask.contiguous(), adv, ret, t,
                     *split_fp32(gamma), *split_fp32(gamma * lam), COMPUTE=tl_compute(values.dtype), num_warps=1)
    return adv, ret


# ------------------------------------------------------------------------------------------- segment sums


def block_t(n: int) -> int:
    """Tokens per loop step of the segment-sum kernels: a power of two, at most MAX_BLOCK_T."""
    return min(MAX_BLOCK_T, triton.next_power_of_2(max(int(n), 16)))


def _mask_arg(m):
    return m.view(torch.uint8) if m.dtype == torch.bool else m


def _segment_sums(x, m, cu, n_seq, seq_len, packed, average):
    cd = compute_dtype(x.dtype)
    out = torch.empty(n_seq, dtype=cd, device=x.device)
    den = torch.empty(n_seq, dtype=cd, device=x.device)
    if n_seq == 0:
        return out, den
    block = block_t(seq_len if not packed else max(x.numel() // max(n_seq, 1), 1))
    sequence_logprobs_fwd_kernel[(n_seq,)](
        x, _mask_arg(m) if m is not None else x, cu if packed else x, out, den, seq_len, seq_len,
        HAS_MASK=m is not None, PACKED=packed, AVERAGE=average, BLOCK_T=block, COMPUTE=tl_compute(x.dtype),
        num_warps=4,
    )
    return out, den


def _segment_sums_bwd(g, den, m, cu, n_seq, seq_len, packed, average, like):
    grad = torch.empty_like(like)
    if n_seq == 0 or grad.numel() == 0:
        return grad.zero_()
    if packed:  # tokens outside every sequence (none when cu_seqlens is valid) keep a zero gradient
        grad.zero_()
    block = block_t(seq_len if not packed else max(like.numel() // max(n_seq, 1), 1))
    sequence_logprobs_bwd_kernel[(n_seq,)](
        grad, g.contiguous(), den, _mask_arg(m) if m is not None else g, cu if packed else g, seq_len, seq_len,
        HAS_MASK=m is not None, PACKED=packed, AVERAGE=average, BLOCK_T=block, COMPUTE=tl_compute(like.dtype),
        num_warps=4,
    )
    return grad


def sequence_fwd(x, mask, cu, seg, n_seq, seq_len, packed, average):
    return _segment_sums(x, mask, cu, n_seq, seq_len, packed, average)


def sequence_bwd(g, den, mask, cu, seg, n_seq, seq_len, packed, average, shape, dtype):
    like = torch.empty(shape, dtype=dtype, device=g.device)
    return _segment_sums_bwd(g, den, mask, cu, n_seq, seq_len, packed, average, like)

"""The native backend: the row functions (interfaces in base.py), GAE and segment sums on the native kernels
(``ptkernels._C``, csrc/).

The same interface as TorchRows (the spec) and TritonRows, through the custom ops of native_ops/:

    ce(z, labels, o, *, want_grad, grad_scale=None, grad_out=None, scratch=False, all_valid=False)
    logprob_fwd(z, targets, o, want_entropy) -> (logp, lse, mean_s or None)
    logprob_bwd(z, targets, lse, mean_s, g_logp, g_ent, o, grad_out)

CPU tensors run the C++ kernels (csrc/cpu/rows.cpp: one pass over each row for the online log-sum-exp and the
loss, a second one writing the gradient, in place when allowed). CUDA tensors run the CUDA cross-entropy kernel
when the extension was built with it; what the CUDA half has no kernel for (fp64, the log-prob rows) runs the
PyTorch rows there. Arguments are brought into the kernels' layout here (int64 labels, unit column stride, the
compute dtype for per-row vectors); the ops validate them again before any native call.
"""

from __future__ import annotations

import torch

from ...types import compute_dtype
from . import native_ops as native
from . import torch as torch_backend
from .base import RowOptions

_TORCH_ROWS = torch_backend.TORCH_ROWS


def _row_major(z: torch.Tensor) -> torch.Tensor:
    if z.dim() != 2:
        raise ValueError(f"logits must be 2-D [rows, V], got shape {tuple(z.shape)}")
    return z if (z.shape[1] <= 1 or z.stride(1) == 1) else z.contiguous()


def index64(t: torch.Tensor) -> torch.Tensor:
    """Labels as the kernels take them: contiguous int64."""
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def _per_row(t: torch.Tensor, n: int, cd: torch.dtype) -> torch.Tensor:
    t = t if t.dtype == cd else t.to(cd)
    return t.expand(n) if t.dim() == 0 else t


def _writable(grad_out: torch.Tensor, z: torch.Tensor) -> bool:
    """Can the kernel write straight into grad_out (same dtype/shape/device, unit column stride, disjoint rows)?"""
    n, v = z.shape
    return (grad_out.dtype == z.dtype and grad_out.device == z.device and tuple(grad_out.shape) == (n, v)
            and (v <= 1 or grad_out.stride(1) == 1) and (n <= 1 or grad_out.stride(0) >= v))


def kernel_transform(o: RowOptions) -> tuple[float, float]:
    """(softcap, 1 / temperature) as the kernels take them (softcap 0: none)."""
    return (0.0 if o.softcap is None else float(o.softcap)), 1.0 / float(o.temperature)


class NativeRows:
    name = "native"

    def ce(self, z, labels, o: RowOptions, *, want_grad=False, grad_scale=None, grad_out=None, scratch=False,
           all_valid=False):
        if not native.supports("rows", z.device, z.dtype):
            return _TORCH_ROWS.ce(z, labels, o, want_grad=want_grad, grad_scale=grad_scale, grad_out=grad_out,
                                  scratch=scratch, all_valid=all_valid)
        z_in = z
        z = _row_major(z)
        n = z.shape[0]
        y = index64(labels)
        softcap, inv_temp = kernel_transform(o)
        opts = (o.ignore_index, float(o.label_smoothing), float(o.z_loss), softcap, inv_temp)
        if not want_grad:
            loss, lse = native.ce_rows(z, y, None, None, *opts)
            return loss, lse, None
        scale = None if grad_scale is None else _per_row(grad_scale, n, compute_dtype(z.dtype))
        own_copy = z is not z_in  # z is a private contiguous copy: free to overwrite
        if grad_out is None and (scratch or own_copy):
            loss, lse = native.ce_rows_inplace(z, y, scale, *opts)
            return loss, lse, z
        if grad_out is None:
            grad = torch.empty_like(z)
            loss, lse = native.ce_rows(z, y, scale, grad, *opts)
            return loss, lse, grad
        if grad_out is z_in and not own_copy:
            loss, lse = native.ce_rows_inplace(z, y, scale, *opts)
            return loss, lse, grad_out
        if _writable(grad_out, z):  # an exact alias of z (another view object) is fine: the op allows it
            loss, lse = native.ce_rows(z, y, scale, grad_out, *opts)
            return loss, lse, grad_out
        buf = z if own_copy else torch.empty_like(z)  # any other layout or dtype: compute, then copy
        loss, lse = native.ce_rows(z, y, scale, buf, *opts) if buf is not z else native.ce_rows_inplace(z, y, scale,
                                                                                                       *opts)
        grad_out.copy_(buf)
        return loss, lse, grad_out

    def logprob_fwd(self, z, targets, o: RowOptions, want_entropy: bool):
        if z.device.type != "cpu" or not native.supports("rows", z.device, z.dtype):
            return _TORCH_ROWS.logprob_fwd(z, targets, o, want_entropy)
        z = _row_major(z)
        softcap, inv_temp = kernel_transform(o)
        logp, lse, mean_s = native.logprob_fwd(z, index64(targets), o.ignore_index, softcap, inv_temp,
                                               bool(want_entropy))
        return logp, lse, (mean_s if want_entropy else None)

    def logprob_bwd(self, z, targets, lse, mean_s, g_logp, g_ent, o: RowOptions, grad_out):
        if z.device.type != "cpu" or not native.supports("rows", z.device, z.dtype):
            return _TORCH_ROWS.logprob_bwd(z, targets, lse, mean_s, g_logp, g_ent, o, grad_out)
        z_in = z
        z = _row_major(z)
        n = z.shape[0]
        cd = compute_dtype(z.dtype)
        y = index64(targets)
        lse = lse.to(cd).contiguous()
        g_logp = _per_row(g_logp, n, cd).contiguous()
        if g_ent is not None:
            g_ent = _per_row(g_ent, n, cd).contiguous()
            mean_s = mean_s.to(cd).contiguous()
        else:
            mean_s = None
        softcap, inv_temp = kernel_transform(o)
        opts = (o.ignore_index, softcap, inv_temp)
        own_copy = z is not z_in
        if grad_out is z_in and not own_copy:
            native.logprob_bwd_inplace(z, y, lse, mean_s, g_logp, g_ent, *opts)
        elif _writable(grad_out, z):
            native.logprob_bwd(z, y, lse, mean_s, g_logp, g_ent, grad_out, *opts)
        else:
            buf = z if own_copy else torch.empty_like(z)
            if buf is z:
                native.logprob_bwd_inplace(z, y, lse, mean_s, g_logp, g_ent, *opts)
            else:
                native.logprob_bwd(z, y, lse, mean_s, g_logp, g_ent, buf, *opts)
            grad_out.copy_(buf)


NATIVE_ROWS = NativeRows()
ROWS = NATIVE_ROWS


# ---------------------------------------------------------------------------------------- group advantages


def group_advantages(r, group_size: int, scale: str, eps: float):
    # NaN (unscorable) rewards take the torch ops' nanmean / nanstd: the csrc kernels assume finite rewards.
    # The check is the call's one host synchronization on CUDA.
    if not native.supports("vector", r.device, r.dtype) or bool(torch.isnan(r).any()):
        return torch_backend.group_advantages(r, group_size, scale, eps)
    return native.group_advantages(r.contiguous(), group_size, native.SCALE_MODES[scale], float(eps))


# ------------------------------------------------------------------------------------------------------ GAE


def gae(rewards, values, mask, gamma: float, lam: float):
    if not native.supports("vector", values.device, values.dtype):
        return torch_backend.gae(rewards, values, mask, gamma, lam)
    return native.gae(rewards.contiguous(), values.contiguous(), mask.contiguous(), gamma, lam)


# ------------------------------------------------------------------------------------------- segment sums


def sequence_supported(x: torch.Tensor) -> bool:
    """Whether the native segment sums take ``x`` here (else the op runs the torch ones)."""
    return native.supports("vector", x.device, compute_dtype(x.dtype))


def _segment_sums(x, m, cu, n_seq, average):
    """The native segment sums in the compute dtype: (out [S], den [S])."""
    cd = compute_dtype(x.dtype)
    xc = x.to(cd).contiguous()
    mc = None if m is None else m.to(cd).contiguous()
    return native.segment_sums(xc, mc, None if cu is None else cu.to(torch.int64).contiguous(), n_seq, average)


def sequence_bwd(g, den, m, cu, seg, n_seq, seq_len, packed, average, shape, dtype):
    cd = g.dtype
    total = shape[0] if packed else n_seq * seq_len
    mc = None if m is None else m.to(cd).contiguous()
    grad = native.segment_sums_bwd(g.contiguous(), den.to(cd).contiguous(), mc,
                                   cu.to(torch.int64).contiguous() if packed else None, total, seq_len, average)
    return grad.to(dtype)


def sequence_fwd(x, mask, cu, seg, n_seq, seq_len, packed, average):
    return _segment_sums(x, mask, cu, n_seq, average)

"""The small-shape path of ``linear_cross_entropy`` on CPU: the chunk loop's work for one chunk, in a straight
line with no machinery between the GEMMs.

    valid rows (``nonzero``; skipped when none is masked)   gather h and labels of the valid rows
    z  = h_v @ W.T (+ b)                                    GEMM 1
    native row kernel, called directly: loss, and dz (times 1/n_valid for "mean") written over z
    dh = zeros; dh[valid] = dz @ W                          GEMM 2
    dW = dz.T @ h_v;  db = dz.sum(0)                        GEMM 3 (fp32 for fp32/fp64 input, as the loop)

Why: at the quick preset's head (N=64, D=128, V=872, fp32) one call is ~0.8 ms, the three GEMMs ~0.5 ms of it
(each at the single core's peak), so eager's own Python (~0.3 ms) and ours decide the ratio. Through the general
path's machinery (row plan, precompute-or-recompute skeleton, the row op's argument checks) the fused op was
1.2x eager there; this path is ~0.85x at 25% masked rows (benchmarks/RESULTS.md). Masked rows skip the GEMMs as
in the chunk loop (eager computes them), so the more rows are masked the more it saves.

It is taken only where nothing else must see the ops (``takes_small_path``): CPU tensors the native row kernel
supports, plain eager code (no torch.compile, functorch transform, dispatch mode or tensor subclass: those get
the general path and its custom ops), reduction "mean" or "sum", memory "default", not sync-free, and a shape
within ``chunking.one_chunk``. The row kernel gets only tensors built here in its layout, so its argument checks
are skipped; it still counts out-of-range labels and the call raises ``ValueError`` for them.
"""

from __future__ import annotations

import torch

from ..types import compute_dtype
from .backends import native_ops
from .backends.base import RowOptions
from .core import gemm
from .core.chunking import finish_head_grads, one_chunk


def takes_small_path(backend: str, hidden2d: torch.Tensor, weight: torch.Tensor, bias, labels1d: torch.Tensor,
                     reduction: str, memory: str, sync_free: bool, chunk: int) -> bool:
    return (backend == "native" and hidden2d.device.type == "cpu" and reduction != "none" and memory == "default"
            and not sync_free and native_ops.supports("rows", hidden2d.device, hidden2d.dtype)
            and one_chunk(hidden2d.shape[0], chunk, weight.shape[0], hidden2d.shape[1])
            and native_ops.plain_eager((hidden2d, weight, bias, labels1d)))


def _valid_rows(labels1d: torch.Tensor, ignore_index: int):
    """(index of the valid rows or None when every row is valid, their count)."""
    index = (labels1d != ignore_index).nonzero().squeeze(1)
    n_valid = index.shape[0]
    return (None if n_valid == labels1d.shape[0] else index), n_valid


class SmallLinearCrossEntropy(torch.autograd.Function):
    """Forward forms the loss and, when wanted, the gradients; backward scales them by the incoming scalar."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels1d, o: RowOptions, reduction: str):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        ctx.dtypes = (hidden2d.dtype, weight.dtype)
        cd = compute_dtype(hidden2d.dtype)
        index, n_valid = _valid_rows(labels1d, o.ignore_index)
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        ctx.grads = (None, None, None)
        if n_valid == 0:
            if need_dh or need_dw or need_db:
                ctx.grads = (torch.zeros_like(hidden2d) if need_dh else None,
                             torch.zeros(weight.shape, dtype=cd) if need_dw else None,
                             torch.zeros(weight.shape[0], dtype=cd) if need_db else None)
            return hidden2d.new_zeros((), dtype=cd)
        h = hidden2d if index is None else hidden2d.index_select(0, index)
        y = labels1d if index is None else labels1d.index_select(0, index)
        y = y if y.dtype == torch.int64 and y.is_contiguous() else y.to(torch.int64).contiguous()
        z = gemm.logits(h, weight, bias)
        grad = need_dh or need_dw or need_db
        row_scale = torch.full((1,), scale, dtype=cd) if grad and scale != 1.0 else None  # one for all rows
        softcap = 0.0 if o.softcap is None else float(o.softcap)
        loss, _ = native_ops.launch_ce(z, y, row_scale, z if grad else None, o.ignore_index, o.label_smoothing,
                                       o.z_loss, softcap, 1.0 / o.temperature)
        if grad:
            gh = None
            if need_dh:
                gh = gemm.input_grad(z, weight)
                if index is not None:
                    gh = torch.zeros_like(hidden2d).index_copy_(0, index, gh)
            ctx.grads = (gh, gemm.weight_grad(z, h, cd) if need_dw else None,
                         z.sum(dim=0, dtype=cd) if need_db else None)
        return loss.mean() if reduction == "mean" else loss.sum()  # loss holds exactly the valid rows

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None
        gh, gw, gb = finish_head_grads(grads, grad_out, *ctx.dtypes)
        return gh, gw, gb, None, None, None

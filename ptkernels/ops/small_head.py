"""The CPU small-shape paths of ``linear_cross_entropy`` and ``linear_token_logprobs``: the chunk loop's work for
one chunk, in a straight line with no machinery between the GEMMs.

    valid rows (``nonzero``; skipped when none is masked)   gather h and the labels of the valid rows
    z  = h_v @ W.T (+ b)                                    GEMM 1
    native row kernel, called directly                      cross-entropy: loss, and dz (times 1/n_valid for
                                                            "mean") written over z; log-probs: log p, lse
    dh = zeros; dh[valid] = dz @ W                          GEMM 2
    dW = dz.T @ h_v;  db = dz.sum(0)                        GEMM 3 (fp32 for fp32/fp64 input, as the loop)

Cross-entropy forms the gradients in forward (its incoming gradient is a scalar); log-probs keep z and form dz
in backward from the incoming per-token gradient (3 GEMMs either way, as eager).

Why: at the quick preset's head (N=64, D=128, V=872, fp32) one call is ~0.8 ms, the three GEMMs ~0.5 ms of it
(each at the single core's peak), so eager's own Python (~0.3 ms) and ours decide the ratio. Through the general
path's machinery (row plan, precompute-or-recompute skeleton, the row ops' argument checks) the fused CE was
1.2x eager there and token log-probs 1.23x; on this path, 25% of rows masked, one thread: 0.90-0.94x and 1.00x
(two threads: 1.02-1.07x and 1.14x, since the small GEMMs parallelize poorly and the fixed cost does not;
benchmarks/RESULTS.md). Masked rows skip the GEMMs as in the chunk loop (eager computes them), so the more rows
are masked the more it saves.

It is taken only where nothing else must see the ops (``takes_small_path``): CPU tensors the native row kernels
support, plain eager code (no torch.compile, functorch transform, dispatch mode or tensor subclass: those get
the general path and its custom ops), memory "default", not sync-free, and a shape within ``small_shape``
(every row in one chunk, at most ``SMALL_PATH_MAX_MACS`` multiply-adds per GEMM). The row kernels get only
tensors built here in their layout, so their argument checks are skipped; they still count out-of-range labels
and the call raises ``ValueError`` for them.
"""

from __future__ import annotations

import torch

from ..types import compute_dtype
from .backends import native_ops
from .backends.base import RowOptions
from .backends.native import index64, kernel_transform
from .core import gemm
from .core.chunking import finish_head_grads, one_chunk

# Up to this many multiply-adds per GEMM (rows x V x D) the straight line beats the chunk loop even with every row
# in one chunk (it skips the loop's row plan, zeroed accumulators and scatters). Interleaved A/B on the 2-core AMD
# EPYC Zen 3, 25% masked, fp32, 2 threads, time of this path over the chunk loop's (CE / token log-probs): N=512,
# D=128, V=872 (2^25.8) 0.78 / 0.70; N=1024 (2^26.8) 0.95 / 0.91; N=2048 (2^27.8) 0.97 / 0.85; N=4096 (2^28.8)
# 0.98-0.99 / 0.93-0.99; N=256, D=2048, V=872 (2^28.8) 0.99 / 0.97; N=128, D=512, V=8192 (2^29) 0.95-1.00 /
# 0.98-0.99; N=64, D=2048, V=4096 (2^29) 1.00 / 0.98; and above it N=1024, D=128, V=8192 (2^30) 1.06 / 1.00,
# N=256, D=512, V=8192 (2^30) 1.00 / 1.00. (The bound of the other backends' one-chunk path,
# chunking.ONE_CHUNK_MAX_MACS, is lower: that path runs the masked rows through the GEMMs.)
SMALL_PATH_MAX_MACS = 1 << 29


def small_shape(n_rows: int, chunk: int, num_classes: int, dim: int) -> bool:
    return one_chunk(n_rows, chunk, num_classes, dim, SMALL_PATH_MAX_MACS)


def takes_small_path(backend: str, hidden2d: torch.Tensor, weight: torch.Tensor, bias, labels1d: torch.Tensor,
                     memory: str, sync_free: bool, chunk: int) -> bool:
    return (backend == "native" and hidden2d.device.type == "cpu" and memory == "default" and not sync_free
            and native_ops.supports("rows", hidden2d.device, hidden2d.dtype)
            and small_shape(hidden2d.shape[0], chunk, weight.shape[0], hidden2d.shape[1])
            and native_ops.plain_eager((hidden2d, weight, bias, labels1d)))


def _valid_rows(labels1d: torch.Tensor, ignore_index: int):
    """(index of the valid rows or None when every row is valid, their count)."""
    index = (labels1d != ignore_index).nonzero().squeeze(1)
    n_valid = index.shape[0]
    return (None if n_valid == labels1d.shape[0] else index), n_valid


def _rows(index, hidden2d: torch.Tensor, labels1d: torch.Tensor):
    """The valid rows of the hidden states and of the labels (as they are when ``index`` is None), the labels
    as the kernels take them."""
    if index is None:
        return hidden2d, index64(labels1d)
    return hidden2d.index_select(0, index), index64(labels1d.index_select(0, index))


def _head_grads(g, h, hidden2d, weight, index, need_dh, need_dw, need_db):
    """GEMMs 2 and 3 (and the bias sum) from the valid rows' gradient ``g``; dh scattered to every row."""
    cd = compute_dtype(hidden2d.dtype)
    gh = None
    if need_dh:
        gh = gemm.input_grad(g, weight)
        if index is not None:
            gh = torch.zeros_like(hidden2d).index_copy_(0, index, gh)
    return gh, gemm.weight_grad(g, h, cd) if need_dw else None, g.sum(dim=0, dtype=cd) if need_db else None


class SmallLinearCrossEntropy(torch.autograd.Function):
    """Forward forms the loss and, when wanted, the gradients; backward scales them by the incoming scalar."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels1d, o: RowOptions, reduction: str):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.dtypes = (hidden2d.dtype, weight.dtype)
        cd = compute_dtype(hidden2d.dtype)
        index, n_valid = _valid_rows(labels1d, o.ignore_index)
        ctx.grads = (None, None, None)
        if n_valid == 0:
            ctx.grads = _zero_grads(hidden2d, weight, need)
            return hidden2d.new_zeros((), dtype=cd)
        h, y = _rows(index, hidden2d, labels1d)
        z = gemm.logits(h, weight, bias)
        grad = any(need)
        scale = torch.full((1,), 1.0 / n_valid, dtype=cd) if grad and reduction == "mean" else None
        loss, _ = native_ops.launch_ce(z, y, scale, z if grad else None, o.ignore_index, o.label_smoothing,
                                       o.z_loss, *kernel_transform(o))
        if grad:
            ctx.grads = _head_grads(z, h, hidden2d, weight, index, *need)
        return loss.mean() if reduction == "mean" else loss.sum()  # loss holds exactly the valid rows

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None
        gh, gw, gb = finish_head_grads(grads, grad_out, *ctx.dtypes)
        return gh, gw, gb, None, None, None


def _scatter(x: torch.Tensor | None, index: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return x if x is None or index is None else x.new_zeros(n).index_copy_(0, index, x)


def _take(x: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
    """An incoming per-row gradient for the kernel: the valid rows, contiguous."""
    if x is None:
        return None
    return x.index_select(0, index) if index is not None else x.contiguous()


class SmallLinearTokenLogprobs(torch.autograd.Function):
    """Forward keeps the valid rows' logits; backward forms dz from the incoming gradients, then GEMMs 2 and 3."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, targets1d, o: RowOptions, want_entropy: bool):
        ctx.set_materialize_grads(False)
        cd = compute_dtype(hidden2d.dtype)
        n = hidden2d.shape[0]
        index, n_valid = _valid_rows(targets1d, o.ignore_index)
        h, t = _rows(index, hidden2d, targets1d)
        z = gemm.logits(h, weight, bias)
        logp, lse = torch.empty(n_valid, dtype=cd), torch.empty(n_valid, dtype=cd)
        mean_s = torch.empty(n_valid, dtype=cd) if want_entropy else None
        if n_valid:
            native_ops.launch_logprob_fwd(z, t, logp, lse, mean_s, o.ignore_index, *kernel_transform(o))
        ctx.o = o
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden2d, weight, bias, h, t, lse, mean_s, z, index)
        logp = _scatter(logp, index, n)
        return (logp, _scatter(lse - mean_s, index, n)) if want_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden2d, weight, bias, h, t, lse, mean_s, z, index = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None
        if z.shape[0] == 0:  # no valid row
            grads = _zero_grads(hidden2d, weight, need)
        else:
            g_logp = _take(g_logp, index) if g_logp is not None else torch.zeros_like(lse)
            g = torch.empty_like(z)  # a fresh buffer keeps z for a second backward
            native_ops.launch_logprob_bwd(z, t, lse, mean_s, g_logp, _take(g_ent, index), g, ctx.o.ignore_index,
                                          *kernel_transform(ctx.o))
            grads = _head_grads(g, h, hidden2d, weight, index, *need)
        return (*finish_head_grads(grads, None, hidden2d.dtype, weight.dtype), None, None, None)


def _zero_grads(hidden2d, weight, need):
    """(dh, dW, db) of a call with no valid row: zeros where wanted."""
    cd = compute_dtype(hidden2d.dtype)
    return (torch.zeros_like(hidden2d) if need[0] else None, torch.zeros(weight.shape, dtype=cd) if need[1] else None,
            torch.zeros(weight.shape[0], dtype=cd) if need[2] else None)

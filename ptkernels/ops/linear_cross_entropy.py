"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T + bias, labels)`` without the [N, V] logits.

The loop (one chunk of valid rows at a time):
    z   = h_c @ W.T (+ b)                  GEMM 1, one chunk of logits, never the whole matrix
    row kernel: loss_c, and dz = dloss/dz written in place of z (fp32 math; see ops/backends/torch.py)
    dh_c = dz @ W                           GEMM 2
    dW  += dz.T @ h_c  (fp32 accumulator)   GEMM 3
For reduction "mean"/"sum" the gradients are computed in the forward pass (three GEMMs in all; backward only
scales them by the incoming scalar gradient). For reduction "none" the incoming gradient is per token, so
backward recomputes the logits chunk by chunk (four GEMMs). With no gradient needed, only GEMM 1 runs.

Small shapes (``chunking.one_chunk``: every row fits one chunk and the GEMMs are below ``ONE_CHUNK_MAX_MACS``)
take a straight-line path instead of the loop: the three GEMMs over all rows, masked ones included (the row
kernel gives them loss 0 and a zero gradient, and the mean's 1/n_valid scales the gradient inside the row
kernel), ``dh = dz @ W`` and ``dW = dz.T @ h`` written once, no ``nonzero``, gather, scatter or zeroed buffers.
The same formulas in the same order per row; only GEMM 3 sums over a different set of zero rows. On CPU with
the native rows in plain eager code (reduction "mean"/"sum"), shapes up to ``small_head.SMALL_PATH_MAX_MACS``
(2^29, every row in one chunk) take ``small_head`` instead: the valid rows only, no autograd machinery between
the GEMMs (the fixed cost decides there).

``memory="compact"`` drops GEMM 3 from the loop (which keeps each row's lse instead) and forms dW and db
afterwards one block of the vocabulary at a time (ops/core/vocab_blocks.py): no fp32 [V, D] accumulator, one
more GEMM over the logits, no fast path.
"""

from __future__ import annotations

import torch

from .. import reference
from ..types import compute_dtype
from .backends import get_block_rows, get_rows
from .backends.base import RowOptions
from .core import gemm, vocab_blocks
from .core.checks import check_head, check_labels, check_options
from .core.chunking import (
    ChunkLogits,
    RowPlan,
    apply_head_grads,
    default_chunk_size,
    one_chunk,
    put,
    take,
    want_sync_free,
)
from .core.dispatch import kernel_counts_bad_labels, resolve_backend
from .core.grad_mode import for_autograd
from .core.head_loss import head_loss_backward, head_loss_forward
from .small_head import SmallLinearCrossEntropy, takes_small_path


def _ce_chunk_loop(hidden2d, weight, bias, labels1d, plan: RowPlan, rows_impl, o: RowOptions, row_scale,
                   need_dh: bool, need_dw: bool, need_db: bool, lse_out: torch.Tensor | None = None):
    """Runs the chunk loop. ``row_scale(rows, c)`` gives the gradient weight (float or per-row tensor), or is
    None when no gradient is wanted. ``lse_out [N]``: where to keep each row's log-sum-exp."""
    cd = compute_dtype(hidden2d.dtype)
    n, d = hidden2d.shape
    v = weight.shape[0]
    loss = torch.zeros(n, dtype=cd, device=hidden2d.device)
    grads = row_scale is not None
    gh = torch.zeros_like(hidden2d) if grads and need_dh else None
    gw = (gemm.weight_grad_buffer(weight, hidden2d, cd, plan.rows_per_chunk, plan.n_process)
          if grads and need_dw else None)
    gb = torch.zeros(v, dtype=cd, device=weight.device) if grads and need_db else None
    all_valid = plan.index is not None
    logits = ChunkLogits(plan.n_process, plan.chunk, hidden2d, weight)
    for rows in plan.chunks():
        h = take(hidden2d, rows)
        z = logits(h, weight, bias)
        loss_c, lse_c, g = rows_impl.ce(z, take(labels1d, rows), o, want_grad=grads, scratch=True,
                                        all_valid=all_valid)
        put(loss, rows, loss_c)
        if lse_out is not None:
            put(lse_out, rows, lse_c)
        if grads:
            apply_head_grads(g, h, weight, rows, row_scale(rows, h.shape[0]), gh, gw, gb)
        del z, g  # dead: freed before the next chunk's GEMM 1 allocates its logits (one chunk alive, not two)
    return loss, gh, gw, gb


def _ce_one_chunk(hidden2d, weight, bias, labels1d, rows_impl, o: RowOptions, grad_scale, need_dh: bool,
                  need_dw: bool, need_db: bool):
    """The small-shape fast path (module docstring): ``grad_scale`` None (no gradient), 1.0, a 0-dim or a
    per-row tensor."""
    cd = compute_dtype(hidden2d.dtype)
    n = hidden2d.shape[0]
    z = gemm.logits(hidden2d, weight, bias)
    if grad_scale is None:
        loss, _, _ = rows_impl.ce(z, labels1d, o, want_grad=False)
        return loss, None, None, None
    if not torch.is_tensor(grad_scale):
        grad_scale = None if grad_scale == 1.0 else torch.full((n,), grad_scale, dtype=cd, device=z.device)
    elif grad_scale.dim() == 0:
        grad_scale = grad_scale.expand(n)
    loss, _, g = rows_impl.ce(z, labels1d, o, want_grad=True, grad_scale=grad_scale, scratch=True)
    if g.dtype != weight.dtype:  # the torch rows return fp32 work buffers; the GEMMs run in the input dtype
        g = g.to(weight.dtype)
    gh = gemm.input_grad(g, weight) if need_dh else None
    gw = gemm.weight_grad(g, hidden2d, cd) if need_dw else None
    gb = g.sum(dim=0, dtype=cd) if need_db else None
    return loss, gh, gw, gb


def _ce_compact(hidden2d, weight, bias, labels1d, plan: RowPlan, rows_impl, block_rows, o: RowOptions, row_scale,
                need_dh: bool, need_dw: bool, need_db: bool):
    """``memory="compact"``: the chunk loop forms the loss, each row's lse and dX (GEMMs 1 and 2), then dW and
    db are formed one block of the vocabulary at a time (ops/core/vocab_blocks.py: GEMM 1 again and GEMM 3),
    never in a [V, D] fp32 accumulator."""
    n = hidden2d.shape[0]
    lse = torch.zeros(n, dtype=compute_dtype(hidden2d.dtype), device=hidden2d.device)
    loss, gh, _, _ = _ce_chunk_loop(hidden2d, weight, bias, labels1d, plan, rows_impl, o,
                                    row_scale if need_dh else None, need_dh, False, False, lse_out=lse)
    if row_scale is None or not (need_dw or need_db):
        return loss, gh, None, None
    coef = vocab_blocks.ce_coefficients(lse, row_scale(slice(None), n), o.z_loss, o.label_smoothing,
                                        weight.shape[0])
    gw, gb = vocab_blocks.weight_grads(hidden2d, weight, bias, labels1d, lse, coef, False, plan, block_rows, o,
                                       need_dw, need_db)
    return loss, gh, gw, gb


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Precompute-or-recompute (ops/core/head_loss.py) over ``_ce_chunk_loop``."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels1d, o: RowOptions, reduction: str, chunk: int, rows_impl,
                sync_free: bool, block_rows):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.args = (o, chunk, rows_impl, sync_free, need, block_rows)
        run, make_plan = LinearCrossEntropyFunction._loop(ctx.args)
        return head_loss_forward(ctx, (hidden2d, weight, bias, labels1d), run, make_plan, reduction, need)

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = head_loss_backward(ctx, grad_out, *LinearCrossEntropyFunction._loop(ctx.args))
        return gh, gw, gb, None, None, None, None, None, None, None

    @staticmethod
    def _loop(args):
        o, chunk, rows_impl, sync_free, need, block_rows = args  # block_rows: None unless memory="compact"

        def make_plan(tensors):
            hidden2d, weight, labels1d = tensors[0], tensors[1], tensors[3]
            small = block_rows is None and one_chunk(hidden2d.shape[0], chunk, weight.shape[0], hidden2d.shape[1])
            # The fast path's plan: all rows in one slice, n_valid a tensor (no synchronization; CPU: an int)
            return RowPlan(labels1d, o.ignore_index, chunk, sync_free, single=small)

        def run(tensors, plan, row_scale):
            hidden2d, weight, bias, labels1d = tensors
            if plan.single:
                scale = None if row_scale is None else row_scale(slice(None), hidden2d.shape[0])
                return _ce_one_chunk(hidden2d, weight, bias, labels1d, rows_impl, o, scale, *need)
            if block_rows is not None:
                return _ce_compact(hidden2d, weight, bias, labels1d, plan, rows_impl, block_rows, o, row_scale,
                                   *need)
            return _ce_chunk_loop(hidden2d, weight, bias, labels1d, plan, rows_impl, o, row_scale, *need)

        return run, make_plan


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    shift: bool = False,
    chunk_size: int | None = None,
    sync_free: bool | None = None,
    memory: str = "default",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, never materializing the logits.

    Per token, with ``s = softcap * tanh(z / softcap) / temperature`` and ``lse = logsumexp(s)``::

        loss = (1 - label_smoothing) * (lse - s[label]) + label_smoothing * (lse - mean(s)) + z_loss * lse**2

    Args:
        hidden: ``[..., D]`` final hidden states (any float dtype).
        weight: ``[V, D]`` output head. ``bias``: optional ``[V]``.
        labels: ``[...]`` integer class ids; ``ignore_index`` marks masked tokens (prompt, padding), which are
            skipped before any matmul.
        reduction: "mean" (over non-ignored tokens; 0 when there are none), "sum" or "none" (``[...]``, 0 at
            ignored tokens, fp32).
        shift: Hugging Face's causal convention: position t predicts ``labels[..., t + 1]``. The labels are
            shifted (last position ignored); the hidden states are not copied.
        chunk_size: rows of logits per chunk (default: see ``ops.core.chunking.default_chunk_size``).
        sync_free: default (None) finds the valid rows with one host-device synchronization per call; True
            never synchronizes (masked rows skipped on the device, their GEMM rows still computed); None turns
            it on under torch.compile and CUDA-graph capture.
        memory: "default" or "compact". The default forms the weight gradient in an fp32 ``[V, D]``
            accumulator beside the gradient itself (for bf16 weights 2x the size of dW: 2 GB at V=128256,
            D=4096). "compact" never allocates it: once the loop has every row's log-sum-exp, dW is formed one
            block of the vocabulary at a time, each block summed in fp32 over all rows and written once in the
            weight's dtype (ops/core/vocab_blocks.py). Same numerics rule (fp32 sums, one rounding); the cost
            is one more GEMM over the logits (4 instead of 3 for "mean"/"sum", 5 instead of 4 for "none") and
            no small-shape fast path. Use it when the fp32 accumulator decides whether the model fits (large
            vocabulary x hidden size in bf16 on a GPU). The native backend runs the torch backend's block
            gradient for it.
        backend: "auto", "reference", "torch", "triton" or "native" (see ``ptkernels.backends()``).

    Returns the loss in fp32 (fp64 for fp64 input). Losses, log-sum-exps and the weight gradient are
    accumulated in fp32 whatever the input dtype.
    """
    check_head(hidden, weight, bias)
    check_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                  temperature=temperature, chunk_size=chunk_size, memory=memory)
    name = resolve_backend(backend, hidden.device)
    check_labels("labels", labels, hidden.shape[:-1], weight.shape[0], ignore_index, hidden, "hidden",
                 check_range=not kernel_counts_bad_labels(name, hidden.device))
    if shift:
        labels = reference.shift_labels(labels, ignore_index)
    o = RowOptions(ignore_index=ignore_index, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                   softcap=None if softcap is None else float(softcap), temperature=float(temperature))
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.device, hidden.dtype, hidden.shape[-1])
    hidden2d, weight, bias = for_autograd(hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1]),
                                          weight, bias)
    labels1d = labels if labels.dim() == 1 else labels.reshape(-1)
    sync_free = want_sync_free(sync_free, hidden.device)
    if reduction != "none" and takes_small_path(name, hidden2d, weight, bias, labels1d, memory, sync_free, chunk):
        return SmallLinearCrossEntropy.apply(hidden2d, weight, bias, labels1d, o, reduction)
    if name == "reference":
        return reference.linear_cross_entropy(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, temperature=temperature)
    block_rows = get_block_rows(name) if memory == "compact" else None
    out = LinearCrossEntropyFunction.apply(hidden2d, weight, bias, labels1d, o, reduction, chunk,
                                           get_rows(name), sync_free, block_rows)
    return out.view(labels.shape) if reduction == "none" else out

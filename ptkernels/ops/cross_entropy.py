"""Cross-entropy from logits, for users who already have them: one pass, gradient in place if allowed.

One call of the row function per chunk of rows computes the loss and, when a gradient will be needed, the
gradient of the logits too (reduction "mean"/"sum": backward only scales it). With
``inplace_backward=True`` that gradient overwrites the logits (no second [N, V] buffer): only use it when
nothing else reads the logits afterwards. Any vocabulary size works: the row kernels loop over V.
"""

from __future__ import annotations

import torch

from .. import reference
from ..types import compute_dtype
from .backends import get_rows
from .backends.base import RowOptions
from .core.checks import check_float, check_labels, check_options
from .core.chunking import default_chunk_size
from .core.dispatch import resolve_backend
from .core.grad_mode import for_autograd


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, labels1d, o: RowOptions, reduction: str, chunk: int, rows_impl, inplace: bool):
        cd = compute_dtype(logits2d.dtype)
        n = logits2d.shape[0]
        valid = labels1d != o.ignore_index
        n_valid = valid.sum().clamp(min=1).to(cd)  # stays on the device: no synchronization
        precompute = ctx.needs_input_grad[0] and reduction != "none"
        grad = None
        if precompute:
            grad = logits2d if inplace else torch.empty_like(logits2d)
            scale = (1.0 / n_valid) if reduction == "mean" else torch.ones((), dtype=cd, device=logits2d.device)
        loss = torch.zeros(n, dtype=cd, device=logits2d.device)
        for rows in _chunks(n, chunk):
            z = logits2d[rows]
            gs = scale.expand(z.shape[0]) if precompute else None
            loss[rows], _, _ = rows_impl.ce(z, labels1d[rows], o, want_grad=precompute, grad_scale=gs,
                                            grad_out=grad[rows] if precompute else None)
        ctx.mode = "precomputed" if precompute else "recompute"
        if precompute:
            ctx.grad = grad
        elif ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits2d, labels1d)
            ctx.args = (o, chunk, rows_impl, inplace)
        if reduction == "none":
            return loss
        return loss.sum() / n_valid if reduction == "mean" else loss.sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.mode == "precomputed":
            grad, ctx.grad = ctx.grad, None
            return grad.mul_(grad_out), None, None, None, None, None, None
        logits2d, labels1d = ctx.saved_tensors
        o, chunk, rows_impl, inplace = ctx.args
        grad = logits2d if inplace else torch.empty_like(logits2d)
        g = grad_out.to(compute_dtype(logits2d.dtype))
        for rows in _chunks(logits2d.shape[0], chunk):
            rows_impl.ce(logits2d[rows], labels1d[rows], o, want_grad=True, grad_scale=g[rows], grad_out=grad[rows])
        return grad, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy from ``logits [..., V]`` and ``labels [...]``; same formula and options as
    ``linear_cross_entropy``. ``inplace_backward=True`` writes the gradient over ``logits`` (saves one
    [N, V] buffer; the logits must not be read again). Never synchronizes with the device."""
    check_float("logits", logits)
    check_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                  temperature=temperature, chunk_size=chunk_size)
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension [..., V]")
    check_labels("labels", labels, logits.shape[:-1], logits.shape[-1], ignore_index, logits, "logits")
    name = resolve_backend(backend, logits.device)
    if name == "reference":
        return reference.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction,
                                       label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                       temperature=temperature)
    o = RowOptions(ignore_index=ignore_index, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                   softcap=None if softcap is None else float(softcap), temperature=float(temperature))
    v = logits.shape[-1]
    logits2d = logits.reshape(-1, v)
    if not logits2d.is_contiguous():
        logits2d = logits2d.contiguous()
    chunk = chunk_size or default_chunk_size(v, logits.device)
    (logits2d,) = for_autograd(logits2d)  # (and inplace_backward never writes into logits here)
    out = CrossEntropyFunction.apply(logits2d, labels.reshape(-1), o, reduction, chunk, get_rows(name),
                                     bool(inplace_backward))
    return out.view(labels.shape) if reduction == "none" else out

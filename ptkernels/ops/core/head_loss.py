"""The precompute-or-recompute autograd skeleton of a per-row loss over an output head (linear cross-entropy,
linear JSD): the two halves of their ``torch.autograd.Function``.

For ``reduction="mean"`` or ``"sum"`` each row's gradient weight is known before the loop (1/n_valid or 1),
so the forward chunk loop also forms d loss / d (hidden, weight, bias), and backward only scales them by the
incoming scalar (3 GEMMs in all). For ``reduction="none"`` the incoming gradient is per row: forward saves the
inputs and backward runs the chunk loop again with it (4 GEMMs). An op supplies ``run(tensors, plan, row_scale)``
-> ``(loss [n], gh, gw, gb)`` (``row_scale`` None: no gradient; else ``row_scale(rows, c)`` gives the weight of a
chunk's rows, a float or a ``[c]`` tensor) and ``make_plan(tensors)`` -> its row plan.
"""

from __future__ import annotations

import torch

from ...types import compute_dtype
from .chunking import finish_head_grads, reduction_scale, take


def head_loss_forward(ctx, tensors: tuple, run, make_plan, reduction: str, need: tuple[bool, bool, bool]):
    """The loss (reduced); ``tensors`` start with (hidden2d, weight) and are saved for a recompute."""
    hidden2d, weight = tensors[0], tensors[1]
    any_grad = any(need)
    plan = make_plan(tensors)
    precompute = any_grad and reduction != "none"
    scale, row_scale = reduction_scale(plan, reduction, compute_dtype(hidden2d.dtype))
    loss, gh, gw, gb = run(tensors, plan, row_scale if precompute else None)
    ctx.precomputed = precompute
    ctx.dtypes = (hidden2d.dtype, weight.dtype)
    if precompute:
        ctx.grads = (gh, gw, gb)
    elif any_grad:
        ctx.save_for_backward(*tensors)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total * scale if reduction == "mean" else total


def head_loss_backward(ctx, grad_out: torch.Tensor, run, make_plan):
    """(d hidden, d weight, d bias) in the parameters' dtypes."""
    h_dtype, w_dtype = ctx.dtypes
    if ctx.precomputed:
        gh, gw, gb = ctx.grads
        ctx.grads = None
    else:
        tensors = ctx.saved_tensors
        g = grad_out.to(compute_dtype(h_dtype))
        _, gh, gw, gb = run(tensors, make_plan(tensors), lambda rows, c: take(g, rows))
        grad_out = None  # already applied per row
    return finish_head_grads((gh, gw, gb), grad_out, h_dtype, w_dtype)

"""The torch backend's logit transform (shared by every torch row function) and its block gradient for the
compact-memory backward (base.py: ``grad_block``; ops/core/vocab_blocks.py). Re-exported by torch.py, whose
``BLOCK_ROWS`` family this is; kept apart so torch.py stays one job per section under the size limit."""

from __future__ import annotations

import math

import torch

from ...types import compute_dtype
from .base import RowOptions


def work_buffer(z: torch.Tensor, grad_out: torch.Tensor | None) -> torch.Tensor:
    """z in the compute dtype: z itself when the caller lets it be overwritten (``grad_out is z``) and it is
    already in the compute dtype and contiguous, else a copy."""
    if grad_out is z and z.dtype == compute_dtype(z.dtype) and z.is_contiguous():
        return z
    return z.to(compute_dtype(z.dtype), copy=True)


def transform_(s: torch.Tensor, o: RowOptions):
    """s <- softcap*tanh(s/softcap)/T in place; returns dtanh = 1 - tanh^2 (or None) for the chain rule."""
    dtanh = None
    if o.softcap is not None:
        t = s.div_(o.softcap).tanh_()
        dtanh = 1.0 - t * t
        s.mul_(o.softcap)
    if o.temperature != 1.0:
        s.div_(o.temperature)
    return dtanh


def chain_(g: torch.Tensor, dtanh, o: RowOptions) -> None:
    """g <- g * ds/dz in place."""
    if dtanh is not None:
        g.mul_(dtanh)
    if o.temperature != 1.0:
        g.div_(o.temperature)


class TorchBlockRows:
    """``grad_block`` (base.py) in PyTorch ops, any device: the spec of the Triton ``block_grad_kernel``."""

    name = "torch"

    def grad_block(self, z, labels, lse, coef, col0: int, o: RowOptions, *, has_b: bool, grad_out=None):
        s = work_buffer(z, z)  # z is a scratch tile: overwritten when already in the compute dtype
        dtanh = transform_(s, o)
        cd = s.dtype
        valid = labels != o.ignore_index
        coef = torch.where(valid.unsqueeze(1), coef.to(cd), torch.zeros((), dtype=cd, device=s.device))
        a, b, m, c, d = coef.unbind(1)
        # ignored rows: lse is 0 there and exp(s) could overflow; +inf makes p = 0
        lse = torch.where(valid, lse.to(cd), torch.full((), math.inf, dtype=cd, device=s.device))
        p = s.sub(lse.unsqueeze(1)).exp_()
        if has_b:  # p (A + B (s - M)), built in place in s
            g = s.sub_(m.unsqueeze(1)).mul_(b.unsqueeze(1)).add_(a.unsqueeze(1)).mul_(p)
        else:
            g = p.mul_(a.unsqueeze(1))
        g.add_(c.unsqueeze(1))
        y = labels.long() - col0  # the label's column within this block (outside it: no one-hot term)
        hit = valid & (y >= 0) & (y < s.shape[1])
        g.scatter_add_(1, torch.where(hit, y, 0).unsqueeze(1), torch.where(hit, d, 0.0).unsqueeze(1))
        chain_(g, dtanh, o)
        if grad_out is not None and grad_out is not g:
            grad_out.copy_(g)
            return grad_out
        return g


BLOCK_ROWS = TorchBlockRows()

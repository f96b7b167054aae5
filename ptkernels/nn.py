"""nn.Module wrappers of the fused ops, for code that prefers modules to functions."""

from __future__ import annotations

import torch

from .ops.linear_cross_entropy import linear_cross_entropy


class LinearCrossEntropyLoss(torch.nn.Module):
    """``loss_fn(hidden, weight, labels, bias=None)`` = ``ptkernels.linear_cross_entropy`` with fixed options.

    Holds no parameters: pass the output head's weight (e.g. ``model.lm_head.weight``) at call time, so the
    head stays owned (and tied, sharded, saved) by the model.
    """

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, temperature: float = 1.0,
                 shift: bool = False, chunk_size: int | None = None, sync_free: bool | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                            z_loss=z_loss, softcap=softcap, temperature=temperature, shift=shift,
                            chunk_size=chunk_size, sync_free=sync_free, backend=backend)
        # Validate once here, so a bad option fails at construction rather than at the first step.
        from .ops.checks import check_options

        check_options(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                      temperature=temperature, chunk_size=chunk_size)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, labels, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

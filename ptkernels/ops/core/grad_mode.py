"""Inputs as the ops' autograd Functions should see them under the caller's grad mode.

``ctx.needs_input_grad`` reports each input's ``requires_grad`` even under ``torch.no_grad()`` or
``torch.inference_mode()``. The fused ops form gradients in their forward pass (cross-entropy, JSD, the
preference and GRPO losses: three GEMMs instead of one), so without this they would do that work for nothing
when a trainer evaluates, or computes reference / old log-probs, with a model whose head requires grad (and
``cross_entropy(inplace_backward=True)`` would overwrite the caller's logits). The public functions pass their
differentiable inputs through ``for_autograd`` before ``Function.apply``.
"""

from __future__ import annotations

import torch


def for_autograd(*tensors):
    """``tensors`` unchanged when grad mode is on; detached (views, no copy) when it is off. None passes."""
    if torch.is_grad_enabled():
        return tensors
    return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in tensors)

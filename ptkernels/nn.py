"""nn.Module wrappers of the fused ops and losses, for code that prefers modules to functions.

Each module holds only options (no parameters): pass the output head's weight (e.g. ``model.lm_head.weight``)
at call time, so the head stays owned (and tied, sharded, saved) by the model. Options are checked against the
function's signature when the module is built, so a misspelled option fails at construction.
"""

from __future__ import annotations

import inspect

import torch

from .ops.core.checks import check_options
from .ops.fused_grpo import fused_linear_grpo_loss
from .ops.fused_kto import fused_linear_kto_loss
from .ops.fused_preference import fused_linear_preference_loss
from .ops.grpo import grpo_loss
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.linear_jsd import linear_jsd
from .ops.ppo import ppo_policy_loss, ppo_value_loss
from .ops.preference import cpo_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss
from .ops.token_logprobs import linear_token_logprobs


class _FunctionalModule(torch.nn.Module):
    """``Module(**options)(*tensors)`` == ``function(*tensors, **options)``."""

    function = None  # set by subclasses (as a staticmethod)

    def __init__(self, **options):
        super().__init__()
        sig = inspect.signature(type(self).function)
        keyword_only = {n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        unknown = sorted(set(options) - keyword_only)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown option(s) {unknown}; valid: {sorted(keyword_only)}")
        if "memory" in options:  # a bad memory mode fails here, not at the first call
            check_options(memory=options["memory"])
        self.options = options

    def forward(self, *tensors, **kwargs):
        return type(self).function(*tensors, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearCrossEntropyLoss(_FunctionalModule):
    """``loss_fn(hidden, weight, labels, bias=None)`` = ``ptkernels.linear_cross_entropy`` with fixed options."""

    function = staticmethod(linear_cross_entropy)

    def __init__(self, **options):
        super().__init__(**options)
        check_options(**{k: v for k, v in options.items()
                         if k in ("reduction", "label_smoothing", "z_loss", "softcap", "temperature", "chunk_size",
                                   "memory")})


class LinearTokenLogprobs(_FunctionalModule):
    """``fn(hidden, weight, targets)`` = ``ptkernels.linear_token_logprobs`` with fixed options."""

    function = staticmethod(linear_token_logprobs)


class LinearJSDLoss(_FunctionalModule):
    """``loss_fn(hidden, weight, ref_hidden, ref_weight)`` = ``ptkernels.linear_jsd`` (distillation)."""

    function = staticmethod(linear_jsd)


class GRPOLoss(_FunctionalModule):
    """``loss_fn(logps, old_logps, advantages, mask)`` = ``ptkernels.grpo_loss`` → ``GRPOOutput``."""

    function = staticmethod(grpo_loss)


class FusedLinearGRPOLoss(_FunctionalModule):
    """``loss_fn(hidden, weight, completion_ids, completion_mask, advantages)`` = ``fused_linear_grpo_loss``."""

    function = staticmethod(fused_linear_grpo_loss)


class PPOPolicyLoss(_FunctionalModule):
    """``loss_fn(logps, old_logps, advantages, mask)`` = ``ptkernels.ppo_policy_loss`` (clipped surrogate)."""

    function = staticmethod(ppo_policy_loss)


class PPOValueLoss(_FunctionalModule):
    """``loss_fn(values, old_values, returns, mask)`` = ``ptkernels.ppo_value_loss`` (clipped value loss)."""

    function = staticmethod(ppo_value_loss)


class DPOLoss(_FunctionalModule):
    """``loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected)`` = ``ptkernels.dpo_loss``."""

    function = staticmethod(dpo_loss)


class SimPOLoss(_FunctionalModule):
    """``loss_fn(policy_chosen, policy_rejected)`` = ``ptkernels.simpo_loss``."""

    function = staticmethod(simpo_loss)


class ORPOLoss(_FunctionalModule):
    """``loss_fn(policy_chosen, policy_rejected)`` = ``ptkernels.orpo_loss``."""

    function = staticmethod(orpo_loss)


class CPOLoss(_FunctionalModule):
    """``loss_fn(policy_chosen, policy_rejected)`` = ``ptkernels.cpo_loss``."""

    function = staticmethod(cpo_loss)


class KTOLoss(_FunctionalModule):
    """``loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected)`` = ``ptkernels.kto_loss``."""

    function = staticmethod(kto_loss)


class FusedLinearPreferenceLoss(_FunctionalModule):
    """``loss_fn(hidden, weight, labels)`` = ``ptkernels.fused_linear_preference_loss`` ([chosen; rejected])."""

    function = staticmethod(fused_linear_preference_loss)


class FusedLinearKTOLoss(_FunctionalModule):
    """``loss_fn(hidden, weight, labels, desirable)`` = ``ptkernels.fused_linear_kto_loss``."""

    function = staticmethod(fused_linear_kto_loss)

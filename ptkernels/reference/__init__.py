"""Eager PyTorch definitions of every op: the spec and the test oracle. They materialize everything.

Loss references live in submodules (``rl``, ``preference``, ``sequence``): their names would collide here.
"""

from . import preference, rl, sequence
from .cross_entropy import (
    cross_entropy,
    linear_cross_entropy,
    linear_token_logprobs,
    shift_labels,
    token_logprobs,
    transform_logits,
)
from .distill import generalized_jsd, linear_jsd, linear_kl_divergence

__all__ = [
    "preference",
    "rl",
    "sequence",
    "generalized_jsd",
    "linear_jsd",
    "linear_kl_divergence",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_token_logprobs",
    "shift_labels",
    "token_logprobs",
    "transform_logits",
]

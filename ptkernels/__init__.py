"""ptkernels: fused kernels for LLM post-training.

    import ptkernels as ptk
    loss = ptk.linear_cross_entropy(hidden, lm_head.weight, labels, shift=True)

Public API (names are a contract; see README.md):
    linear_cross_entropy, linear_token_logprobs   from hidden states and the output head, no [N, V] logits
    cross_entropy, token_logprobs                 from logits, for users who already have them
    linear_jsd, linear_kl_divergence              distillation / exact KL between two heads, no logits
    backends                                      which backends are usable here
"""

from . import nn, reference
from .ops.cross_entropy import cross_entropy
from .ops.dispatch import backends
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.linear_jsd import linear_jsd, linear_kl_divergence
from .ops.token_logprobs import linear_token_logprobs, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "backends",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_jsd",
    "linear_kl_divergence",
    "linear_token_logprobs",
    "nn",
    "reference",
    "token_logprobs",
]

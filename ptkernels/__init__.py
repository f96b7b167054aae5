"""ptkernels: fused kernels for LLM post-training.

    import ptkernels as ptk
    loss = ptk.linear_cross_entropy(hidden, lm_head.weight, labels, shift=True)

Public API (names are a contract; see README.md):
    linear_cross_entropy, linear_token_logprobs   from hidden states and the output head, no [N, V] logits
    cross_entropy, token_logprobs                 from logits, for users who already have them
    linear_jsd, linear_kl_divergence              distillation / exact KL between two heads, no logits
    sequence_logprobs, packed_sequence_logprobs   per-sequence sums / means of token log-probs
    dpo_loss (8 loss types), simpo_loss, orpo_loss, cpo_loss, kto_loss    preference losses (TRL semantics)
    fused_linear_preference_loss, fused_linear_kto_loss                  the same straight from hidden states
    kl_penalty, group_advantages, grpo_loss       RL losses on per-token log-probs (TRL 1.16 semantics)
    rloo_advantages, reinforce_plus_plus_advantages, remax_advantages    more advantage estimators (TRL, verl)
    fused_linear_grpo_loss                        GRPO straight from hidden states
    gae, ppo_policy_loss, ppo_value_loss, masked_mean, masked_var, masked_whiten    PPO pieces
    backends                                      which backends are usable here
    cpu_gemm                                      which library runs the fused ops' fp32 CPU GEMMs here, and why
"""

from . import nn, reference
from .ops.advantages import reinforce_plus_plus_advantages, remax_advantages, rloo_advantages
from .ops.core.dispatch import backends
from .ops.core.gemm import cpu_gemm_choice as cpu_gemm
from .ops.cross_entropy import cross_entropy
from .ops.fused_grpo import fused_linear_grpo_loss
from .ops.fused_kto import fused_linear_kto_loss
from .ops.fused_preference import fused_linear_preference_loss
from .ops.grpo import group_advantages, grpo_loss
from .ops.kl import kl_penalty
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.linear_jsd import linear_jsd, linear_kl_divergence
from .ops.ppo import (
    gae,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from .ops.preference import (
    cpo_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from .ops.sequence_logprobs import packed_sequence_logprobs, sequence_logprobs
from .ops.token_logprobs import linear_token_logprobs, token_logprobs
from .types import GRPOOutput, KTOLossOutput, PPOPolicyOutput, PPOValueOutput, PreferenceLossOutput

__version__ = "0.1.0"

__all__ = [
    "GRPOOutput",
    "KTOLossOutput",
    "PreferenceLossOutput",
    "PPOPolicyOutput",
    "PPOValueOutput",
    "backends",
    "cpu_gemm",
    "cpo_loss",
    "cross_entropy",
    "dpo_loss",
    "fused_linear_grpo_loss",
    "fused_linear_kto_loss",
    "fused_linear_preference_loss",
    "gae",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "kto_loss",
    "linear_cross_entropy",
    "linear_jsd",
    "linear_kl_divergence",
    "linear_token_logprobs",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "nn",
    "orpo_loss",
    "packed_sequence_logprobs",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reference",
    "reinforce_plus_plus_advantages",
    "remax_advantages",
    "rloo_advantages",
    "sequence_logprobs",
    "simpo_loss",
    "token_logprobs",
]

"""Integrations with other libraries. ``hf``: Hugging Face Transformers causal LMs without logits.

    from ptkernels.integrations import causal_lm_loss, patch_model_for_fused_loss

Nothing here imports transformers: the helpers only use a model's ``config``, ``get_output_embeddings()`` and
forward, so importing this package is cheap.
"""

from .hf import (
    FusedCausalLMLoss,
    OutputHead,
    causal_lm_hidden_states,
    causal_lm_loss,
    output_head,
    patch_model_for_fused_loss,
)

__all__ = [
    "FusedCausalLMLoss",
    "OutputHead",
    "causal_lm_hidden_states",
    "causal_lm_loss",
    "output_head",
    "patch_model_for_fused_loss",
]

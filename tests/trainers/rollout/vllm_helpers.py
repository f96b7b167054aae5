"""What the vLLM engine's tests share: the tiny Llama vLLM's CPU attention can run."""

from __future__ import annotations

import torch

from ptkernels.trainers.modeling import load_tokenizer, preset_config


def tiny_llama(seed: int = 0):
    """(model, tokenizer): the tiny preset's Llama in float32 with the shipped tokenizer, but 2 heads of 32 (the
    preset's heads of 16 are below the smallest size vLLM's CPU attention supports)."""
    from transformers import LlamaForCausalLM

    tokenizer = load_tokenizer("tiny")
    config = preset_config("tiny", tokenizer)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer

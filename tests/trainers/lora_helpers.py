"""A LoRA policy as after some training, shared by the LoRA tests and the weight-gather test's processes."""

import torch

from ptkernels.trainers import lora
from ptkernels.trainers.engine.config import SFTConfig, parse_config


def trained_lora_policy():
    """(policy, tokenizer): the tiny preset with a LoRA adapter (r=4) and a trained head copy, every adapter tensor
    moved off its initial value by seeded noise (the same on every process), as after some steps."""
    cfg = parse_config(SFTConfig, ["--model", "tiny", "--data", "unused.jsonl", "--lora", "--lora-r", "4",
                                   "--lora-dropout", "0", "--lora-modules-to-save", "lm_head"])
    policy, tok = lora.load_policy(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return policy, tok

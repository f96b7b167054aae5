"""What the vLLM engine's tests share: the tiny Llama vLLM's CPU attention can run, and the engine's modules."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

import ptkernels.trainers
from ptkernels.trainers.modeling import load_tokenizer, preset_config

ROLLOUT_DIR = Path(ptkernels.trainers.__file__).parent / "rollout"


def import_rollout_module(name: str):
    """``ptkernels.trainers.rollout.<name>``. Until the trainers' restructure makes ptkernels/trainers/rollout/ a
    package (today rollout.py is the module of that name), the file is loaded under its future name."""
    full = f"ptkernels.trainers.rollout.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError:
        if full in sys.modules:
            return sys.modules[full]
        spec = importlib.util.spec_from_file_location(full, ROLLOUT_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        return module


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

"""What every rollout engine shares: the request (``SamplingConfig``), the answer (``Rollout``), the interface
(``RolloutEngine``) and the helpers both built-in engines use (left padding, seeding, eval mode, eos cutting).

The engines (``engines.HFGenerateEngine``, ``kv_cache.KVCacheEngine``) import this module; it imports neither.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "check_request",
    "cut_at_eos",
    "distinct_left_padded",
    "eval_mode",
    "is_sharded",
    "left_pad",
    "model_device",
    "seeded",
    "unwrap_model",
]


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True  # False: greedy (evaluation)
    batch_size: int = 32  # prompts (rows: a repeated prompt counts each time) sampled together


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # as given (unpadded)
    completion_ids: list[list[int]]  # generated tokens, cut after the first eos (eos kept when produced)
    texts: list[str]  # decoded completions, special tokens skipped
    finished: list[bool]  # True when the completion ended with eos (False: hit max_new_tokens)


@runtime_checkable
class RolloutEngine(Protocol):
    """What a trainer needs from a sampler; ``KVCacheEngine`` and ``HFGenerateEngine`` are the built-in ones."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, *, seed: int | None = None) -> Rollout:
        ...


def unwrap_model(model):
    """The model itself when handed its DDP wrapper (generate is a method of the Hugging Face model); for a PEFT
    model, the Hugging Face model it adapts (its LoRA layers in place: it samples from the adapted model, or from
    the base inside ``disable_adapter()``)."""
    from torch.nn.parallel import DistributedDataParallel

    model = model.module if isinstance(model, DistributedDataParallel) else model
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def is_sharded(model) -> bool:
    """FSDP2-sharded layers all-gather on every forward: then every rank must run as many decoding steps as the
    slowest one (``synced_gpus``), or a rank that finished early leaves the others waiting forever."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return torch.distributed.get_world_size() > 1 and any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def seeded(seed: int | None, device: torch.device):
    """A private RNG stream: ``seed`` fixes the samples and the caller's (the trainer's) RNG state is untouched.
    Only the CPU generator and the model's own GPU are forked and seeded (``torch.manual_seed`` would reseed
    every GPU, including ones fork_rng does not restore)."""
    if seed is None:
        yield
        return
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.default_generator.manual_seed(seed)
        for index in gpus:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def check_request(prompts: list[list[int]], sampling: SamplingConfig, tokenizer) -> None:
    """What every engine refuses: an empty prompt, a sampling setting outside its range, no pad token."""
    if sampling.max_new_tokens < 1 or sampling.batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be at least 1, got {sampling}")
    if sampling.do_sample and not (sampling.temperature > 0 and 0 < sampling.top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {sampling}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (generate has nothing to condition on)")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (left-padding a batch needs one)")


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), prompts right-aligned so every row's next token is at the same column. The
    mask comes from the lengths, never from ``== pad_id`` (the pad id is often also bos or eos)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def distinct_left_padded(prompts: list, pad_id: int, device: torch.device):
    """Each distinct prompt once, left-padded: (row -> distinct index ``[rows]``, input_ids, attention_mask,
    position_ids counting real tokens only, as generate derives them for left-padded rows)."""
    distinct: dict[tuple, int] = {}
    row_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    ids, mask = left_pad([list(p) for p in distinct], pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return torch.tensor(row_of, device=device), ids, mask, positions


def cut_at_eos(tokens: list[int], eos_id: int | None) -> tuple[list[int], bool]:
    """The tokens up to and including the first eos, and whether there was one. What generate appends after eos
    (padding for rows that finished before the others) is dropped; nothing else is (a pad id produced before eos
    is a real sample)."""
    if eos_id is not None and eos_id in tokens:
        return tokens[:tokens.index(eos_id) + 1], True
    return tokens, False

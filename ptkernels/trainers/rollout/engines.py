"""Rollouts for the on-policy stages: sample completions from the current policy, then score them with ptkernels.

    rollout = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=128), seed=step)
    batch = completion_batch(rollout.prompt_ids, rollout.completion_ids, tokenizer.pad_token_id)
    old_logps = sequence_token_logps(model, batch)        # [B, T-1], aligned with labels[:, 1:]
    ref_logps = sequence_token_logps(ref_model, batch)

Sampling (left-padded prompts, KV cache) is ``kv_cache.KVCacheEngine`` by default: the model's own forward with
each distinct prompt prefilled once, faster than Hugging Face ``generate`` on the on-policy stages' rollouts
(benchmarks/RESULTS.md); ``engine="hf"`` (``--rollout-engine hf``) samples with ``generate`` itself
(``HFGenerateEngine``), from the same distribution. The log-probs are NOT the sampler's scores: they come from the
same hidden-states + fused-head path (``modeling.token_logps``) the losses use on the right-padded training batch
(``scoring.py``), so the "old policy" numbers and the trained policy's numbers are computed the same way
(``tests/trainers/rollout/test_engines.py`` checks they also equal generate's own distribution).

Only ``RolloutEngine.generate`` is needed from a sampler: a faster engine (vLLM, ...) can replace the built-in ones
as long as it returns the same ``Rollout`` (``sampling.py``); the scoring is ``scoring.py``.
"""

from __future__ import annotations

import shutil
import tempfile

import torch

from .kv_cache import KVCacheEngine, cache_rows_selectable
from .sampling import (
    Rollout,
    RolloutEngine,
    SamplingConfig,
    check_request,
    cut_at_eos,
    eval_mode,
    is_sharded,
    left_pad,
    model_device,
    seeded,
    unwrap_model,
)

__all__ = ["ENGINES", "HFGenerateEngine", "generate", "make_engine"]


def _generation_config(sampling: SamplingConfig, tokenizer):
    """Everything that shapes the sampling distribution, set explicitly. Together with the blank
    ``model.generation_config`` put in place during the call (see ``HFGenerateEngine.generate``), nothing from a
    checkpoint's generation_config.json (top_k, repetition_penalty, min_p, suppress_tokens, ...) and no library
    default (top_k=50) changes it: the samples come from softmax(logits / temperature), top-p truncated."""
    from transformers import GenerationConfig

    options = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample, use_cache=True,
                   num_beams=1, num_return_sequences=1, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if sampling.do_sample:  # greedy takes none of these (and warns when they are set)
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    return GenerationConfig(**options)


class HFGenerateEngine:
    """Batched sampling with Hugging Face ``model.generate``: left-padded prompts, KV cache, stop at eos."""

    def __init__(self, model, tokenizer):
        self.model = unwrap_model(model)
        self.tokenizer = tokenizer

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, *, seed: int | None = None) -> Rollout:
        check_request(prompts, sampling, self.tokenizer)
        model, eos = self.model, self.tokenizer.eos_token_id
        device = model_device(model)
        config = _generation_config(sampling, self.tokenizer)
        completions: list[list[int]] = []
        finished: list[bool] = []
        saved_config = model.generation_config
        # generate fills every option left unset from model.generation_config: a blank one in its place for the
        # call, so only `config` decides (restored even if generate raises).
        model.generation_config = type(saved_config)()
        try:
            with eval_mode(model), torch.no_grad(), seeded(seed, device):
                for start in range(0, len(prompts), sampling.batch_size):
                    chunk = prompts[start:start + sampling.batch_size]
                    input_ids, attention_mask = left_pad(chunk, self.tokenizer.pad_token_id, device)
                    out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         generation_config=config, synced_gpus=is_sharded(model))
                    for row in out[:, input_ids.shape[1]:].tolist():
                        tokens, done = cut_at_eos(row, eos)
                        completions.append(tokens)
                        finished.append(done)
        finally:
            model.generation_config = saved_config
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return Rollout(prompt_ids=[list(p) for p in prompts], completion_ids=completions, texts=texts,
                       finished=finished)


ENGINES = ("kv_cache", "hf", "vllm")


def make_engine(name: str, model, tokenizer, *, model_dir: str | None = None, max_model_len: int = 1024,
                server: str = "", seed: int = 0, gpu_memory_utilization: float = 0.3) -> RolloutEngine:
    """The sampler called ``name``: 'kv_cache' (``kv_cache.KVCacheEngine``: the model's forward and a KV cache,
    each distinct prompt prefilled once; the default) or 'hf' (``HFGenerateEngine``: ``model.generate``), both
    on ``model`` itself, from the same distribution; or 'vllm': a ``vllm_engine.VLLMEngine`` built from
    ``model_dir`` (``model``'s Hugging Face folder; None: ``model`` is saved to a temporary folder the engine
    loads when built, a LoRA policy as its merged model; ``max_model_len`` prompt + completion tokens), or, with
    ``server`` ("HOST:PORT"), a client of a running ``ptk vllm-serve``. A vLLM engine keeps its own copy of the
    weights: the caller pushes the policy's into it (``engine.sync_weights(model)``) after updating them."""
    if name == "hf":
        return HFGenerateEngine(model, tokenizer)
    if name == "kv_cache":
        if not cache_rows_selectable(model):
            print(f"ptk: {type(unwrap_model(model)).__name__}'s cache cannot repeat or drop rows (linear-attention "
                  "or state-space layers): sampling with model.generate (--rollout-engine hf) instead")
            return HFGenerateEngine(model, tokenizer)
        return KVCacheEngine(model, tokenizer)
    if name == "vllm":
        if server:
            from .vllm_server import VLLMServerClient

            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"--vllm-server must be HOST:PORT, got {server!r}")
            return VLLMServerClient(host, int(port))
        from .vllm_engine import VLLMEngine, iter_full_weights, unwrap_ddp

        options = dict(max_model_len=max_model_len, seed=seed, gpu_memory_utilization=gpu_memory_utilization)
        if model_dir:
            return VLLMEngine(model_dir, tokenizer, **options)
        from ..adapters import is_adapted, merged_model
        from ..modeling import save_pretrained

        folder = tempfile.mkdtemp(prefix="ptk-vllm-policy-")
        try:  # the engine reads the weights and the tokenizer when it is built
            policy = unwrap_ddp(model)
            if is_adapted(policy):  # a LoRA policy: its merged model, which the engine loads as a plain one
                save_pretrained(merged_model(policy, iter_full_weights(policy)), tokenizer, folder)
            else:
                save_pretrained(unwrap_model(model), tokenizer, folder)
            return VLLMEngine(folder, tokenizer, **options)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    raise ValueError(f"rollout engine must be one of {ENGINES}, got {name!r}")


def generate(model, tokenizer, prompts: list[list[int]], sampling: SamplingConfig, *,
             seed: int | None = None, engine: str = "kv_cache") -> Rollout:
    """``make_engine(engine, model, tokenizer).generate(prompts, sampling, seed=seed)``."""
    return make_engine(engine, model, tokenizer).generate(prompts, sampling, seed=seed)

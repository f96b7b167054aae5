"""Rollout throughput of the vLLM engine (``--rollout-engine vllm``) beside the built-in ones, same prompts and
sampling: 64 distinct prompts of 20-35 random tokens, 64 new tokens at temperature 1, one batch, fp32.

    vllm      ``VLLMEngine`` (vllm.LLM in this process, eager mode, prefix cache on)
    kv_cache  ``KVCacheEngine`` (the built-in default)
    hf        Hugging Face ``generate``

``extra_info``: rows, generated tokens and tokens/s of the measured round. The vLLM case runs where vllm is
importable (the environment of ``scripts/setup_vllm_venv.sh``); the others run anywhere. ``PTK_BENCH_PRESET``
picks the model (``tiny`` by default, with heads of 32: see ``load_policy``; ``small`` for the quick preset's).
Times are never asserted; the guard is that greedy decoding gives the same tokens on every engine.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

pytest.importorskip("transformers")

from conftest import bench_rounds

from ptkernels.trainers.modeling import load_causal_lm, save_pretrained
from ptkernels.trainers.rollout import vllm_engine
from ptkernels.trainers.rollout.engines import generate
from ptkernels.trainers.rollout.sampling import SamplingConfig

PROMPTS, NEW_TOKENS = 64, 64
PRESET = os.environ.get("PTK_BENCH_PRESET", "tiny")


def load_policy():
    """The preset in fp32; ``tiny`` with 2 heads of 32 instead of 4 of 16 (vLLM's CPU attention has no kernel
    for heads of 16; every engine runs the same model)."""
    model, tok = load_causal_lm(PRESET, seed=0)
    if PRESET == "tiny":
        from transformers import LlamaForCausalLM

        config = model.config
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    return model, tok


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    model, tok = load_policy()
    folder = tmp_path_factory.mktemp(f"{PRESET}_policy")
    save_pretrained(model, tok, str(folder))
    return model.eval(), tok, str(folder)


def random_prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 36, (n,), generator=g).tolist()
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for length in lengths]


def _sampler(name: str, policy):
    """engine.generate-like callable for ``name``, and the seconds it took to build."""
    model, tok, folder = policy
    start = time.perf_counter()
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            pytest.skip("vllm is not importable here (scripts/setup_vllm_venv.sh builds its environment)")
        engine = vllm_engine.VLLMEngine(folder, tok, max_model_len=256, dtype="float32", seed=0)
        run = engine.generate
    else:
        def run(prompts, sampling, seed=None):
            return generate(model, tok, prompts, sampling, seed=seed, engine=name)
    return run, time.perf_counter() - start


@pytest.mark.parametrize("engine", ["vllm", "kv_cache", "hf"])
def test_rollout_tokens_per_second(benchmark, policy, engine):
    model, _, _ = policy
    run, build_s = _sampler(engine, policy)
    prompts = random_prompts(model.config.vocab_size, PROMPTS)
    greedy = SamplingConfig(max_new_tokens=8, do_sample=False, batch_size=PROMPTS)
    assert (run(prompts[:8], greedy).completion_ids
            == generate(model, policy[1], prompts[:8], greedy, engine="hf").completion_ids)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, batch_size=PROMPTS)
    out = benchmark.pedantic(lambda: run(prompts, sampling, seed=0), rounds=bench_rounds(), warmup_rounds=1)
    tokens = sum(len(c) for c in out.completion_ids)  # the same every round: seeded
    benchmark.extra_info.update(preset=PRESET, rows=len(prompts), new_tokens=tokens, build_s=round(build_s, 2),
                                tokens_per_s_median=round(tokens / benchmark.stats.stats.median, 1),
                                tokens_per_s_best=round(tokens / benchmark.stats.stats.min, 1))

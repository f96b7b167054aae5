"""A GRPO step's two halves on the quick preset's model: sampling the rollout, and the training forward + backward.

Model: the ``small`` preset (random Llama, 4 layers, D=128, V=872, as ``ptk pipeline --preset quick`` trains), fp32.
Rollout: 16 distinct prompts of 20-35 random tokens, 16 samples each (256 rows, GRPO's groups), 24 new tokens at
temperature 1, in one batch. A random model seldom samples eos, so every row runs the 24 steps: this measures the
prefill and the per-step cost, not ``KVCacheEngine`` dropping finished rows (which a trained model gives it).

    sample-hf        Hugging Face ``generate`` (``--rollout-engine hf``)
    sample-kv_cache  ``KVCacheEngine`` (the default): each distinct prompt prefilled once, inverse-CDF sampling
    train-whole      GRPOLoss forward + backward on 128 prompt + completion rows (8 groups of 16)
    train-shared     the same with ``--share-prompt`` (each distinct prompt run once; the same loss)

Times are never asserted. Guards: greedy decoding gives the same tokens with both engines; the two training paths
give the same loss.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from conftest import bench_rounds

from ptkernels.trainers.engine.config import GRPOConfig
from ptkernels.trainers.modeling import load_causal_lm
from ptkernels.trainers.recipes.grpo import GRPOLoss
from ptkernels.trainers.rollout.engines import generate
from ptkernels.trainers.rollout.sampling import SamplingConfig
from ptkernels.trainers.rollout.scoring import completion_batch

PROMPTS, SAMPLES, NEW_TOKENS = 16, 16, 24


@pytest.fixture(scope="module")
def model_tok():
    model, tok = load_causal_lm("small", seed=0)
    return model.eval(), tok


def random_prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 36, (n,), generator=g).tolist()
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for length in lengths]


@pytest.mark.parametrize("engine", ["hf", "kv_cache"])
def test_sample_rollout(benchmark, model_tok, engine):
    model, tok = model_tok
    distinct = random_prompts(model.config.vocab_size, PROMPTS)
    greedy = SamplingConfig(max_new_tokens=8, do_sample=False, batch_size=PROMPTS)
    assert (generate(model, tok, distinct, greedy, engine=engine).completion_ids
            == generate(model, tok, distinct, greedy, engine="hf").completion_ids)
    rows = [p for p in distinct for _ in range(SAMPLES)]
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, batch_size=len(rows))
    out = benchmark.pedantic(lambda: generate(model, tok, rows, sampling, seed=0, engine=engine),
                             rounds=bench_rounds(), warmup_rounds=1)
    benchmark.extra_info.update(rows=len(rows), new_tokens=sum(len(c) for c in out.completion_ids))


def grpo_batch(vocab: int, pad_id: int) -> dict:
    prompts = random_prompts(vocab, 8, seed=1)
    g = torch.Generator().manual_seed(2)
    rows = [p for p in prompts for _ in range(SAMPLES)]
    completions = [torch.randint(10, vocab, (int(torch.randint(4, NEW_TOKENS + 1, (1,), generator=g)),),
                                 generator=g).tolist() for _ in rows]
    batch = completion_batch(rows, completions, pad_id)
    batch["prompt_lengths"] = torch.tensor([len(p) for p in rows])
    batch["advantages"] = torch.randn(len(rows), generator=g)
    return batch


@pytest.mark.parametrize("share", [False, True], ids=["whole", "shared"])
def test_train_forward_backward(benchmark, model_tok, share):
    model, tok = model_tok
    batch = grpo_batch(model.config.vocab_size, tok.pad_token_id)
    module = GRPOLoss(model.train(), GRPOConfig(share_prompt=share))
    norm = module.count(batch)

    def step():
        model.zero_grad(set_to_none=True)
        loss, _ = module(batch, norm)
        loss.backward()
        return loss.detach()

    loss = benchmark.pedantic(step, rounds=bench_rounds(), warmup_rounds=1)
    other = GRPOLoss(model, GRPOConfig(share_prompt=not share))(batch, norm)[0].detach()
    torch.testing.assert_close(loss, other, atol=1e-5, rtol=1e-4)
    benchmark.extra_info.update(rows=batch["input_ids"].shape[0], tokens=int(batch["attention_mask"].sum()))

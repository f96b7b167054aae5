"""Rollouts: left-padded batched generation, stopping at eos, seeded sampling (each with both built-in engines),
and the log-probs the trainers compute from hidden states agreeing with what generate sampled from (tiny random
Llama, CPU). The KV-cache engine's own tests are in test_kv_cache.py."""

import copy

import pytest
import torch

from ptkernels.trainers.rollout.engines import HFGenerateEngine, generate, make_engine
from ptkernels.trainers.rollout.sampling import Rollout, RolloutEngine, SamplingConfig
from ptkernels.trainers.rollout.scoring import completion_batch, sequence_token_logps

from ..conftest import tiny_model

GREEDY = SamplingConfig(max_new_tokens=10, do_sample=False)
ENGINES = pytest.mark.parametrize("engine", ["kv_cache", "hf"])


@ENGINES
def test_left_padding_matches_one_prompt_at_a_time(model_tok, prompts, engine):
    model, tok = model_tok
    alone = [generate(model, tok, [p], GREEDY, engine=engine).completion_ids[0] for p in prompts]
    assert len({tuple(c) for c in alone}) == len(alone)  # distinct, context-dependent completions
    for batch_size in (len(prompts), 2):  # one padded batch; and several generate() calls
        out = generate(model, tok, prompts, SamplingConfig(max_new_tokens=10, do_sample=False, batch_size=batch_size),
                       engine=engine)
        assert out.completion_ids == alone
        assert out.prompt_ids == prompts


@ENGINES
def test_stops_at_eos_and_respects_max_new_tokens(model_tok, prompts, engine):
    model, tok = model_tok
    free = generate(model, tok, prompts, GREEDY, engine=engine).completion_ids
    assert all(len(c) == GREEDY.max_new_tokens for c in free)  # the real eos never comes from this model
    # Make a token the model greedily produces mid-completion the eos: prompt 0 must stop right after it,
    # while the prompts that never produce it run to max_new_tokens (and their padding must not leak in).
    eos = free[0][3]
    assert eos not in free[0][:3] and any(eos not in c for c in free[1:])
    eos_tok = copy.deepcopy(tok)
    eos_tok.eos_token = tok.convert_ids_to_tokens(eos)
    assert eos_tok.eos_token_id == eos and eos_tok.pad_token_id == tok.pad_token_id
    out = generate(model, eos_tok, prompts, GREEDY, engine=engine)
    for full, got, done in zip(free, out.completion_ids, out.finished):
        if eos in full:
            assert got == full[:full.index(eos) + 1] and done
        else:
            assert got == full and not done
    assert out.finished[0] and not all(out.finished)
    assert out.texts == eos_tok.batch_decode(out.completion_ids, skip_special_tokens=True)


@ENGINES
def test_sampled_completions_end_at_their_first_eos(model_tok, prompts, engine):
    model, tok = model_tok
    eos = generate(model, tok, prompts, GREEDY, engine=engine).completion_ids[0][3]
    eos_tok = copy.deepcopy(tok)
    eos_tok.eos_token = tok.convert_ids_to_tokens(eos)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.7)
    out = generate(model, eos_tok, prompts * 4, sampling, seed=0, engine=engine)
    for ids, done in zip(out.completion_ids, out.finished):
        assert 1 <= len(ids) <= sampling.max_new_tokens
        assert eos not in ids[:-1]  # nothing after the first eos
        assert done == (ids[-1] == eos)
        assert done or len(ids) == sampling.max_new_tokens


@ENGINES
def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(model_tok, prompts, engine):
    model, tok = model_tok
    sampling = SamplingConfig(max_new_tokens=8)
    state = torch.get_rng_state()
    a = generate(model, tok, prompts, sampling, seed=1, engine=engine)
    b = generate(model, tok, prompts, sampling, seed=1, engine=engine)
    c = generate(model, tok, prompts, sampling, seed=2, engine=engine)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.completion_ids == b.completion_ids and a.texts == b.texts
    assert a.completion_ids != c.completion_ids


@ENGINES
def test_mode_is_restored(model_tok, prompts, engine):
    model, tok = model_tok
    model.train()
    try:
        out = generate(model, tok, prompts[:2], GREEDY, engine=engine)
        assert model.training
        sequence_token_logps(model, completion_batch(out.prompt_ids, out.completion_ids, tok.pad_token_id))
        assert model.training
    finally:
        model.eval()


def eager_token_logps(model, batch):
    """The plain computation: log_softmax of the model's full logits at the shifted labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    logps = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != -100, logps, torch.zeros_like(logps))


def test_logps_agree_with_generate_and_with_eager_logits(monkeypatch, prompts):
    model, tok = tiny_model()
    # A checkpoint's generation_config.json must not change what is sampled from (HF would apply these).
    model.generation_config.top_k = 5
    model.generation_config.repetition_penalty = 1.5
    saved_config = model.generation_config

    captured = {}
    real_generate = model.generate

    def spy(*args, generation_config, **kwargs):  # generate as the engine calls it, plus its scores
        config = copy.deepcopy(generation_config)
        config.output_scores = config.return_dict_in_generate = True
        out = real_generate(*args, generation_config=config, **kwargs)
        captured["scores"] = torch.stack(out.scores, 1)  # [B, new tokens, V]
        return out.sequences

    monkeypatch.setattr(model, "generate", spy)
    out = HFGenerateEngine(model, tok).generate(prompts, SamplingConfig(max_new_tokens=8), seed=0)
    assert model.generation_config is saved_config
    batch = completion_batch(out.prompt_ids, out.completion_ids, tok.pad_token_id)
    ours = sequence_token_logps(model, batch)
    assert ours.shape == batch["completion_mask"].shape

    sampled = captured["scores"].float().log_softmax(-1)
    for i, (p, c) in enumerate(zip(out.prompt_ids, out.completion_ids)):
        expected = sampled[i, torch.arange(len(c)), torch.tensor(c)]
        torch.testing.assert_close(ours[i, len(p) - 1:len(p) - 1 + len(c)], expected, atol=1e-4, rtol=0)
    assert (ours[batch["completion_mask"] == 0] == 0).all()

    with torch.no_grad():
        torch.testing.assert_close(ours, eager_token_logps(model, batch), atol=1e-4, rtol=0)
    # Row chunks (each trimmed to its own length) give the same numbers.
    torch.testing.assert_close(sequence_token_logps(model, batch, chunk_rows=2), ours, atol=1e-5, rtol=0)


def test_completion_batch_labels_and_shifted_mask():
    batch = completion_batch([[5, 6, 7], [8], [4]], [[9, 2], [10, 11, 12], []], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 2], [8, 10, 11, 12, 0], [4, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 9, 2], [-100, 10, 11, 12, -100], [-100] * 5]
    # Position t of the [B, T-1] log-probs predicts token t+1: the completion starts at len(prompt) - 1.
    assert batch["completion_mask"].dtype == torch.float32
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert torch.equal(batch["completion_mask"].bool(), batch["labels"][:, 1:] != -100)


class FixedEngine:
    """A stand-in sampler (what a vLLM engine would look like to a trainer): always the same completion."""

    def generate(self, prompts, sampling, *, seed=None):
        done = [[7, 2] for _ in prompts]
        return Rollout(prompt_ids=prompts, completion_ids=done, texts=["x"] * len(prompts),
                       finished=[True] * len(prompts))


def rollout_with(engine: RolloutEngine, prompts) -> Rollout:
    if not isinstance(engine, RolloutEngine):
        raise TypeError(f"{type(engine).__name__} is not a RolloutEngine")
    return engine.generate(prompts, SamplingConfig(), seed=0)


def test_any_engine_with_generate_is_a_rollout_engine(model_tok):
    out = rollout_with(FixedEngine(), [[1, 2], [3]])
    assert out.completion_ids == [[7, 2], [7, 2]] and out.finished == [True, True]
    assert isinstance(HFGenerateEngine(*model_tok), RolloutEngine)
    assert isinstance(make_engine("kv_cache", *model_tok), RolloutEngine)
    with pytest.raises(ValueError, match="rollout engine must be one of"):
        make_engine("sglang", *model_tok)  # vllm is an engine now (rollout/vllm_engine.py)
    with pytest.raises(TypeError, match="not a RolloutEngine"):
        rollout_with(object(), [[1]])

"""On-policy stages end to end on tiny models: GRPO raises a verifiable reward, PPO runs with a reward model and
critic, both resume exactly from a checkpoint taken in the middle of a rollout."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ptkernels.cli import main as ptk

from ..conftest import write_jsonl

COMMON = ["--no-progress", "--max-length", "64", "--max-new-tokens", "12", "--batch-size", "32"]


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def sft_model(data_dir, tmp_path_factory):
    """A tiny model that answers "What is a+b?" in the "Answer: n" format (not always correctly)."""
    out = str(tmp_path_factory.mktemp("sft") / "m")
    ptk(["sft", "--data", data_dir["sft"], "--output-dir", out, "--model", "tiny", "--max-steps", "120",
         "--batch-size", "16", "--lr", "3e-3", "--no-progress"])
    return out


@pytest.fixture(scope="module")
def rl_data(data_dir, tmp_path_factory):
    """RL prompts whose verifiable reward is 1 when the answer starts with a digit 1-4: about half the SFT
    model's answers at first, and learnable."""
    rows = [json.loads(line) for line in open(data_dir["sft"])]
    rl = [{"prompt": r["messages"][:1], "verifier": "format", "format_pattern": r"Answer: [1-4]\d*"} for r in rows]
    return write_jsonl(tmp_path_factory.mktemp("rl") / "rl.jsonl", rl)


def test_grpo_raises_the_reward(sft_model, rl_data, tmp_path):
    out = str(tmp_path / "grpo")
    assert ptk(["grpo", "--data", rl_data, "--model", sft_model, "--output-dir", out, "--max-steps", "25",
                "--prompts-per-step", "8", "--num-generations", "4", "--lr", "1e-3", *COMMON]) == 0
    reward = [m["reward"] for m in metrics(out)]
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 0.15, reward
    m = metrics(out)[-1]
    for key in ("reward_format", "accuracy", "completion_length", "kl", "clip_ratio", "entropy", "eos_rate"):
        assert key in m, key
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("extra", [
    ["--loss-type", "grpo", "--beta", "0.04"],
    ["--loss-type", "dr_grpo", "--scale-rewards", "none", "--num-iterations", "2"],
    ["--loss-type", "bnpo", "--importance-sampling-level", "sequence", "--num-iterations", "2", "--verifier",
     "format"],
    ["--dynamic-sampling"],
])
def test_grpo_options(sft_model, rl_data, tmp_path, extra):
    out = str(tmp_path / "grpo")
    ptk(["grpo", "--data", rl_data, "--model", sft_model, "--output-dir", out, "--max-steps", "4",
         "--prompts-per-step", "4", "--num-generations", "4", "--lr", "1e-3", *COMMON, *extra])
    m = metrics(out)
    assert len(m) == 4 and all(r["kl"] >= 0 for r in m)
    if "--beta" in extra:
        assert m[-1]["kl"] > 0  # the policy has moved from the reference
    if "--dynamic-sampling" in extra:  # twice the prompts sampled, the groups with a reward spread kept first
        assert all(0.0 <= r["informative_groups"] <= 1.0 for r in m)
        assert max(r["informative_groups"] for r in m) > 0


def test_grpo_unknown_verifier_fails_first(rl_data, tmp_path):
    with pytest.raises(ValueError, match="unknown verifier 'maths'"):
        ptk(["grpo", "--model", "tiny", "--data", rl_data, "--output-dir", str(tmp_path / "x"), "--verifier", "maths"])
    assert not (tmp_path / "x").exists()


def test_grpo_ptx_trains_on_the_sft_rows_where_the_rewards_are_flat(sft_model, data_dir, tmp_path):
    """With a reward that never varies (a pattern no answer matches) GRPO's own gradient is zero, so all that
    moves the policy is --ptx-data's next-token loss, which must fall; with --ptx-coef 0 nothing moves."""
    rows = [json.loads(line) for line in open(data_dir["sft"])]
    flat = write_jsonl(tmp_path / "flat.jsonl", [{"prompt": r["messages"][:1], "verifier": "format",
                                                  "format_pattern": "never matches"} for r in rows])
    base = ["grpo", "--data", flat, "--model", sft_model, "--max-steps", "12", "--prompts-per-step", "2",
            "--num-generations", "2", "--lr", "3e-3", "--ptx-data", data_dir["sft"], "--ptx-batch-size", "8",
            "--log-steps", "1", *COMMON]
    on, off = str(tmp_path / "on"), str(tmp_path / "off")
    ptk([*base, "--output-dir", on, "--ptx-coef", "1.0"])
    nll = [m["ptx_nll"] for m in metrics(on)]
    assert all(m["reward"] == 0.0 for m in metrics(on))
    assert sum(nll[-3:]) / 3 < 0.8 * sum(nll[:3]) / 3, nll
    ptk([*base, "--output-dir", off, "--ptx-coef", "0"])
    assert "ptx_nll" not in metrics(off)[-1]
    _same(off, sft_model)  # zero advantages, no ptx: the weights are the SFT model's


@pytest.mark.parametrize("args, match", [(["--ptx-coef", "0.5"], "--ptx-coef > 0 needs --ptx-data"),
                                         (["--ptx-coef", "-1"], "--ptx-coef must be finite and >= 0")])
def test_grpo_ptx_options_are_checked(rl_data, tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        ptk(["grpo", "--model", "tiny", "--data", rl_data, "--output-dir", str(tmp_path / "x"), *args])
    assert not (tmp_path / "x").exists()


def test_grpo_ptx_data_is_checked_before_any_model_loads(rl_data, tmp_path):
    """--ptx-data must hold SFT rows; the RL prompts themselves (prompt only) are refused, naming file and line."""
    with pytest.raises(ValueError, match=r"rl\.jsonl:1: .*'prompt_only' format"):
        ptk(["grpo", "--data", rl_data, "--model", str(tmp_path / "no-such-model"), "--output-dir",
             str(tmp_path / "x"), "--ptx-data", rl_data, "--ptx-coef", "0.5"])
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def reward_model(sft_model, data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rm") / "rm")
    ptk(["reward", "--data", data_dir["pref"], "--model", sft_model, "--output-dir", out, "--max-steps", "20",
         "--lr", "1e-3", "--no-progress"])
    return out


def test_ppo_end_to_end(sft_model, reward_model, rl_data, tmp_path):
    out = str(tmp_path / "ppo")
    assert ptk(["ppo", "--data", rl_data, "--model", sft_model, "--reward-model", reward_model, "--output-dir", out,
                "--max-steps", "6", "--prompts-per-step", "8", "--ppo-epochs", "2", "--num-minibatches", "1",
                "--lr", "3e-4", *COMMON]) == 0
    m = metrics(out)
    for key in ("score", "reward", "kl_sum", "entropy", "policy_clip_frac", "value_clip_frac", "value_loss",
                "completion_length", "eos_rate"):
        assert key in m[-1], key
    assert m[0]["kl_sum"] == pytest.approx(0.0, abs=1e-5)  # the first rollout: policy == reference
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(out)
    critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "value_model"))
    start = AutoModelForSequenceClassification.from_pretrained(reward_model)
    assert not torch.equal(critic.score.weight, start.score.weight)  # the critic was trained


def test_ppo_scores_rollouts_as_ptk_reward_encoded_its_pairs():
    """A conversational completion that ended with eos gets the template's end-of-turn tokens before the reward
    model scores it (the reward model learned to score there); a plain one and one cut at max_new_tokens do not."""
    from ptkernels.trainers.data.rows import Row
    from ptkernels.trainers.data.tiny_tokenizer import load_tiny_tokenizer
    from ptkernels.trainers.data.tokenization import encode_prompt, encode_sft, end_of_turn_suffix
    from ptkernels.trainers.recipes.ppo import scored_completions

    tok = load_tiny_tokenizer()
    chat = Row({"prompt": [{"role": "user", "content": "What is 2+2?"}]}, "x")
    plain = Row({"prompt": "2+2="}, "y")
    ids = tok("Answer: 4", add_special_tokens=False)["input_ids"]
    done = ids + [tok.eos_token_id]
    scored = scored_completions([chat, plain, chat], [done, done, ids], [True, True, False], end_of_turn_suffix(tok))
    for row, completion, got in zip([chat, plain], [[{"role": "assistant", "content": "Answer: 4"}], "Answer: 4"],
                                    scored):
        reward_row = Row({"prompt": row.data["prompt"], "completion": completion}, "z")
        expected = encode_sft(reward_row, tok, max_length=128, fmt="prompt_completion").input_ids
        assert encode_prompt(row, tok, max_prompt_length=128) + got == expected
    assert scored[2] == ids


def test_ppo_needs_a_reward_model(rl_data, tmp_path):
    with pytest.raises(ValueError, match="--reward-model is required"):
        ptk(["ppo", "--model", "tiny", "--data", rl_data, "--output-dir", str(tmp_path / "x")])


def _same(a, b):
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_resume_mid_rollout_is_exact(stage, sft_model, reward_model, rl_data, data_dir, tmp_path):
    args = {"grpo": ["--num-iterations", "2", "--num-generations", "4", "--ptx-data", data_dir["sft"],
                     "--ptx-coef", "0.5"],
            "ppo": ["--reward-model", reward_model, "--ppo-epochs", "2"]}[stage]
    base = [stage, "--data", rl_data, "--model", sft_model, "--max-steps", "5", "--prompts-per-step", "4",
            "--lr", "1e-3", *COMMON, *args]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ptk([*base, "--output-dir", a, "--save-steps", "3"])  # step 3 is the middle of the second rollout
    ptk([*base, "--output-dir", b, "--resume", os.path.join(a, "checkpoints", "step-000003")])
    _same(a, b)
    if stage == "ppo":
        _same(os.path.join(a, "value_model"), os.path.join(b, "value_model"))


def test_informative_groups_keeps_groups_with_a_reward_spread_first():
    from ptkernels.trainers.recipes.grpo import GRPORollouts
    from ptkernels.trainers.rollout.sampling import Rollout

    class Cfg:
        num_generations, prompts_per_step = 2, 2

    src = GRPORollouts.__new__(GRPORollouts)
    src.cfg = Cfg()
    rewards = [0, 0, 1, 0, 1, 1, 0, 1]  # groups: equal, spread, equal, spread
    scored = [(float(r), {}) for r in rewards]
    ids = [[i] for i in range(8)]
    out = Rollout(prompt_ids=ids, completion_ids=ids, texts=[str(i) for i in range(8)], finished=[True] * 8)
    rows, prompts, kept, scored = src.informative_groups(list(range(8)), ids, out, scored)
    assert rows == [2, 3, 6, 7] and kept.texts == ["2", "3", "6", "7"] and src.informative == 1.0
    rewards = [0, 0, 1, 1, 0, 1, 0, 0]  # only one group with a spread: it is kept, then the first other
    rows, *_ = src.informative_groups(list(range(8)), ids, out, [(float(r), {}) for r in rewards])
    assert rows == [0, 1, 4, 5] and src.informative == 0.5


def test_grpo_takes_another_rollout_engine(sft_model, rl_data, tmp_path):
    """A trainer accepts any RolloutEngine (what a vLLM engine would plug into): here one that always answers
    "Answer: 12", which the format verifier rewards, so every group's rewards are equal and the reward is 1."""
    from ptkernels.trainers.engine.config import GRPOConfig
    from ptkernels.trainers.modeling import load_tokenizer
    from ptkernels.trainers.recipes import grpo
    from ptkernels.trainers.rollout.sampling import Rollout

    tok = load_tokenizer(sft_model)
    answer = tok.encode("Answer: 12", add_special_tokens=False) + [tok.eos_token_id]

    class Fixed:
        calls = 0

        def generate(self, prompts, sampling, *, seed=None):
            Fixed.calls += 1
            return Rollout(prompt_ids=prompts, completion_ids=[answer] * len(prompts),
                           texts=["Answer: 12"] * len(prompts), finished=[True] * len(prompts))

    cfg = GRPOConfig(model=sft_model, data=rl_data, output_dir=str(tmp_path / "g"), max_steps=2, prompts_per_step=2,
                     num_generations=2, batch_size=4, progress=False)
    grpo.run(cfg, engine=Fixed())
    assert Fixed.calls == 2
    assert [m["reward"] for m in metrics(str(tmp_path / "g"))] == [1.0, 1.0]


def test_steps_log_where_their_time_went(sft_model, rl_data, tmp_path):
    """step_s (every stage) and, for an on-policy stage, the rollout's share: sampling (time_generate_s) inside
    the whole rollout (time_rollout_s: sampling, rewards, log-prob passes) inside the step; zeros on a step that
    reuses the previous rollout (--num-iterations 2)."""
    import time

    from ptkernels.trainers.engine.config import GRPOConfig
    from ptkernels.trainers.modeling import load_tokenizer
    from ptkernels.trainers.recipes import grpo
    from ptkernels.trainers.rollout.sampling import Rollout

    tok = load_tokenizer(sft_model)
    texts = ["Answer: 12", "Answer: 7"]

    class Slow:
        def generate(self, prompts, sampling, *, seed=None):
            time.sleep(0.2)
            done = [texts[i % 2] for i in range(len(prompts))]
            ids = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in done]
            return Rollout(prompt_ids=prompts, completion_ids=ids, texts=done, finished=[True] * len(prompts))

    out = str(tmp_path / "g")
    grpo.run(GRPOConfig(model=sft_model, data=rl_data, output_dir=out, max_steps=4, prompts_per_step=2,
                        num_generations=2, batch_size=4, num_iterations=2, progress=False), engine=Slow())
    rows = metrics(out)
    for m in rows[0::2]:  # steps 1 and 3 sample
        assert 0.2 <= m["time_generate_s"] <= m["time_rollout_s"] <= m["step_s"], m
        assert m["time_sync_s"] == 0.0  # an engine without sync_weights (it samples from the policy itself)
    for m in rows[1::2]:
        assert m["time_generate_s"] == m["time_rollout_s"] == 0.0 and m["step_s"] < 0.2, m

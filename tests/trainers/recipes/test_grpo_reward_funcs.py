"""``ptk grpo`` / ``ptk ppo --reward-funcs`` against TRL 1.16's GRPOTrainer: reward functions of one name keyed by
position, async functions, numpy returns, ``trainer_state`` and ``log_metric`` in metrics.jsonl, a reward file that
imports its neighbour, and ``reward_funcs`` / ``reward_weights`` (and the other comma-list options) as YAML lists
in a --config file. Tiny models, two steps."""

import dataclasses
import json
import math
import sys
import textwrap
from types import SimpleNamespace

import pytest
import yaml

from ptkernels.cli import main as ptk_cli
from ptkernels.trainers.engine import config as config_mod
from ptkernels.trainers.engine.config import DPOConfig, GRPOConfig, SFTConfig, parse_args_with_config, parse_config
from ptkernels.trainers.engine.distributed import DistInfo
from ptkernels.trainers.recipes.grpo import logged_metrics, rollout_state
from ptkernels.trainers.rewards.reward_funcs import RewardFuncs

from ..conftest import write_jsonl

SMALL = ["--model", "tiny", "--no-progress", "--max-length", "48", "--max-new-tokens", "6", "--batch-size", "8",
         "--prompts-per-step", "2", "--max-steps", "2", "--save-steps", "0"]


@pytest.fixture
def reward_files(tmp_path, monkeypatch):
    """Two files named rew.py in two folders, each with a function `score`; a's imports the helper beside it, is
    async, reads trainer_state and logs a metric; b's returns a numpy array and takes no **kwargs."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # a file import leaves its folder on the path
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "grpo_rf_helper_a.py").write_text("ONE = 1.0\n")
    (tmp_path / "a" / "rew.py").write_text(textwrap.dedent("""
        import asyncio
        from grpo_rf_helper_a import ONE

        async def score(completions, trainer_state, log_metric, **kwargs):
            await asyncio.sleep(0)
            log_metric("seen_step", trainer_state.global_step)
            log_metric("seen_max_steps", trainer_state.max_steps)
            return [ONE] * len(completions)
    """))
    (tmp_path / "b" / "rew.py").write_text(textwrap.dedent("""
        import numpy as np

        def score(completions, completion_ids):
            return np.array([float(len(ids)) for ids in completion_ids])
    """))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def rows(n=4):
    return [{"prompt": f"What is {k}+{k}?", "answer": str(2 * k)} for k in range(n)]


def test_grpo_same_name_functions_from_a_yaml_list(reward_files, tmp_path):
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(yaml.safe_dump({"reward_funcs": ["a/rew.py:score", "b/rew.py:score"],
                                   "reward_weights": [1, 0.5]}))
    out = tmp_path / "grpo"
    assert ptk_cli(["grpo", "--config", str(cfg), "--data", write_jsonl(tmp_path / "rl.jsonl", rows()),
                    "--output-dir", str(out), "--num-generations", "4", *SMALL]) == 0
    m = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(m) == 2
    for row in m:
        # one metric per function; the reward is a's 1 plus half of b's completion length (before: b's column
        # twice, and one metric)
        assert row["reward_score"] == 1.0 and 1 <= row["reward_score_2"] <= 6
        assert math.isclose(row["reward"], 1.0 + 0.5 * row["reward_score_2"], abs_tol=1e-6)
        assert row["seen_max_steps"] == 2
    assert [row["seen_step"] for row in m] == [0, 1]  # the optimizer steps done before the rollout (TRL's)
    run_config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_config["reward_funcs"] == "a/rew.py:score,b/rew.py:score" and run_config["reward_weights"] == "1,0.5"


def test_ppo_reward_functions_log_metrics(reward_files, tmp_path):
    out = tmp_path / "ppo"
    assert ptk_cli(["ppo", "--data", write_jsonl(tmp_path / "rl.jsonl", rows()), "--output-dir", str(out),
                    "--reward-funcs", "a/rew.py:score", "--ppo-epochs", "1", *SMALL]) == 0
    m = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [row["seen_step"] for row in m] == [0, 1] and all(row["seen_max_steps"] == 2 for row in m)


def test_a_data_column_named_completions_fails_before_the_model_loads(reward_files, tmp_path):
    data = write_jsonl(tmp_path / "rl.jsonl", [{**r, "completions": "x"} for r in rows()])
    with pytest.raises(Exception, match=r"rl\.jsonl:1: the data column 'completions'"):
        ptk_cli(["grpo", "--data", data, "--model", str(tmp_path / "no-such-model"), "--output-dir",
                 str(tmp_path / "x"), "--no-progress", "--reward-funcs", "a/rew.py:score"])
    assert not (tmp_path / "x").exists()


def test_rollout_state_and_logged_metrics(reward_files):
    cfg = GRPOConfig(max_steps=12, prompts_per_step=2, num_iterations=3)
    source = SimpleNamespace(cfg=cfg, info=DistInfo(), rows=list(range(8)), steps_per_rollout=3)
    state = rollout_state(source, 2)
    assert (state.global_step, state.max_steps, state.epoch, state.num_train_epochs) == (6, 12, 0.5, 1)
    state = rollout_state(SimpleNamespace(**{**vars(source), "cfg": dataclasses.replace(cfg, num_epochs=2.0)}), 0)
    assert state.max_steps == 24  # from --num-epochs: 2 passes over 8 prompts, 2 per rollout of 3 steps
    funcs = RewardFuncs("math")
    funcs.log_metric("judge_calls", 3)
    funcs.log_metric("judge_calls", 5)
    assert logged_metrics(funcs, DistInfo(), {}) == {"judge_calls": 4.0} and logged_metrics(funcs, DistInfo(), {}) == {}
    for name in ("reward", "loss", "kl"):  # a name of the run's own metrics would replace it in metrics.jsonl
        funcs.log_metric(name, 1.0)
        with pytest.raises(ValueError, match=f"logged '{name}', the name of one of the run's own metrics"):
            logged_metrics(funcs, DistInfo(), {"reward": 0.5})
    with pytest.raises(ValueError, match="the value must be a number"):
        funcs.log_metric("x", "high")


def test_yaml_lists_for_comma_list_options(tmp_path):
    """Every option whose value is a comma-separated list takes a YAML list in --config (joined); before,
    "option 'reward_funcs' must be str"."""
    f = tmp_path / "c.yaml"
    base = ["--model", "tiny", "--data", "x.jsonl", "--config", str(f)]
    f.write_text(yaml.safe_dump({"reward_funcs": ["math", "myrewards:brevity"], "reward_weights": [1.0, 0.5],
                                 "verifier": ["math:0.8", "format:0.2"], "lora_target_modules": ["q_proj", "v_proj"],
                                 "lora_modules_to_save": ["lm_head"]}))
    cfg = parse_config(GRPOConfig, base)
    assert (cfg.reward_funcs, cfg.reward_weights, cfg.verifier) == ("math,myrewards:brevity", "1.0,0.5",
                                                                     "math:0.8,format:0.2")
    assert (cfg.lora_target_modules, cfg.lora_modules_to_save) == ("q_proj,v_proj", "lm_head")
    f.write_text(yaml.safe_dump({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]}))
    cfg = parse_config(DPOConfig, base)
    assert (cfg.loss_type, cfg.loss_weights) == ("sigmoid,sft", "0.8,0.2")
    f.write_text(yaml.safe_dump({"reward_funcs": ["math", {"name": "format"}]}))
    with pytest.raises(ValueError, match=r"c\.yaml: option 'reward_funcs' takes a list of names or numbers"):
        parse_config(GRPOConfig, base)
    f.write_text(yaml.safe_dump({"loss_type": ["dapo", "grpo"]}))  # GRPO's loss type is one name
    with pytest.raises(ValueError, match=r"option 'loss_type' must be one of"):
        parse_config(GRPOConfig, base)
    f.write_text(yaml.safe_dump({"data": ["a.jsonl", "b.jsonl"]}))  # not a comma list: still refused
    with pytest.raises(ValueError, match=r"option 'data' must be str"):
        parse_config(SFTConfig, ["--model", "tiny", "--config", str(f)])
    # a hand-written parser (ptk eval)
    import argparse

    parser = argparse.ArgumentParser(prog="ptk eval")
    parser.add_argument("--reward-funcs", default="")
    parser.add_argument("--verifier", default="auto")
    f.write_text(yaml.safe_dump({"reward-funcs": ["math", "format"], "verifier": ["math", "format"]}))
    args = parse_args_with_config(parser, ["--config", str(f)])
    assert (args.reward_funcs, args.verifier) == ("math,format", "math,format")


def test_every_comma_list_option_is_known():
    """An option documented as comma-separated is in config.COMMA_LISTS (so a YAML list works for it)."""
    fields = {f.name: f for cls in vars(config_mod).values() if dataclasses.is_dataclass(cls) and isinstance(cls, type)
              for f in dataclasses.fields(cls)}
    documented = {n for n, f in fields.items() if "comma-separated" in f.metadata.get("help", "")}
    assert documented <= set(config_mod.COMMA_LISTS), documented - set(config_mod.COMMA_LISTS)
    assert set(config_mod.COMMA_LISTS) <= set(fields)

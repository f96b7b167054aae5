"""The YAML configs shipped in ptkernels/trainers/configs: each parses into its command's options, and every
trainer command reads ``--config`` (options that a command cannot use are not offered)."""

import dataclasses
import json
import os

import pytest
import yaml

from ptkernels.cli import COMMANDS
from ptkernels.cli import main as ptk
from ptkernels.trainers.engine import config
from ptkernels.trainers.engine.config import CONFIG_DIR, parse_args_with_config, parse_config
from ptkernels.trainers.recipes import evaluate, pipeline

STAGES = {"pretrain": config.PretrainConfig, "sft": config.SFTConfig, "reward": config.RewardConfig,
          "dpo": config.DPOConfig, "orpo": config.ORPOConfig, "simpo": config.SimPOConfig, "kto": config.KTOConfig,
          "grpo": config.GRPOConfig, "ppo": config.PPOConfig, "safety": config.SafetyConfig}


def shipped(name: str) -> str:
    return os.path.join(CONFIG_DIR, name)


def test_every_trainer_command_ships_an_example():
    names = sorted(f[:-len(".yaml")] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    assert names == sorted([c for c in COMMANDS if c not in ("check", "check-sandbox", "pipeline", "vllm-serve")])
    assert sorted(os.listdir(shipped("pipeline"))) == ["full.yaml", "quick.yaml"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_example_parses_into_its_config(stage):
    path = shipped(f"{stage}.yaml")
    cfg = parse_config(STAGES[stage], ["--config", path], prog=f"ptk {stage}")
    values = dataclasses.asdict(cfg)
    for key, value in yaml.safe_load(open(path)).items():
        assert values[key] == value, (stage, key)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_command_reads_config(stage, tmp_path, monkeypatch):
    """Through ``ptk STAGE --config``: the command's run() gets the file's values (the command line wins)."""
    import importlib

    module, _, func = COMMANDS[stage][0].partition(":")
    seen = []
    monkeypatch.setattr(importlib.import_module(module), "run", lambda cfg, *a, **k: seen.append(cfg))
    assert ptk([stage, "--config", shipped(f"{stage}.yaml"), "--seed", "7"]) == 0
    assert seen[0].seed == 7 and seen[0].data == yaml.safe_load(open(shipped(f"{stage}.yaml")))["data"]


def test_eval_example_parses_and_eval_runs_from_a_config(tmp_path):
    args = parse_args_with_config(evaluate.build_parser(), ["--config", shipped("eval.yaml")])
    for key, value in yaml.safe_load(open(shipped("eval.yaml"))).items():
        assert getattr(args, key) == value, key
    mine = tmp_path / "eval.yaml"
    out = tmp_path / "metrics.json"
    mine.write_text(f"model: tiny\nn_task: 2\nn_safety: 2\nmax_new_tokens: 4\noutput: {out}\n")
    assert ptk(["eval", "--config", str(mine), "--batch-size", "4"]) == 0
    metrics = json.load(open(out))
    assert metrics["n_arithmetic"] == 2 and metrics["n_harmful"] == 2  # the file's sizes
    assert metrics["mean_length"] <= 4  # the file's max_new_tokens


def test_eval_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nn_tasks: 3\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown option 'n_tasks'"):
        parse_args_with_config(evaluate.build_parser(), ["--config", str(bad)])


@pytest.mark.parametrize("name", ["quick", "full"])
def test_pipeline_presets_are_the_shipped_files(name, monkeypatch):
    assert pipeline.PRESETS[name] == yaml.safe_load(open(shipped(f"pipeline/{name}.yaml")))
    seen = []
    monkeypatch.setattr(pipeline.Pipeline, "run", lambda self: seen.append(self))
    assert ptk(["pipeline", "--preset", name, "--config", shipped(f"pipeline/{name}.yaml")]) == 0
    assert seen[0].preset == pipeline.PRESETS[name]


def test_pipeline_config_merges_over_the_preset(tmp_path, monkeypatch):
    mine = tmp_path / "mine.yaml"
    mine.write_text("output_dir: elsewhere\nseed: 3\nmodel: tiny\ngrpo: {max_steps: 5}\n")
    seen = []
    monkeypatch.setattr(pipeline.Pipeline, "run", lambda self: seen.append(self))
    assert ptk(["pipeline", "--config", str(mine), "--seed", "4"]) == 0
    p = seen[0]
    assert p.out == "elsewhere" and p.opts.seed == 4 and p.preset["model"] == "tiny"
    assert p.preset["grpo"]["max_steps"] == 5
    assert p.preset["grpo"]["num_generations"] == pipeline.PRESETS["quick"]["grpo"]["num_generations"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpoo: {max_steps: 5}\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown key"):
        ptk(["pipeline", "--config", str(bad)])


def test_reference_free_commands_take_no_reference_options():
    for cls in (config.ORPOConfig, config.SimPOConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        assert not names & {"ref_model", "ref_mode"}, cls.__name__
        with pytest.raises(SystemExit):
            parse_config(cls, ["--model", "tiny", "--data", "x", "--ref-model", "somewhere"])
    assert {"ref_model", "ref_mode"} <= {f.name for f in dataclasses.fields(config.DPOConfig)}

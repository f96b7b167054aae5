"""Config: defaults < YAML < command line; --help lists every option with its default; errors name the key."""

import dataclasses

import pytest

from ptkernels.cli import main as ptk
from ptkernels.trainers.engine.config import DPOConfig, SFTConfig, build_parser, parse_config


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit) as e:
        ptk(["sft", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(SFTConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "(default: 0.0003)" in text  # lr
    assert "(default: runs/sft)" in text  # output_dir
    assert "required: a local Hugging Face model folder" in " ".join(text.split())  # --model has no silent default


def test_yaml_then_command_line(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.01\nbatch_size: 3\npacking: true\nadam-betas: [0.8, 0.9]\n")
    cfg = parse_config(SFTConfig, ["--config", str(cfg_file), "--model", "tiny", "--data", "x.jsonl",
                                   "--batch-size", "5"])
    assert cfg.lr == 0.01 and cfg.batch_size == 5 and cfg.packing is True and cfg.adam_betas == (0.8, 0.9)
    cfg = parse_config(SFTConfig, ["--config", str(cfg_file), "--model", "tiny", "--data", "x.jsonl", "--no-packing"])
    assert cfg.packing is False
    assert parse_config(SFTConfig, ["--model", "tiny", "--data", "x"]).lr == 3e-4  # the stage's own default


def test_resume_flag_alone_means_latest():
    assert parse_config(SFTConfig, ["--model", "tiny", "--data", "x", "--resume"]).resume == "latest"
    assert parse_config(SFTConfig, ["--model", "tiny", "--data", "x", "--resume", "some/dir"]).resume == "some/dir"
    assert parse_config(SFTConfig, ["--model", "tiny", "--data", "x"]).resume == ""


@pytest.mark.parametrize("text,match", [
    ("lrr: 0.1\n", "unknown option 'lrr'"),
    ("lr: fast\n", "option 'lr' must be float"),
    ("packing: 1\n", "option 'packing' must be bool"),
    ("truncation: middle\n", "'truncation' must be one of"),
    ("- 1\n", "must be a mapping"),
])
def test_yaml_errors_name_the_key_and_file(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        parse_config(SFTConfig, ["--config", str(f), "--model", "tiny", "--data", "x"])
    assert "bad.yaml" in str(e.value)


def test_values_are_checked():
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        parse_config(SFTConfig, ["--model", "tiny", "--data", "x", "--batch-size", "0"])
    with pytest.raises(ValueError, match="--data is required"):
        parse_config(SFTConfig, [])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        parse_config(DPOConfig, ["--model", "tiny", "--data", "x", "--ref-mode", "sometimes"])


def test_every_stage_has_a_parser():
    from ptkernels.trainers.engine import config

    for cls in (config.PretrainConfig, config.SFTConfig, config.RewardConfig, config.DPOConfig, config.ORPOConfig,
                config.SimPOConfig, config.KTOConfig):
        assert build_parser(cls, "ptk x").parse_args([]).max_steps == cls.max_steps


def test_model_is_required():
    """No silent random model: --model must be given (the presets stay available as an explicit --model tiny)."""
    with pytest.raises(ValueError, match="--model is required"):
        parse_config(SFTConfig, ["--data", "x"])
    assert parse_config(SFTConfig, ["--data", "x", "--model", "tiny"]).model == "tiny"


@pytest.mark.parametrize("stage,cls_name", [
    ("pretrain", "PretrainConfig"), ("sft", "SFTConfig"), ("reward", "RewardConfig"), ("dpo", "DPOConfig"),
    ("orpo", "ORPOConfig"), ("simpo", "SimPOConfig"), ("kto", "KTOConfig"), ("grpo", "GRPOConfig"),
    ("ppo", "PPOConfig"), ("safety", "SafetyConfig")])
def test_a_runs_run_config_yaml_runs_it_again(tmp_path, stage, cls_name):
    """run_config.yaml as a run writes it (null for an unset optional option such as GRPO's
    off_policy_mask_threshold) is a valid --config for the same stage, and gives back the same options."""
    from ptkernels.trainers.engine import config
    from ptkernels.trainers.engine.checkpoint import _write_yaml

    cls = getattr(config, cls_name)
    cfg = parse_config(cls, ["--model", "tiny", "--data", "x.jsonl", "--output-dir", str(tmp_path / "o")])
    path = str(tmp_path / "run_config.yaml")
    _write_yaml(path, config.run_config_dict(cfg, stage))
    again = parse_config(cls, ["--config", path], prog=f"ptk {stage}")
    assert config.run_config_dict(again, stage) == config.run_config_dict(cfg, stage)

"""Every option is checked before anything heavy: ranges, finiteness, list lengths; errors name the flag or the YAML
key and file; the console prints one line; run_config.yaml round-trips through --config."""

import subprocess
import sys

import pytest

from ptkernels.cli import main as ptk
from ptkernels.trainers.engine.config import (
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    PPOConfig,
    SafetyConfig,
    SFTConfig,
    parse_config,
)
from ptkernels.trainers.engine.validate import RULES, ConfigError


@pytest.mark.parametrize("cls,args,match", [
    (SFTConfig, ["--lr", "inf"], r"--lr must be finite and > 0 \(got inf\)"),
    (SFTConfig, ["--lr", "0"], r"--lr must be finite and > 0"),
    (SFTConfig, ["--min-lr-ratio", "nan"], r"--min-lr-ratio must be finite and in \[0, 1\] \(got nan\)"),
    (SFTConfig, ["--max-grad-norm", "nan"], r"--max-grad-norm must be finite and >= 0"),
    (SFTConfig, ["--log-steps", "0"], r"--log-steps must be >= 1 \(got 0\)"),
    (SFTConfig, ["--adam-betas", "0.9", "1.5"], r"--adam-betas must be a list of 2 numbers in \[0, 1\)"),
    (SFTConfig, ["--resume", "--overwrite"], "contradict"),
    (GRPOConfig, ["--num-iterations", "0"], r"--num-iterations must be >= 1"),
    (GRPOConfig, ["--num-generations", "0"], r"--num-generations must be >= 1"),
    (GRPOConfig, ["--prompts-per-step", "0"], r"--prompts-per-step must be >= 1"),
    (GRPOConfig, ["--beta", "-1"], r"--beta must be finite and >= 0 \(got -1.0\)"),
    (GRPOConfig, ["--top-p", "0"], r"--top-p must be finite and in \(0, 1\]"),
    (DPOConfig, ["--beta", "-1"], r"--beta must be finite and > 0"),
    (DPOConfig, ["--label-smoothing", "0.7"], r"--label-smoothing must be finite and in \[0, 0.5\]"),
    (KTOConfig, ["--desirable-weight=-inf"], r"--desirable-weight must be finite and >= 0"),
    (PPOConfig, ["--gamma", "1.5"], r"--gamma must be finite and in \[0, 1\]"),
    (PPOConfig, ["--ppo-epochs", "0"], r"--ppo-epochs must be >= 1"),
    (SafetyConfig, ["--eval-fraction", "1"], r"--eval-fraction must be finite and in \[0, 1\)"),
])
def test_bad_values_name_the_flag_and_range(cls, args, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(cls, ["--model", "tiny", "--data", "x", *args])


def test_every_numeric_option_has_a_rule():
    import dataclasses
    import typing

    from ptkernels.trainers.engine import config

    for cls in (config.PretrainConfig, SFTConfig, config.RewardConfig, DPOConfig, config.ORPOConfig,
                config.SimPOConfig, KTOConfig, GRPOConfig, PPOConfig, SafetyConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                assert f.name in RULES, f"{cls.__name__}.{f.name} has no range"
        parse_config(cls, ["--model", "tiny", "--data", "x"])  # every default is inside its range


def test_yaml_values_checked_with_key_and_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lr: 1e-4\nmax_steps: 3\n")
    # YAML 1.1 reads 1e-4 as a string
    assert parse_config(SFTConfig, ["--config", str(f), "--model", "tiny", "--data", "x"]).lr == 1e-4
    f.write_text("adam_betas: [0.9]\n")
    with pytest.raises(ConfigError, match=r"run.yaml: option 'adam_betas' must be a list of 2 numbers"):
        parse_config(SFTConfig, ["--config", str(f), "--model", "tiny", "--data", "x"])
    f.write_text("lr: .inf\n")
    with pytest.raises(ConfigError, match=r"run.yaml: option 'lr' must be finite and > 0 \(got inf\)"):
        parse_config(SFTConfig, ["--config", str(f), "--model", "tiny", "--data", "x"])
    # the command line overrides the file, and then the flag is what is named
    f.write_text("lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"^--max-steps"):
        parse_config(SFTConfig, ["--config", str(f), "--model", "tiny", "--data", "x", "--max-steps", "0"])


def test_one_generation_warns(capsys):
    parse_config(GRPOConfig, ["--model", "tiny", "--data", "x", "--num-generations", "1"])
    err = capsys.readouterr().err
    assert "ptk: warning: --num-generations 1" in err and "learns nothing" in err


def test_console_errors_are_one_line_and_version():
    env_cmd = [sys.executable, "-m", "ptkernels.cli"]
    res = subprocess.run([*env_cmd, "sft", "--data", "x.jsonl", "--lr", "inf"], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip() == "ptk: error: --lr must be finite and > 0 (got inf)"
    res = subprocess.run([*env_cmd, "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("ptk (ptkernels) ")
    res = subprocess.run([*env_cmd, "sft", "--data", "x.jsonl", "--lr", "inf", "--debug"], capture_output=True,
                         text=True)
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_run_config_round_trips(data_dir, tmp_path):
    out = tmp_path / "out"
    ptk(["sft", "--data", data_dir["sft"], "--output-dir", str(out), "--max-steps", "1", "--model", "tiny",
         "--no-progress", "--batch-size", "2", "--max-length", "32", "--lr", "1e-3"])
    cfg = parse_config(SFTConfig, ["--config", str(out / "run_config.yaml"), "--output-dir", str(tmp_path / "b")],
                       prog="ptk sft")
    assert cfg.lr == 1e-3 and cfg.max_steps == 1 and cfg.max_length == 32 and cfg.data == data_dir["sft"]
    with pytest.raises(ValueError, match="for 'ptk sft', not 'ptk dpo'"):
        parse_config(DPOConfig, ["--config", str(out / "run_config.yaml")], prog="ptk dpo")

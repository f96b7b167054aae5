"""ptk safety: SL-CAI (critique, revise, SFT) then RLAIF (judged pairs, DPO), with the rule judge and the model
as its own judge."""

import json
import os

import pytest

from ptkernels.cli import main as ptk
from ptkernels.trainers.recipes.safety import load_constitution
from ptkernels.trainers.taskworld import REFUSAL, redteam_rows, rule_judge, write_constitution, write_jsonl

COMMON = ["--no-progress", "--max-length", "96", "--max-new-tokens", "20", "--batch-size", "16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    return {"data": write_jsonl(redteam_rows(seed=0, n=120), str(d / "redteam.jsonl")),
            "constitution": write_constitution(str(d / "constitution.yaml"))}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, data_dir):
    """A tiny model SFT-ed on arithmetic only: it never refuses."""
    out = str(tmp_path_factory.mktemp("sft") / "m")
    ptk(["sft", "--model", "tiny", "--data", data_dir["sft"], "--output-dir", out, "--max-steps", "40",
         "--batch-size", "16", "--lr", "3e-3", "--no-progress"])
    return out


def test_rule_judge_teaches_refusals(world, base_model, tmp_path):
    out = tmp_path / "safety"
    assert ptk(["safety", "--model", base_model, "--constitution", world["constitution"], "--data", world["data"],
                "--judge", "rule", "--output-dir", str(out), "--max-steps", "150", "--lr", "3e-3",
                "--dpo-steps", "10", *COMMON]) == 0
    report = json.loads((out / "safety_report.json").read_text())
    assert report["before"]["refusal_rate_harmful"] < 0.2
    assert report["after"]["refusal_rate_harmful"] >= 0.8
    assert report["after"]["over_refusal_benign"] <= 0.2
    sl = [json.loads(line) for line in open(out / "sl_cai_data.jsonl")]
    for row in sl:  # the rule judge revises to the ideal answer, and keeps what was already right
        revision = row["completion"][0]["content"]
        if row["critique"] != "The response follows the principle.":
            assert revision == REFUSAL or revision.startswith("Answer: ")
    pairs = [json.loads(line) for line in open(out / "rlaif_data.jsonl")]
    rows = {json.dumps(r["prompt"]): r for r in map(json.loads, open(world["data"]))}
    for p in pairs:  # the chosen answer is never judged worse than the rejected one
        row = rows[json.dumps(p["prompt"])]
        assert rule_judge(row, p["chosen"][0]["content"]) >= rule_judge(row, p["rejected"][0]["content"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out / "sl_cai")


def test_model_as_its_own_judge_runs(world, base_model, tmp_path):
    out = tmp_path / "self"
    assert ptk(["safety", "--model", base_model, "--constitution", world["constitution"], "--data", world["data"],
                "--judge", "self", "--output-dir", str(out), "--max-steps", "3", "--dpo-steps", "2", *COMMON]) == 0
    sl = [json.loads(line) for line in open(out / "sl_cai_data.jsonl")]
    assert all("principle" in r and "critique" in r for r in sl)
    assert os.path.exists(out / "model.safetensors")


def test_constitution_is_checked(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("principle: be nice\n")
    with pytest.raises(ValueError, match="non-empty YAML list"):
        load_constitution(str(bad))
    with pytest.raises(ValueError, match="--constitution is required"):
        load_constitution("")


def test_training_options_reach_both_stages_and_resume_continues_them(world, base_model, tmp_path):
    """--save-steps, --gradient-checkpointing and --resume act on the SL-CAI SFT stage and the RLAIF DPO stage."""
    import yaml

    out = tmp_path / "opts"
    data = write_jsonl(redteam_rows(seed=0, n=24), str(tmp_path / "redteam.jsonl"))  # few rows: this is about options
    args = ["safety", "--model", base_model, "--constitution", world["constitution"], "--data", data,
            "--judge", "rule", "--output-dir", str(out), "--save-steps", "1", "--save-total-limit", "5",
            "--gradient-checkpointing", *COMMON]
    assert ptk([*args, "--max-steps", "2", "--dpo-steps", "2"]) == 0
    for stage in (out / "sl_cai", out):
        run = yaml.safe_load((stage / "run_config.yaml").read_text())
        assert run["gradient_checkpointing"] is True and run["save_steps"] == 1, stage
        assert (stage / "checkpoints" / "step-000001").is_dir(), stage
    assert ptk([*args, "--max-steps", "3", "--dpo-steps", "3", "--resume"]) == 0
    for stage in (out / "sl_cai", out):  # steps 1-2 from the first run, step 3 resumed from its checkpoint
        steps = [json.loads(line)["step"] for line in open(stage / "metrics.jsonl")]
        assert steps == [1, 2, 3], stage
    with pytest.raises(ValueError, match="--resume takes no folder"):
        ptk([*args, "--resume", str(out / "checkpoints" / "step-000001")])


def test_blank_revisions_are_left_out_of_the_sl_cai_data(capsys):
    """A policy (or self-judge) that writes only whitespace must not produce rows the SFT stage then refuses."""
    import random

    from ptkernels.trainers.data.rows import Row
    from ptkernels.trainers.recipes.safety import _sl_cai_rows

    class Judge:
        def critique_and_revise(self, row, answer, principle):
            return "critique", answer.strip()  # a revision that keeps the answer, blank when the answer is

    rows = [Row({"prompt": [{"role": "user", "content": f"q{i}"}]}, f"d:{i}") for i in range(3)]
    kept = _sl_cai_rows(rows, ["fine", "   ", "ok"], Judge(), ["be kind"], random.Random(0))
    assert [r["completion"][0]["content"] for r in kept] == ["fine", "ok"]
    assert "1 blank revisions left out" in capsys.readouterr().out
    with pytest.raises(ValueError, match="every answer and its revision was blank"):
        _sl_cai_rows(rows, [" ", "\n", ""], Judge(), ["be kind"], random.Random(0))

"""A reduced ``ptk pipeline`` end to end: every stage leaves a loadable model, the report has the contract's
keys, and --resume keeps what is done."""

import json
import os

import pytest

from ptkernels.trainers.recipes.pipeline import EVAL_STAGES, PRESETS, Pipeline, PipelineOptions
from ptkernels.trainers.recipes.report import METRICS

TINY = {
    "model": "tiny", "eval": {"n_task": 6, "n_safety": 6},
    "world": {"pretrain": 200, "sft": 120, "preference": 64, "kto": 16, "rl": 64, "redteam": 48},
    "pretrain": {"max_steps": 6, "batch_size": 8, "max_length": 64},
    "sft": {"max_steps": 6, "batch_size": 8},
    "reward": {"max_steps": 3, "batch_size": 8},
    "ppo": {"max_steps": 2, "prompts_per_step": 4, "max_new_tokens": 8, "batch_size": 8},
    "dpo": {"max_steps": 3, "batch_size": 8},
    "grpo": {"max_steps": 2, "prompts_per_step": 2, "num_generations": 4, "max_new_tokens": 8, "batch_size": 8},
    "safety": {"max_steps": 3, "dpo_steps": 2, "batch_size": 8, "max_new_tokens": 8},
}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pipe"))
    Pipeline(PipelineOptions(output_dir=out, progress=False, overrides=TINY)).run()
    return out


def test_every_stage_leaves_a_model_and_the_report_has_the_contract(pipeline_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for stage in ("base", "sft", "ppo", "dpo", "grpo", "safety"):
        AutoModelForCausalLM.from_pretrained(os.path.join(pipeline_dir, stage))
    AutoModelForSequenceClassification.from_pretrained(os.path.join(pipeline_dir, "reward"))
    report = json.load(open(os.path.join(pipeline_dir, "report.json")))
    assert list(report["stages"]) == list(EVAL_STAGES)
    for stage, metrics in report["stages"].items():
        assert set(METRICS) <= set(metrics), stage
    assert report["stages"]["sft"]["win_rate_vs_sft"] == 0.5  # the SFT model against itself
    assert report["stages"]["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4)
    assert report["meta"]["preset"] == "quick" and set(report["meta"]["stage_seconds"]) >= {"pretrain", "eval"}
    md = open(os.path.join(pipeline_dir, "report.md")).read()
    for stage in EVAL_STAGES:
        assert f"\n| {stage} |" in md, stage
    for png in ("training_curves.png", "metrics.png"):
        assert open(os.path.join(pipeline_dir, "plots", png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_keeps_finished_stages(pipeline_dir, capsys):
    before = os.path.getmtime(os.path.join(pipeline_dir, "sft", "model.safetensors"))
    Pipeline(PipelineOptions(output_dir=pipeline_dir, progress=False, resume=True, overrides=TINY)).run()
    assert os.path.getmtime(os.path.join(pipeline_dir, "sft", "model.safetensors")) == before
    assert "sft: kept" in capsys.readouterr().out


def test_presets_name_every_stage():
    for name, preset in PRESETS.items():
        for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo", "safety", "world", "eval", "model",
                      "sft_verbose", "sft_scarce"):
            assert stage in preset, (name, stage)


def test_resume_continues_a_stage_that_stopped_part_way(pipeline_dir, tmp_path, capsys):
    # A GRPO stage that stopped after its checkpoint and before its model: --resume continues it from the
    # checkpoint (steps 3.. only) rather than starting over and discarding the finished steps.
    out = str(tmp_path / "pipe")
    import shutil

    shutil.copytree(pipeline_dir, out)
    for name in ("model.safetensors", "config.json"):
        os.remove(os.path.join(out, "grpo", name))
    more = {**TINY, "grpo": {**TINY["grpo"], "max_steps": 3}}
    Pipeline(PipelineOptions(output_dir=out, progress=False, resume=True, overrides=more)).run()
    assert "grpo: continuing from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "grpo", "metrics.jsonl"))]
    assert steps == [2, 3]  # the first run's last row (every 5th step is logged, and the last), then step 3 alone
    assert os.path.exists(os.path.join(out, "grpo", "model.safetensors"))

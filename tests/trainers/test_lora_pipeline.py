"""``ptk pipeline --lora`` on a cut-down config: every post-training stage trains an adapter, merges it for the next
stage, and the report is written."""

import json
import os

from ptkernels.trainers.recipes.pipeline import EVAL_STAGES, Pipeline, PipelineOptions, options_from_args

from .recipes.test_pipeline import TINY

SHORT = {**TINY, "world": {**TINY["world"], "pretrain": 64, "sft": 48, "preference": 32, "rl": 16, "redteam": 24},
         "pretrain": {**TINY["pretrain"], "max_steps": 2}, "sft": {"max_steps": 2, "batch_size": 8},
         "reward": {"max_steps": 2, "batch_size": 8}, "dpo": {"max_steps": 2, "batch_size": 8},
         "safety": {**TINY["safety"], "max_steps": 2}}


def test_pipeline_with_lora(tmp_path):
    out = str(tmp_path / "pipe")
    Pipeline(PipelineOptions(output_dir=out, progress=False, overrides=SHORT, lora=True)).run()
    assert os.path.exists(os.path.join(out, "base", "model.safetensors"))  # pretraining makes the base in full
    for stage in ("sft", "reward", "ppo", "dpo", "grpo", "safety"):
        assert os.path.exists(os.path.join(out, stage, "adapter_model.safetensors")), stage
        assert not os.path.exists(os.path.join(out, stage, "model.safetensors")), stage
        assert os.path.exists(os.path.join(out, stage, "merged", "model.safetensors")), stage
    report = json.load(open(os.path.join(out, "report.json")))
    assert list(report["stages"]) == list(EVAL_STAGES)
    assert options_from_args(["--lora"]).lora

"""Run-level guarantees: exact resume, Ctrl-C, bad data and bad steps never replace a good output."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ptkernels.cli import main as ptk
from ptkernels.trainers.engine import loop
from ptkernels.trainers.engine.config import SFTConfig
from ptkernels.trainers.engine.distributed import DistInfo
from ptkernels.trainers.modeling import TrainingModule, load_causal_lm

COMMON = ["--model", "tiny", "--no-progress", "--batch-size", "4", "--max-length", "48", "--lr", "2e-3"]


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def snapshot(folder):
    """Every file's content hash: proves a folder was not touched."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_resume_is_exact(data_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ptk(["sft", "--data", data_dir["sft"], "--output-dir", str(a), "--max-steps", "6", "--save-steps", "3",
         "--grad-accum", "2", *COMMON])
    ckpt = a / "checkpoints" / "step-000003"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "trainer_state.pt").exists()
    ptk(["sft", "--data", data_dir["sft"], "--output-dir", str(b), "--max-steps", "6", "--resume", str(ckpt),
         "--grad-accum", "2", *COMMON])
    assert_same_weights(a, b)
    steps = [json.loads(line)["step"] for line in open(b / "metrics.jsonl")]
    assert steps == [4, 5, 6]


def test_ctrl_c_saves_and_resume_continues_exactly(data_dir, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ["sft", "--data", data_dir["sft"], "--max-steps", "40", *COMMON]
    ptk([*args, "--output-dir", str(straight)])
    proc = subprocess.Popen([sys.executable, "-m", "ptkernels.cli", *args, "--output-dir", str(stopped)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; checkpoint saved at step" in err
    saved = [d for d in os.listdir(stopped / "checkpoints") if d.startswith("step-")]
    assert len(saved) == 1 and int(saved[0][5:]) < 40
    assert not (stopped / "model.safetensors").exists()  # no final model from an interrupted run
    ptk([*args, "--output-dir", str(stopped), "--resume"])
    assert_same_weights(straight, stopped)


def test_malformed_data_names_file_and_line_and_leaves_output(data_dir, tmp_path):
    out = tmp_path / "out"
    ptk(["sft", "--data", data_dir["sft"], "--output-dir", str(out), "--max-steps", "2", *COMMON])
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    good = open(data_dir["sft"]).read().splitlines()
    cases = {
        "invalid JSON": good[:2] + ['{"messages": [}'],
        "missing field": good[:3] + ['{"prompt": "hi"}'],
        "wrong type": good[:1] + ['{"messages": "hello"}'],
        "empty completion": good[:4] + ['{"prompt": "What is 1+1?", "completion": ""}'],
    }
    for what, lines in cases.items():
        bad.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError) as e:
            ptk(["sft", "--data", str(bad), "--output-dir", str(out), "--max-steps", "2", "--overwrite", *COMMON])
        assert f"bad.jsonl:{len(lines)}" in str(e.value), what
        assert snapshot(out) == before, what


def test_earlier_run_needs_resume_or_overwrite(data_dir, tmp_path):
    out = tmp_path / "out"
    args = ["sft", "--data", data_dir["sft"], "--output-dir", str(out), "--max-steps", "2", *COMMON]
    ptk(args)
    with pytest.raises(FileExistsError, match="--resume"):
        ptk(args)
    assert ptk([*args, "--overwrite", "--seed", "1"]) == 0


class _NaNAfter(TrainingModule):
    """A loss that turns NaN at a given step: stands for a diverged run."""

    def __init__(self, model, bad_step):
        super().__init__(model)
        self.calls, self.bad_step = 0, bad_step

    def count(self, batch):
        return batch["input_ids"].numel()

    def forward(self, batch, norm):
        self.calls += 1
        loss = self.model(input_ids=batch["input_ids"]).logits.float().mean() * 0 + 1.0
        return (loss * float("nan") if self.calls >= self.bad_step else loss), {}


def test_non_finite_loss_stops_without_saving(tmp_path):
    out = tmp_path / "out"
    cfg = SFTConfig(data="unused", output_dir=str(out), max_steps=6, save_steps=2, batch_size=2, progress=False)
    model, tok = load_causal_lm("tiny")
    data = loop.Dataset([{"input_ids": torch.arange(8)}] * 4, lambda ex: {"input_ids": torch.stack(
        [e["input_ids"] for e in ex])})
    with pytest.raises(FloatingPointError, match="not finite at step 4"):
        loop.train(cfg, _NaNAfter(model, bad_step=4), data, tok, DistInfo(), stage="test")
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000002"]  # the good one, and nothing after it
    assert not (out / "model.safetensors").exists()


def test_too_long_prompts_are_truncated_or_dropped(tmp_path, data_dir):
    rows = [json.loads(line) for line in open(data_dir["sft"])][:8]
    long_row = {"prompt": "tell me " * 200, "completion": "Answer: 7"}
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [*[{"prompt": r["messages"][0]["content"],
                                                         "completion": r["messages"][1]["content"]} for r in rows],
                                                       long_row]) + "\n")
    args = ["sft", "--data", str(data), "--max-steps", "1", *COMMON]
    ptk([*args, "--output-dir", str(tmp_path / "left"), "--truncation", "left"])
    only_long = tmp_path / "long.jsonl"
    only_long.write_text(json.dumps(long_row) + "\n")
    with pytest.raises(ValueError, match="no examples left"):
        ptk(["sft", "--data", str(only_long), "--max-steps", "1", *COMMON, "--output-dir", str(tmp_path / "d"),
             "--truncation", "drop"])

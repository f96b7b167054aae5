"""One run identity, resume exact or refused, preemption signals, a full disk: runs that lose nothing."""

import errno
import glob
import json
import os
import signal

import pytest
import torch

from ptkernels.cli import main as ptk
from ptkernels.trainers.engine import checkpoint as ckpt
from ptkernels.trainers.engine import loop

from .test_loop import assert_same_weights

COMMON = ["--model", "tiny", "--no-progress", "--batch-size", "4", "--max-length", "40", "--lr", "2e-3"]


def sft(data, out, *args):
    return ptk(["sft", "--data", data, "--output-dir", str(out), *COMMON, *args])


def steps_logged(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


def saved_steps(out):
    return [ckpt.step_of(p) for p in ckpt.list_checkpoints(str(out), run_id=None)]


@pytest.fixture
def signal_after(monkeypatch):
    """Sends ``sig`` to this process right after optimizer step ``n`` (1-based) returns: the loop sees it in the
    next step's reduction and stops after that step."""

    def arm(n, sig=signal.SIGTERM):
        original = loop.Trainer.step

        def step(self, index, stop):
            out = original(self, index, stop)
            if index + 1 == n:
                signal.raise_signal(sig)
            return out

        monkeypatch.setattr(loop.Trainer, "step", step)
        return lambda: monkeypatch.setattr(loop.Trainer, "step", original)

    return arm


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """Uninterrupted reference runs: 4 steps with seed 1."""
    out = tmp_path_factory.mktemp("straight") / "s1"
    sft(data_dir["sft"], out, "--max-steps", "4", "--seed", "1")
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_and_resume_is_exact(data_dir, tmp_path, straight, signal_after, sig, capsys):
    out = tmp_path / "run"
    disarm = signal_after(1, sig)
    assert sft(data_dir["sft"], out, "--max-steps", "4", "--seed", "1") == 128 + sig
    assert f"interrupted ({signal.Signals(sig).name}); checkpoint saved at step 2" in capsys.readouterr().err
    disarm()
    sft(data_dir["sft"], out, "--max-steps", "4", "--seed", "1", "--resume")
    assert_same_weights(straight, out)
    assert steps_logged(out) == [1, 2, 3, 4]


def test_overwrite_then_stop_then_resume_continues_the_new_run(data_dir, tmp_path, straight, signal_after):
    out = tmp_path / "run"
    sft(data_dir["sft"], out, "--max-steps", "6", "--save-steps", "2", "--seed", "0")  # the old run: steps 2, 4, 6
    disarm = signal_after(1)
    assert sft(data_dir["sft"], out, "--max-steps", "4", "--seed", "1", "--overwrite", "--save-steps", "1") == 143
    disarm()
    assert saved_steps(out) == [1, 2]  # the new run's, none of the old run's higher steps
    assert not glob.glob(str(out / ".overwritten-*"))  # deleted once the new run had a complete checkpoint
    sft(data_dir["sft"], out, "--max-steps", "4", "--seed", "1", "--resume", "--save-steps", "1")
    assert_same_weights(straight, out)
    assert steps_logged(out) == [1, 2, 3, 4]


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    sft(data_dir["sft"], out, "--max-steps", "2", "--save-steps", "1")
    old_metrics = (out / "metrics.jsonl").read_text()

    def crash(self, index, stop):
        raise RuntimeError("crashed before the first checkpoint")

    monkeypatch.setattr(loop.Trainer, "step", crash)
    with pytest.raises(RuntimeError, match="crashed"):
        sft(data_dir["sft"], out, "--max-steps", "2", "--overwrite", "--seed", "3")
    monkeypatch.undo()
    aside = glob.glob(str(out / ".overwritten-*"))
    assert len(aside) == 1 and open(os.path.join(aside[0], "metrics.jsonl")).read() == old_metrics
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(os.path.join(aside[0]), run_id=None)] == [1, 2]
    # the new run has no checkpoint: --resume says so and points at --overwrite, a plain run does not advise --resume
    with pytest.raises(FileNotFoundError, match="stopped before its first checkpoint.*--overwrite"):
        sft(data_dir["sft"], out, "--max-steps", "2", "--resume")
    with pytest.raises(FileExistsError) as e:
        sft(data_dir["sft"], out, "--max-steps", "2")
    assert "--resume" not in str(e.value) and "--overwrite" in str(e.value)
    sft(data_dir["sft"], out, "--max-steps", "2", "--overwrite", "--seed", "3")
    assert not glob.glob(str(out / ".overwritten-*")) and saved_steps(out) == [2]


def test_damaged_latest_checkpoint_falls_back(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    sft(data_dir["sft"], out, "--max-steps", "3", "--save-steps", "1", "--save-total-limit", "3")
    reference = {k: v.clone() for k, v in ckpt_weights(out).items()}
    weights = out / "checkpoints" / "step-000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a crash of the disk
    capsys.readouterr()
    sft(data_dir["sft"], out, "--max-steps", "3", "--save-steps", "1", "--resume")
    text = capsys.readouterr().out
    assert "step-000003 is damaged (model.safetensors has 100 bytes" in text
    assert "resuming from step 2" in text
    assert steps_logged(out) == [1, 2, 3]  # step 3 logged once, by the resumed run
    for k, v in ckpt_weights(out).items():
        assert torch.equal(v, reference[k]), k


def ckpt_weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model.safetensors"))


def test_resume_refuses_a_changed_run_setup(data_dir, tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "d.jsonl"
    data.write_text(open(data_dir["sft"]).read())
    sft(str(data), out, "--max-steps", "2", "--save-steps", "1")
    with pytest.raises(ValueError, match=r"the global batch \(batch size x grad accum x processes\): 4 in the "
                                         r"checkpoint, 8 now"):
        ptk(["sft", "--data", str(data), "--output-dir", str(out), *COMMON, "--batch-size", "8", "--max-steps",
             "3", "--resume"])
    with pytest.raises(ValueError, match="--seed: 0 in the checkpoint, 5 now"):
        sft(str(data), out, "--max-steps", "3", "--resume", "--seed", "5")
    data.write_text("\n".join(open(data_dir["sft"]).read().splitlines()[:-1]) + "\n")
    with pytest.raises(ValueError, match="the content of .*d.jsonl changed since the checkpoint.*"
                                         "--allow-config-change"):
        sft(str(data), out, "--max-steps", "3", "--resume")
    sft(str(data), out, "--max-steps", "3", "--resume", "--allow-config-change")
    assert steps_logged(out) == [1, 2, 3]


def test_lr_and_steps_changes_on_resume_are_applied_and_recorded(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    sft(data_dir["sft"], out, "--max-steps", "2", "--save-steps", "1", "--min-lr-ratio", "1")
    capsys.readouterr()
    sft(data_dir["sft"], out, "--max-steps", "3", "--resume", "--min-lr-ratio", "1", "--lr", "5e-4")
    text = capsys.readouterr().out
    assert "resuming from step 2" in text and "--lr 0.002 -> 0.0005 (applied)" in text
    assert "--max-steps 2 -> 3 (applied)" in text
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["lr"] == 2e-3 and rows[2]["lr"] == 5e-4
    state = ckpt.load_trainer_state(str(out / "checkpoints" / "step-000003"))
    assert state["changes"] == [{"step": 2, "lr": [2e-3, 5e-4], "max_steps": [2, 3]}]
    assert "lr: 0.0005" in (out / "run_config.yaml").read_text()


def test_disk_full_names_the_step_and_keeps_the_previous(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, path, *a, **k):
        if "step-000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", save)
    with pytest.raises(ckpt.DiskFullError) as e:
        sft(data_dir["sft"], out, "--max-steps", "3", "--save-steps", "1")
    assert str(e.value) == (f"no space left on device while saving checkpoint step 2 to "
                            f"{out / 'checkpoints' / 'step-000002'}; the previous checkpoint step 1 is intact")
    assert saved_steps(out) == [1] and not glob.glob(str(out / "checkpoints" / ".tmp-*"))
    assert ckpt.verify_checkpoint(str(out / "checkpoints" / "step-000001")) is None
    # the console: one line, non-zero exit
    monkeypatch.setattr("sys.argv", ["ptk", "sft", "--data", data_dir["sft"], "--output-dir", str(out), *COMMON,
                                     "--max-steps", "3", "--save-steps", "1", "--resume"])
    assert ptk() == 1

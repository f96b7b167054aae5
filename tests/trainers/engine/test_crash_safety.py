"""Crash safety of the output folder: a NaN gradient without clipping, a full disk in any writer's words, the models
in the run identity, --resume into another run's folder, a rollback to an earlier checkpoint, two runs on one
folder, a crash between the two renames of a re-saved checkpoint, and a step that fails."""

import glob
import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

from ptkernels.trainers.engine import checkpoint as ckpt
from ptkernels.trainers.engine import loop
from ptkernels.trainers.engine import resume as resume_mod
from ptkernels.trainers.engine.config import SFTConfig

from .test_loop import assert_same_weights
from .test_runs import saved_steps, sft, steps_logged


def fake_checkpoint(out, step, run_id, name=None):
    """A folder ``list_checkpoints`` takes for a finished checkpoint: trainer_state.pt and a manifest."""
    path = os.path.join(ckpt.checkpoint_dir(str(out)), name or f"step-{step:06d}")
    os.makedirs(path)
    torch.save({"step": step, "run_id": run_id}, os.path.join(path, ckpt.STATE_FILE))
    with open(os.path.join(path, ckpt.MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"run_id": run_id, "step": step, "files": {}}, f)
    return path


def fake_run(out, run_id, steps):
    ckpt.write_run_file(str(out), run_id, "sft")
    return [fake_checkpoint(out, s, run_id) for s in steps]


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


PLENTY, LITTLE = 1 << 40, 1 << 20  # free bytes: far above / below what counts as a nearly full disk


def statvfs_with(free_bytes):
    return lambda path: SimpleNamespace(f_bavail=free_bytes // 4096, f_frsize=4096)


# 1. --max-grad-norm 0 still measures the gradient norm

def test_nan_gradient_without_clipping_stops_before_the_save(data_dir, tmp_path, monkeypatch):
    out, bad = tmp_path / "run", 2  # a NaN in one gradient element at optimizer step 3 (0-based 2); the loss is finite
    real_step, real_accumulate = loop.Trainer.step, loop.Trainer.accumulate

    def step(self, index, stop):
        self.index = index
        return real_step(self, index, stop)

    def accumulate(self, micro, norm):
        result = real_accumulate(self, micro, norm)
        if self.index == bad:
            next(p for p in self.params if p.grad is not None).grad.view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(loop.Trainer, "step", step)
    monkeypatch.setattr(loop.Trainer, "accumulate", accumulate)
    args = ("--max-steps", "4", "--save-steps", "1", "--save-total-limit", "5", "--seed", "1")
    with pytest.raises(FloatingPointError, match=r"gradient norm \(nan\) is not finite at step 3"):
        sft(data_dir["sft"], out, *args, "--max-grad-norm", "0")
    assert saved_steps(out) == [1, 2]  # no checkpoint of the NaN step; the earlier ones kept
    assert not glob.glob(str(out / "checkpoints" / ".tmp-*")) and not (out / "model.safetensors").exists()
    assert ckpt.verify_checkpoint(str(out / "checkpoints" / "step-000002")) is None
    from safetensors.torch import load_file

    assert all(v.isfinite().all() for v in load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
               .values())
    unclipped = metrics(out)
    assert [r["step"] for r in unclipped] == [1, 2]
    # the logged norm is the real one: what clipping with a bound never reached measures (the same steps)
    monkeypatch.undo()
    sft(data_dir["sft"], tmp_path / "clipped", "--max-steps", "2", "--seed", "1", "--max-grad-norm", "1e9")
    clipped = metrics(tmp_path / "clipped")
    for a, b in zip(unclipped, clipped):
        assert a["grad_norm"] > 0 and math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-5), (a, b)


# 2. a full disk in any writer's words; any failed save removes its temporary folder

@pytest.mark.parametrize("text", [
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
    "Error while serializing: IoError(Os { code: 28, kind: StorageFull })",
    "Disk quota exceeded (os error 122)",
])
def test_disk_full_in_safetensors_words(text):
    assert ckpt.is_disk_full(SafetensorError(text))
    assert ckpt.is_disk_full(Exception(text))


def test_disk_full_by_the_free_space_of_the_path(tmp_path, monkeypatch):
    vague = RuntimeError("basic_ios::clear: iostream error")  # torch.save's C++ stream on a full disk
    assert LITTLE < ckpt.LOW_SPACE_BYTES < PLENTY
    monkeypatch.setattr(os, "statvfs", statvfs_with(LITTLE))
    assert not ckpt.is_disk_full(vague)  # no path: only the words count
    assert ckpt.is_disk_full(vague, str(tmp_path))
    assert ckpt.is_disk_full(SafetensorError("Error while serializing: unexpected"), str(tmp_path))
    monkeypatch.setattr(os, "statvfs", statvfs_with(PLENTY))
    assert not ckpt.is_disk_full(vague, str(tmp_path))

    def gone(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(os, "statvfs", gone)
    assert not ckpt.is_disk_full(vague, str(tmp_path / "missing"))


def _failing_save(exc):
    def save_models(models, tokenizer, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"partial")
        raise exc

    return save_models


def _save(out, step):
    return ckpt.save_checkpoint(str(out), step, {}, None, {"run_id": "r1", "step": step}, {}, keep=5)


def test_failed_save_of_any_kind_removes_its_temporary_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    ckpt.write_run_file(str(out), "r1", "sft")
    monkeypatch.setattr(ckpt, "_save_models", lambda models, tokenizer, path: os.makedirs(path, exist_ok=True))
    _save(out, 1)
    monkeypatch.setattr(os, "statvfs", statvfs_with(PLENTY))
    # not a full disk: the writer's own error type goes through unchanged, its partial folder gone
    monkeypatch.setattr(ckpt, "_save_models", _failing_save(SafetensorError("Error while serializing: bad dtype")))
    with pytest.raises(SafetensorError, match="bad dtype"):
        _save(out, 2)
    assert not glob.glob(str(out / "checkpoints" / ".tmp-*")) and saved_steps(out) == [1]
    # safetensors on a full disk: DiskFullError naming the intact previous checkpoint
    monkeypatch.setattr(ckpt, "_save_models", _failing_save(SafetensorError(
        "Error while serializing: IoError(Os { code: 28, kind: StorageFull })")))
    with pytest.raises(ckpt.DiskFullError, match="saving checkpoint step 2 .*the previous checkpoint step 1 is "
                                                 "intact"):
        _save(out, 2)
    # vague words with the disk nearly full (measured before the partial folder is removed): a full disk too
    monkeypatch.setattr(os, "statvfs", statvfs_with(LITTLE))
    monkeypatch.setattr(ckpt, "_save_models", _failing_save(ValueError("unexpected pos 4096")))
    with pytest.raises(ckpt.DiskFullError):
        _save(out, 2)
    assert not glob.glob(str(out / "checkpoints" / ".tmp-*")) and saved_steps(out) == [1]
    assert ckpt.verify_checkpoint(str(out / "checkpoints" / "step-000001")) is None
    # the final model likewise
    with pytest.raises(ckpt.DiskFullError, match="final model"):
        ckpt.save_final(str(out), {}, None, {})
    monkeypatch.setattr(os, "statvfs", statvfs_with(PLENTY))
    with pytest.raises(ValueError, match="unexpected pos"):
        ckpt.save_final(str(out), {}, None, {})
    assert not (out / ".final-tmp").exists()


# 3. the models belong to the run identity

def _weights(folder, content: bytes):
    os.makedirs(folder, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(content)
    return str(folder)


def _identity(model, data, **kw):
    return resume_mod.identity(SFTConfig(model=model, data=data, **kw), 1)


def test_a_changed_model_refuses_to_resume_unless_allowed(data_dir, tmp_path):
    base = _weights(tmp_path / "base", os.urandom(3 << 20))
    saved = _identity(base, data_dir["sft"])
    assert saved["model"] == {"path": base, "sha256": resume_mod.model_fingerprint(base)}
    assert resume_mod.differences(saved, _identity(base, data_dir["sft"])) == []
    # the same weights at another path: the same run
    copy = shutil.copytree(base, tmp_path / "copy")
    assert resume_mod.differences(saved, _identity(str(copy), data_dir["sft"])) == []
    # another model: refused, naming --model; allowed with a warning
    other = _weights(tmp_path / "other", os.urandom(3 << 20))
    for now in (_identity(other, data_dir["sft"]), _identity("tiny", data_dir["sft"])):
        (diff,) = resume_mod.differences(saved, now)
        assert diff.startswith("--model: ") and " in the checkpoint, " in diff
        with pytest.raises(ValueError, match="--model: .*--allow-config-change"):
            resume_mod.check_identity(saved, now, "ckpt", allow=False)
        said = []
        resume_mod.check_identity(saved, now, "ckpt", allow=True, report=said.append)
        assert len(said) == 1 and "--model" in said[0] and "warning" in said[0]
    # the same folder with changed weights (its last bytes): the content changed
    with open(tmp_path / "base" / "model.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert resume_mod.differences(saved, _identity(base, data_dir["sft"])) == [
        f"--model: the content of {base} changed since the checkpoint"]
    # a preset or Hub id by its name
    assert resume_mod.differences(_identity("tiny", data_dir["sft"]), _identity("tiny", data_dir["sft"])) == []


def test_reference_and_reward_models_belong_to_the_identity(tmp_path):
    a, b = _weights(tmp_path / "a", b"a" * 100), _weights(tmp_path / "b", b"b" * 100)
    cfg = SimpleNamespace(batch_size=4, grad_accum=1, model="tiny", ref_model=a, reward_model="")
    saved = resume_mod.identity(cfg, 1)
    assert "reward_model" not in saved and saved["ref_model"]["path"] == a
    cfg.ref_model = b
    (diff,) = resume_mod.differences(saved, resume_mod.identity(cfg, 1))
    assert diff.startswith("--ref-model: ")
    cfg.ref_model, cfg.reward_model = a, b
    (diff,) = resume_mod.differences(saved, resume_mod.identity(cfg, 1))
    assert diff.startswith("--reward-model: None in the checkpoint")


def test_a_checkpoint_from_before_models_were_in_the_identity_still_resumes(data_dir, tmp_path):
    now = _identity(_weights(tmp_path / "base", b"w" * 100), data_dir["sft"])
    old = {k: v for k, v in now.items() if k not in resume_mod.MODEL_OPTIONS}
    assert "model" in now and "model" not in old
    assert resume_mod.differences(old, now) == []
    resume_mod.check_identity(old, now, "ckpt", allow=False)
    # any other change is still found
    with pytest.raises(ValueError, match="--seed: 0 in the checkpoint, 5 now"):
        resume_mod.check_identity(old, {**now, "seed": 5}, "ckpt", allow=False)


# 4. --resume PATH into a folder holding another run

def test_resume_path_into_another_runs_folder_is_refused_unless_overwrite(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (ckpt_a,) = fake_run(a, "run-a", [1])
    fake_run(b, "run-b", [1, 2])
    with pytest.raises(FileExistsError, match=r"--resume .*holds another run \(run id run-b\).*--overwrite"):
        ckpt.preflight(str(b), ckpt_a, overwrite=False)
    ckpt.preflight(str(b), ckpt_a, overwrite=True)
    ckpt.preflight(str(tmp_path / "empty"), ckpt_a, overwrite=False)  # a new folder
    ckpt.preflight(str(a), ckpt_a, overwrite=False)  # the run's own folder (e.g. a rollback)
    # --overwrite: the checkpoint's run id takes the folder, the other run moved aside until discarded
    assert ckpt.start_new_run(str(b), "sft", run_id="run-a") == "run-a"
    assert ckpt.current_run_id(str(b)) == "run-a" and ckpt.list_checkpoints(str(b)) == []
    aside = b / (ckpt.ASIDE_PREFIX + "run-a")
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(str(aside), run_id=None)] == [1, 2]


def _two_runs(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    sft(data, a, "--max-steps", "2", "--save-steps", "1")
    sft(data, b, "--max-steps", "2", "--save-steps", "1", "--seed", "1")
    return a, b, str(a / "checkpoints" / "step-000001")


def test_resume_path_into_another_run_is_refused_end_to_end(data_dir, tmp_path):
    a, b, start = _two_runs(data_dir["sft"], tmp_path)
    with pytest.raises(FileExistsError, match="holds another run.*--overwrite to move that run aside"):
        sft(data_dir["sft"], b, "--max-steps", "3", "--resume", start)
    assert ckpt.current_run_id(str(b)) != ckpt.current_run_id(str(a)) and saved_steps(b) == [1, 2]
    assert steps_logged(b) == [1, 2]


def test_resume_path_into_another_run_with_overwrite_end_to_end(data_dir, tmp_path):
    a, b, start = _two_runs(data_dir["sft"], tmp_path)
    sft(data_dir["sft"], b, "--max-steps", "3", "--save-steps", "1", "--resume", start, "--overwrite")
    assert ckpt.current_run_id(str(b)) == ckpt.current_run_id(str(a))
    assert saved_steps(b) == [2, 3] and steps_logged(b) == [2, 3]  # none of b's own run left
    assert not glob.glob(str(b / ".overwritten-*"))
    assert saved_steps(a) == [1, 2]  # the source untouched


# 5. a rollback sets the later checkpoints aside

def test_rollback_sets_the_later_checkpoints_aside(tmp_path):
    out = tmp_path / "run"
    paths = fake_run(out, "r1", [1, 2, 3])
    other = fake_checkpoint(out, 4, "another-run")  # not this run's: left where it is
    assert ckpt.set_aside_later_checkpoints(str(out), paths[-1]) is None  # the newest: nothing later
    aside = ckpt.set_aside_later_checkpoints(str(out), paths[0])
    assert os.path.basename(aside).startswith(".rolled-back-000001-")
    assert sorted(os.listdir(aside)) == ["step-000002", "step-000003"]
    assert os.path.exists(os.path.join(aside, "step-000003", ckpt.STATE_FILE))
    assert ckpt.list_checkpoints(str(out)) == [paths[0]] and os.path.isdir(other)
    assert ckpt.set_aside_later_checkpoints(str(out), paths[0]) is None
    assert ckpt.resolve_resume(str(out), "latest") == paths[0]


def test_rollback_end_to_end_then_resume_latest_continues_the_new_branch(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--save-steps", "1", "--save-total-limit", "5")
    sft(data_dir["sft"], out, "--max-steps", "3", *common)
    capsys.readouterr()
    sft(data_dir["sft"], out, "--max-steps", "2", "--lr", "1e-3", *common, "--resume",
        str(out / "checkpoints" / "step-000001"))
    assert "the later ones moved to" in capsys.readouterr().out
    (aside,) = glob.glob(str(out / ".rolled-back-000001-*"))
    assert sorted(os.listdir(aside)) == ["step-000002", "step-000003"]
    assert saved_steps(out) == [1, 2]
    sft(data_dir["sft"], out, "--max-steps", "3", "--lr", "1e-3", *common, "--resume")
    assert "resuming from step 2" in capsys.readouterr().out


# 6. one run per output folder

def test_second_lock_on_the_same_folder_fails_until_the_first_is_closed(tmp_path):
    out = str(tmp_path / "run")
    fd = ckpt.lock_output_dir(out)
    try:
        with pytest.raises(RuntimeError, match=rf"is in use by another run \(process {os.getpid()}\)"):
            ckpt.lock_output_dir(out)
    finally:
        os.close(fd)
    os.close(ckpt.lock_output_dir(out))


def test_a_run_on_a_locked_folder_fails_at_once_and_runs_release_the_lock(data_dir, tmp_path):
    out = tmp_path / "run"
    fd = ckpt.lock_output_dir(str(out))
    try:
        with pytest.raises(RuntimeError, match="in use by another run"):
            sft(data_dir["sft"], out, "--max-steps", "1")
    finally:
        os.close(fd)
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    sft(data_dir["sft"], out, "--max-steps", "1")
    os.close(ckpt.lock_output_dir(str(out)))  # released by a finished run
    with pytest.raises(ValueError, match="--seed"):
        sft(data_dir["sft"], out, "--max-steps", "2", "--resume", "--seed", "5")  # start() fails
    os.close(ckpt.lock_output_dir(str(out)))  # released by a run whose start failed


# 7. a crash between the two renames of a re-saved step

def test_replaced_checkpoint_is_recovered_when_its_successor_is_missing(tmp_path):
    out = tmp_path / "run"
    fake_run(out, "r1", [1])
    fake_checkpoint(out, 2, "r1", name=ckpt.REPLACED_PREFIX + "step-000002")
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(str(out))] == [1, 2]
    root = ckpt.checkpoint_dir(str(out))
    assert sorted(os.listdir(root)) == ["step-000001", "step-000002"]
    # both there (a crash before the old one was deleted): the new one stays, the old one is not listed
    fake_checkpoint(out, 1, "r1", name=ckpt.REPLACED_PREFIX + "step-000001")
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(str(out))] == [1, 2]
    assert ckpt.REPLACED_PREFIX + "step-000001" in os.listdir(root)


class Killed(BaseException):
    """kill -9: nothing catches it, no clean-up runs."""


def test_resave_crash_between_the_renames_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    ckpt.write_run_file(str(out), "r1", "sft")
    monkeypatch.setattr(ckpt, "_save_models", lambda models, tokenizer, path: os.makedirs(path, exist_ok=True))
    first = _save(out, 1)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(src).startswith(".tmp-step-"):
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        _save(out, 1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert ckpt.list_checkpoints(str(out)) == [first]
    assert ckpt.load_trainer_state(first)["step"] == 1
    assert not os.path.exists(os.path.join(ckpt.checkpoint_dir(str(out)), ckpt.REPLACED_PREFIX + "step-000001"))
    # an uninterrupted re-save replaces it whole and leaves nothing aside
    assert _save(out, 1) == first
    assert sorted(os.listdir(ckpt.checkpoint_dir(str(out)))) == ["step-000001"]


# 8. a step that fails (a reward function that raised, a generation error) keeps the steps done

def test_a_failed_step_saves_the_steps_done_and_resumes_exactly(data_dir, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    sft(data_dir["sft"], straight, "--max-steps", "5", "--seed", "1")
    out, real_accumulate = tmp_path / "run", loop.Trainer.accumulate

    def accumulate(self, micro, norm):  # step 4 (0-based 3) fails before its update, as a reward function would
        if self.optimizer.state and self.scheduler.last_epoch == 3:
            raise RuntimeError("the reward function raised")
        return real_accumulate(self, micro, norm)

    monkeypatch.setattr(loop.Trainer, "accumulate", accumulate)
    with pytest.raises(RuntimeError, match="the reward function raised"):
        sft(data_dir["sft"], out, "--max-steps", "5", "--seed", "1")  # --save-steps 500: no checkpoint yet
    assert "step 4 failed (RuntimeError); the 3 steps done are saved" in capsys.readouterr().out
    assert saved_steps(out) == [3] and steps_logged(out) == [1, 2, 3]
    monkeypatch.undo()
    sft(data_dir["sft"], out, "--max-steps", "5", "--seed", "1", "--resume")
    assert_same_weights(straight, out)  # the RNGs of the failed step's start were saved with it
    assert steps_logged(out) == [1, 2, 3, 4, 5]


def test_no_save_after_a_failure_inside_the_update_or_before_the_first_step(data_dir, tmp_path, monkeypatch):
    out, real_step = tmp_path / "run", torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # the update itself fails at step 3: the weights are neither step 2's nor 3's
        if self.state and next(iter(self.state.values()))["step"] >= 2:
            raise RuntimeError("failed inside the update")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(RuntimeError, match="inside the update"):
        sft(data_dir["sft"], out, "--max-steps", "5", "--seed", "1")
    assert saved_steps(out) == [] and steps_logged(out) == [1, 2]
    monkeypatch.undo()
    # a run that failed before its first step leaves nothing worth keeping: the next run may use the folder
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(loop.Trainer, "accumulate", lambda *a: (_ for _ in ()).throw(RuntimeError("at once")))
    with pytest.raises(RuntimeError, match="at once"):
        sft(data_dir["sft"], fresh, "--max-steps", "2")
    monkeypatch.undo()
    assert saved_steps(fresh) == [] and not (fresh / "metrics.jsonl").exists()
    sft(data_dir["sft"], fresh, "--max-steps", "2")  # no --overwrite needed
    assert saved_steps(fresh) == [2]

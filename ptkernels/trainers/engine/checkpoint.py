"""Checkpoints and final outputs, written so that a good one is never replaced by a bad or partial one.

A checkpoint is a Hugging Face model folder (``save_pretrained``, safetensors, tokenizer) plus
``trainer_state.pt`` (optimizer, scheduler, RNG states, step = the data position) in
``output_dir/checkpoints/step-NNNNNN``. It is written into a temporary folder beside it and renamed into place,
so a crash leaves either the old set of checkpoints or the new one. The final model goes to ``output_dir``
itself: written into ``output_dir/.final-tmp`` first, then each file renamed over the old one.

One run identity: a fresh run writes ``output_dir/run.json`` with a new run id, and every checkpoint it writes
carries that id (in ``trainer_state.pt`` and in ``checkpoint.json``, the manifest written last, which lists every
file's size). Pruning and ``--resume`` only ever see the current run's complete checkpoints. ``--overwrite`` moves
the earlier run's ``checkpoints/`` and ``metrics.jsonl`` aside into ``.overwritten-RUNID/`` and deletes them only
once the new run has written its first complete checkpoint (or finished): a new run stopped before that leaves the
old one's checkpoints and metrics where they can be recovered.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import shutil
import uuid

import numpy as np
import torch
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from .. import adapters
from ..modeling import save_pretrained

STATE_FILE = "trainer_state.pt"
LOCK_FILE = ".lock"
ROLLED_BACK_PREFIX = ".rolled-back-"
MANIFEST = "checkpoint.json"
RUN_FILE = "run.json"
ASIDE_PREFIX = ".overwritten-"
REPLACED_PREFIX = ".replaced-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def current_run_id(output_dir: str) -> str | None:
    """The id of the run ``output_dir`` belongs to (None for a folder without ``run.json``: no run, or a run
    written before run ids existed)."""
    try:
        with open(os.path.join(output_dir, RUN_FILE), encoding="utf-8") as f:
            return json.load(f)["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_run_file(output_dir: str, run_id: str, stage: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    _atomic_write(os.path.join(output_dir, RUN_FILE), json.dumps({"run_id": run_id, "stage": stage}) + "\n")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _manifest(path: str) -> dict | None:
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def checkpoint_run_id(path: str) -> str | None:
    m = _manifest(path)
    return m.get("run_id") if isinstance(m, dict) else None


def step_of(path: str) -> int:
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else -1


def list_checkpoints(output_dir: str, run_id: str | None = "current") -> list[str]:
    """The current run's finished checkpoints, oldest first (temporary folders are not listed). ``run_id``:
    'current' (the id in ``run.json``; a folder without one lists every checkpoint), an id, or None (all)."""
    root = checkpoint_dir(output_dir)
    if not os.path.isdir(root):
        return []
    _recover_replaced(root)
    if run_id == "current":
        run_id = current_run_id(output_dir)
    found = [(int(m.group(1)), n) for n in os.listdir(root) if (m := _STEP_DIR.match(n))
             and os.path.exists(os.path.join(root, n, STATE_FILE))]
    paths = [os.path.join(root, n) for _, n in sorted(found)]
    if run_id is None:
        return paths
    return [p for p in paths if checkpoint_run_id(p) in (run_id, None)]


def _recover_replaced(root: str) -> None:
    """A checkpoint renamed aside by ``save_checkpoint`` whose successor never took its name (a crash between the
    two renames) goes back under its own name."""
    for name in os.listdir(root):
        if name.startswith(REPLACED_PREFIX) and _STEP_DIR.match(name[len(REPLACED_PREFIX):]):
            final = os.path.join(root, name[len(REPLACED_PREFIX):])
            if not os.path.exists(final):
                try:
                    os.replace(os.path.join(root, name), final)
                except OSError:
                    pass


def verify_checkpoint(path: str) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from (a file missing, cut short or unreadable), or None."""
    m = _manifest(path)
    if m is not None:
        for rel, size in m.get("files", {}).items():
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                return f"{rel} is missing"
            if os.path.getsize(full) != size:
                return f"{rel} has {os.path.getsize(full)} bytes, the checkpoint wrote {size}"
    try:
        from safetensors import safe_open

        load_trainer_state(path)
        for root, _, files in os.walk(path):
            for name in files:
                if name.endswith(".safetensors"):
                    with safe_open(os.path.join(root, name), framework="pt") as f:
                        for key in f.keys():
                            f.get_slice(key)
    except Exception as e:  # noqa: BLE001 - any failure to read means the checkpoint is damaged
        return f"unreadable ({type(e).__name__}: {str(e)[:200]})"
    return None


def resolve_resume(output_dir: str, resume: str, report=print) -> str | None:
    """The checkpoint folder ``--resume`` names ('latest': the current run's newest complete one; or a path), or
    None when not resuming. A damaged latest checkpoint is reported and the previous complete one used."""
    if not resume:
        return None
    if resume != "latest":
        if not os.path.exists(os.path.join(resume, STATE_FILE)):
            raise FileNotFoundError(f"--resume: {resume!r} is not a checkpoint folder (no {STATE_FILE})")
        problem = verify_checkpoint(resume)
        if problem:
            raise ValueError(f"--resume: checkpoint {resume} is damaged: {problem}")
        return resume
    found = list_checkpoints(output_dir)
    if not found:
        raise FileNotFoundError(no_checkpoint_message(output_dir))
    for path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        report(f"ptk: warning: checkpoint {path} is damaged ({problem}); trying the previous one")
    raise ValueError(f"--resume: every checkpoint in {checkpoint_dir(output_dir)} is damaged; start over with "
                     f"--overwrite")


def no_checkpoint_message(output_dir: str) -> str:
    if holds_earlier_run(output_dir):
        return (f"--resume: {output_dir} holds a run that stopped before its first checkpoint: there is nothing to "
                f"resume; start over with --overwrite")
    return f"--resume: no checkpoint in {checkpoint_dir(output_dir)}: nothing to resume (run without --resume)"


def earlier_run_message(output_dir: str) -> str:
    """What to do about an earlier run in ``output_dir``: advice that fits what it holds."""
    done = os.path.exists(os.path.join(output_dir, "model.safetensors"))
    if list_checkpoints(output_dir):
        last = step_of(list_checkpoints(output_dir)[-1])
        what = "a finished run" if done else f"an unfinished run (last checkpoint: step {last})"
        more = " (e.g. with a larger --max-steps)" if done else ""
        return (f"--output-dir {output_dir!r} holds {what}: pass --resume to continue it{more} or --overwrite to "
                f"start over (its model stays until the new one is saved)")
    what = "a finished run" if done else "a run that stopped before its first checkpoint (nothing to resume)"
    return (f"--output-dir {output_dir!r} holds {what}: pass --overwrite to start over, or choose another "
            f"--output-dir")


def lock_output_dir(output_dir: str) -> int:
    """An exclusive lock on ``output_dir`` for this process (main process only; released when the descriptor
    closes, at the latest when the process ends): two runs writing one folder would interleave their metrics and
    delete each other's temporary checkpoints."""
    os.makedirs(output_dir, exist_ok=True)
    fd = os.open(os.path.join(output_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(f"--output-dir {output_dir!r} is in use by another run (process {holder}); wait for it "
                           f"to end or choose another --output-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def preflight(output_dir: str, resume: str, overwrite: bool) -> None:
    """The output-folder checks, before anything heavy: raise with the right advice when the run cannot start."""
    if resume == "latest":
        if not list_checkpoints(output_dir):
            raise FileNotFoundError(no_checkpoint_message(output_dir))
    elif resume:
        if not os.path.exists(os.path.join(resume, STATE_FILE)):
            raise FileNotFoundError(f"--resume: {resume!r} is not a checkpoint folder (no {STATE_FILE})")
        here = current_run_id(output_dir)
        if not overwrite and holds_earlier_run(output_dir) and here != checkpoint_run_id(resume):
            raise FileExistsError(f"--resume {resume!r}: --output-dir {output_dir!r} holds another run (run id "
                                  f"{here}); continuing this checkpoint there would mix the two: choose another "
                                  f"--output-dir, or pass --overwrite to move that run aside")
    elif holds_earlier_run(output_dir) and not overwrite:
        raise FileExistsError(earlier_run_message(output_dir))


def start_new_run(output_dir: str, stage: str, run_id: str | None = None) -> str:
    """A fresh run in ``output_dir`` (main process only): a new run id (or ``run_id``: a checkpoint's from
    another folder, resumed here with --overwrite) written first (so whatever of an earlier run is still here is
    no longer the current run's), then the earlier run's checkpoints and metrics moved aside until
    ``discard_overwritten`` (after the new run's first complete checkpoint)."""
    run_id = run_id or new_run_id()
    earlier = holds_earlier_run(output_dir)
    write_run_file(output_dir, run_id, stage)
    if earlier:
        aside = os.path.join(output_dir, ASIDE_PREFIX + run_id)
        os.makedirs(aside, exist_ok=True)
        for name in ("checkpoints", "metrics.jsonl", "tensorboard"):
            if os.path.exists(os.path.join(output_dir, name)):
                os.replace(os.path.join(output_dir, name), os.path.join(aside, name))
    return run_id


def set_aside_later_checkpoints(output_dir: str, resumed: str) -> str | None:
    """When a run resumes from a checkpoint of its own that is not its newest (a rollback), its later checkpoints
    belong to the abandoned branch: they move to ``output_dir/.rolled-back-STEP-ID/`` (kept, never deleted
    here), so that the next ``--resume`` continues the new branch. Returns that folder, or None."""
    step = step_of(resumed)
    later = [p for p in list_checkpoints(output_dir) if step_of(p) > step]
    if step < 0 or not later:
        return None
    aside = os.path.join(output_dir, f"{ROLLED_BACK_PREFIX}{step:06d}-{new_run_id()}")
    os.makedirs(aside)
    for path in later:
        os.replace(path, os.path.join(aside, os.path.basename(path)))
    return aside


def discard_overwritten(output_dir: str) -> None:
    """Deletes the runs ``--overwrite`` moved aside: the new run has a complete checkpoint or model now."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(ASIDE_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def rng_state() -> dict:
    # the legacy global numpy RNG is what user code and libraries draw from, so it is the one to restore
    state = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_state(module, optimizer, trainable_only: bool = False) -> tuple[dict, dict]:
    """Full (unsharded, CPU) state dicts of the training module and its optimizer; a collective under FSDP2:
    every rank calls it. ``trainable_only`` (LoRA: the frozen base is not saved) leaves the frozen weights out."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    if trainable_only and _quantized_base(module) and not _sharded(module):
        # QLoRA: DCP resolves every key of the full state dict as an attribute before it drops the frozen ones, and
        # bitsandbytes' 8-bit layers hold entries that are not ('SCB'); unsharded, the trainable tensors are read
        # directly
        model_state = {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters() if p.requires_grad}
    else:
        model_state = get_model_state_dict(module, options=options)
    return model_state, get_optimizer_state_dict(module, optimizer, options=_FULL)


def _sharded(module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _quantized_base(module) -> bool:
    return any(getattr(m, "is_loaded_in_8bit", False) or getattr(m, "is_loaded_in_4bit", False)
               for m in module.modules())


def substate(state: dict, attr: str) -> dict:
    """The entries of submodule ``attr`` in a module's state dict, with its prefix removed."""
    prefix = attr + "."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _save_models(models: dict, tokenizer, path: str) -> None:
    """``models``: {sub-folder ('' = path itself): (model, state dict)}, each saved in Hugging Face format."""
    for folder, (model, state) in models.items():
        save_pretrained(model, tokenizer, os.path.join(path, folder) if folder else path, state_dict=state)


class DiskFullError(OSError):
    """No space left while writing a checkpoint or the final model; what was there before is intact."""

    def __str__(self) -> str:
        return str(self.strerror)


_SPACE_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
# Below this much free space a failed write is taken for a full disk whatever the writer said: torch.save's C++
# stream reports "basic_ios::clear: iostream error" or "unexpected pos", safetensors a SafetensorError.
LOW_SPACE_BYTES = 64 << 20


def is_disk_full(exc: BaseException, path: str | None = None) -> bool:
    """ENOSPC / EDQUOT in any writer's words, or (``path`` given) a write failure with the file system at ``path``
    nearly full. Call it before removing what the failed write left, which frees the space."""
    if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
        return True
    text = str(exc)
    if "No space left" in text or "StorageFull" in text or "Disk quota exceeded" in text or "write failed" in text:
        return True
    if path is None:
        return False
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE_BYTES


def save_checkpoint(output_dir: str, step: int, models: dict, tokenizer, trainer_state: dict, config: dict,
                    keep: int) -> str:
    """Writes checkpoint ``step`` atomically (main process only) and prunes the current run's oldest beyond
    ``keep``. The manifest (``checkpoint.json``: run id, step, every file's size) is written last: a folder
    without a matching one is not a complete checkpoint. A full disk raises ``DiskFullError`` and leaves the
    earlier checkpoints as they were."""
    root = checkpoint_dir(output_dir)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".tmp-step-{step:06d}")
    previous = list_checkpoints(output_dir)
    try:  # any failure (safetensors raises its own error type) removes the partial folder
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        _save_models(models, tokenizer, tmp)
        torch.save(trainer_state, os.path.join(tmp, STATE_FILE))
        _write_yaml(os.path.join(tmp, "run_config.yaml"), config)
        files = {os.path.relpath(os.path.join(r, n), tmp): os.path.getsize(os.path.join(r, n))
                 for r, _, names in os.walk(tmp) for n in names}
        _atomic_write(os.path.join(tmp, MANIFEST), json.dumps(
            {"run_id": trainer_state.get("run_id"), "step": step, "files": files}, indent=1) + "\n")
        _fsync_dir(tmp)
    except Exception as e:
        full = is_disk_full(e, root if os.path.isdir(root) else output_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        kept = [p for p in previous if p != final]
        intact = f"the previous checkpoint step {step_of(kept[-1])} is intact" if kept else "no earlier checkpoint"
        raise DiskFullError(errno.ENOSPC, f"no space left on device while saving checkpoint step {step} to "
                                          f"{final}; {intact}") from None
    if os.path.exists(final):
        # The same step written again (a resumed run): the old folder is renamed aside before the new one takes
        # its name, so a crash in between leaves one of the two under a name list_checkpoints recovers.
        replaced = os.path.join(root, REPLACED_PREFIX + os.path.basename(final))
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: str) -> None:
    """The checkpoint's files on disk before the rename makes it visible (a power cut keeps them whole)."""
    for root, _, names in os.walk(path):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                os.fsync(f.fileno())


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_trainer_state(path: str) -> dict:
    # weights_only=False: the file holds RNG states (numpy arrays, tuples) written by this trainer itself
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def load_model_weights(model, path: str) -> None:
    """The checkpoint's weights into ``model`` (before any wrapping); tied weights are re-tied. A LoRA model
    loads its adapter (the checkpoint holds nothing else)."""
    from safetensors.torch import load_file

    if adapters.is_adapted(model):
        adapters.load_adapter_weights(model, path)
        return

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()


def load_optimizer_state(module, optimizer, state: dict) -> None:
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_final(output_dir: str, models: dict, tokenizer, config: dict) -> None:
    """The trained model(s) into ``output_dir``, each file renamed over its old version only once all are
    written."""
    tmp = os.path.join(output_dir, ".final-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save_models(models, tokenizer, tmp)
        _write_yaml(os.path.join(tmp, "run_config.yaml"), config)
    except Exception as e:
        full = is_disk_full(e, output_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        raise DiskFullError(errno.ENOSPC, f"no space left on device while saving the final model to {output_dir}; "
                                          f"the last checkpoint is intact (continue with --resume)") from None
    for root, _, files in os.walk(tmp):
        target = os.path.join(output_dir, os.path.relpath(root, tmp))
        os.makedirs(target, exist_ok=True)
        for name in files:
            os.replace(os.path.join(root, name), os.path.join(target, name))
    shutil.rmtree(tmp)


def _write_yaml(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def holds_earlier_run(output_dir: str) -> bool:
    """Whether ``output_dir`` holds something of an earlier run worth keeping: metrics, checkpoints or a model.
    A run that stopped before its first step (bad data, a reward function that raised at once) leaves only its
    run.json: nothing to lose, so the next run may start there without --overwrite."""
    return any(os.path.exists(os.path.join(output_dir, n)) for n in ("metrics.jsonl", "checkpoints", "config.json"))

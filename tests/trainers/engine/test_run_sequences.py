"""Property: a seeded random sequence of {run, Ctrl-C, SIGTERM, kill -9 (mid-step or mid-save), --resume,
--overwrite} ends with the same final model as an uninterrupted run of the last started configuration.

In-process, so that many interruptions fit in a few seconds: a signal is raised right after a step, and kill -9 is
an exception no handler catches (``Killed`` is a BaseException) thrown at the k-th write of a checkpoint save or at
a step, so no clean-up code runs, as with a real kill -9 (the real one under torchrun is in test_preemption.py).
``PTK_SEQUENCE_SEEDS=0,1,2,...`` runs more sequences.
"""

import os
import random
import signal

import pytest

from ptkernels.cli import main as ptk
from ptkernels.trainers.engine import checkpoint as ckpt
from ptkernels.trainers.engine import loop

from .test_loop import assert_same_weights

COMMON = ["--model", "tiny", "--no-progress", "--batch-size", "4", "--max-length", "40", "--lr", "2e-3",
          "--max-steps", "4", "--save-steps", "1"]
CONFIGS = {"a": ["--seed", "0"], "b": ["--seed", "1"]}
SEEDS = [int(s) for s in os.environ.get("PTK_SEQUENCE_SEEDS", "0").split(",")]
WRITES = ("_save_models", "_write_yaml", "_atomic_write", "_fsync_dir")


class Killed(BaseException):
    """kill -9: nothing catches it, no clean-up runs."""


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    for name, args in CONFIGS.items():
        ptk(["sft", "--data", data_dir["sft"], "--output-dir", str(root / name), *COMMON, *args])
    return root


KINDS = ("ctrl-c", "sigterm", "kill-step", "kill-save")


def interrupt(monkeypatch, rng, kind):
    """Arms interruption ``kind`` at a random step or write for the next invocation; returns its name."""
    at = rng.randint(1, 3)
    if kind in ("ctrl-c", "sigterm", "kill-step"):
        original = loop.Trainer.step

        def step(self, index, stop):
            if kind == "kill-step" and index + 1 == at:
                raise Killed
            out = original(self, index, stop)
            if index + 1 == at and kind != "kill-step":
                signal.raise_signal(signal.SIGINT if kind == "ctrl-c" else signal.SIGTERM)
            return out

        monkeypatch.setattr(loop.Trainer, "step", step)
    elif kind == "kill-save":
        calls, target, after = [0], rng.randint(1, 3 * len(WRITES)), rng.random() < 0.5
        for name in WRITES:
            real = getattr(ckpt, name)

            def write(*a, _real=real, **k):
                calls[0] += 1
                if calls[0] == target and not after:
                    raise Killed
                out = _real(*a, **k)
                if calls[0] == target:
                    raise Killed
                return out

            monkeypatch.setattr(ckpt, name, write)
    return f"{kind}@{at}"


@pytest.mark.parametrize("seed", SEEDS)
def test_random_sequence_ends_like_an_uninterrupted_run(data_dir, tmp_path, straight, seed):
    rng = random.Random(seed)
    out = tmp_path / "out"
    config, history, done = None, [], False
    kinds = [*rng.sample(KINDS, len(KINDS)), "none"]  # every interruption once, in a random order, then none
    for kind in kinds:
        mp = pytest.MonkeyPatch()
        kind = interrupt(mp, rng, kind) if kind != "none" else kind
        if config is not None and ckpt.list_checkpoints(str(out)) and rng.random() < 0.5:
            how = ["--resume"]
        else:
            config = rng.choice(sorted(CONFIGS))
            how = ["--overwrite"] if ckpt.holds_earlier_run(str(out)) else []
        history.append(f"{'resume' if how == ['--resume'] else 'run ' + config}+{kind}")
        try:
            rc = ptk(["sft", "--data", data_dir["sft"], "--output-dir", str(out), *COMMON, *CONFIGS[config], *how])
            done = rc == 0
        except Killed:
            done = False
        finally:
            mp.undo()
        if done:
            break
    assert done, history
    print(history)
    assert_same_weights(straight / config, out)

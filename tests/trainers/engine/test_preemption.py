"""Under torchrun with 2 processes: SIGTERM to the launcher (what SLURM and Kubernetes send) saves a checkpoint on
every process and exits; kill -9 at a random point of a checkpoint save loses nothing. Both resume bit-exactly."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from .test_distributed import _free_port
from .test_loop import assert_same_weights

ARGS = ["--model", "tiny", "--no-progress", "--max-length", "40", "--lr", "2e-3", "--batch-size", "2",
        "--max-steps", "6", "--save-steps", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def torchrun_cmd(data, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
            "-m", "ptkernels.cli", "sft", "--data", data, "--output-dir", str(out), *ARGS, *extra]


def run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    run(torchrun_cmd(data_dir["sft"], out))
    return out


@pytest.mark.slow
def test_sigterm_then_kill_9_mid_save_under_torchrun_resume_exactly(data_dir, tmp_path, reference):
    out = tmp_path / "out"
    # 1. SIGTERM to the launcher: torchrun passes it on, both workers finish the step, save and exit
    proc = subprocess.Popen(torchrun_cmd(data_dir["sft"], out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    assert wait_for(lambda: (out / "checkpoints" / "step-000001").exists(), proc), "the run never saved step 1"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("interrupted (SIGTERM); checkpoint saved at step") == 2, err[-3000:]  # each process stopped
    assert not (out / "model.safetensors").exists()
    stopped = max(int(n[5:]) for n in os.listdir(out / "checkpoints") if n.startswith("step-"))
    assert stopped < 6

    # 2. resumed, then kill -9 of the launcher and both workers at a random moment of a later checkpoint's save
    rng = random.Random(int(os.environ.get("PTK_KILL_SEED", "0")))
    proc = subprocess.Popen(torchrun_cmd(data_dir["sft"], out, "--resume"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    root = out / "checkpoints"
    later = [f".tmp-step-{s:06d}" for s in range(stopped + 1, 7)]
    assert wait_for(lambda: any(n in later for n in os.listdir(root)), proc), "no later save seen"
    time.sleep(rng.uniform(0, 0.05))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    # 3. resumed again: the same weights as the uninterrupted run, every step logged once
    run(torchrun_cmd(data_dir["sft"], out, "--resume"))
    assert_same_weights(reference, out)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]

"""torchrun with 2 processes (gloo, CPU) takes the same steps as 1 process with the same global batch."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ptkernels.cli import main as ptk

COMMON = ["--model", "tiny", "--no-progress", "--max-length", "48", "--lr", "2e-3", "--max-steps", "3"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           "-m", "ptkernels.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, even beside a GPU
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]


def assert_close(a, b, atol=5e-5):
    """Equal up to reduction-order noise (Adam turns 1e-7 gradient noise into ~1e-5 on near-zero gradients);
    a normalization error would show at the scale of the learning rate (2e-3)."""
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """1 process, batch 4 x 2 accumulation steps = the global batch of 2 processes x 2 x 2."""
    out = tmp_path_factory.mktemp("single")
    ptk(["sft", "--data", data_dir["sft"], "--output-dir", str(out / "sft"), "--batch-size", "4", "--grad-accum", "2",
         *COMMON])
    ptk(["dpo", "--data", data_dir["pref"], "--output-dir", str(out / "dpo"), "--batch-size", "4", *COMMON])
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sft_two_processes_match_one(data_dir, tmp_path, single, mode):
    torchrun(["sft", "--data", data_dir["sft"], "--output-dir", str(tmp_path / "two"), "--batch-size", "2",
              "--grad-accum", "2", "--distributed", mode, *COMMON])
    assert_close(single / "sft", tmp_path / "two")
    # the checkpoint of a sharded run is a full, loadable Hugging Face folder
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "checkpoints" / "step-000003")


def test_dpo_two_processes_match_one(data_dir, tmp_path, single):
    torchrun(["dpo", "--data", data_dir["pref"], "--output-dir", str(tmp_path / "two"), "--batch-size", "2",
              *COMMON])
    assert_close(single / "dpo", tmp_path / "two")


RANK_REWARDS = '''
import os

RANK = int(os.environ.get("RANK", "0"))


def a_on_rank0(completions, **kwargs):
    return [0.3 if RANK == 0 else None for _ in completions]


def b_on_rank1(completions, **kwargs):
    return [0.7 if RANK == 1 else None for _ in completions]


def c_on_rank0(completions, **kwargs):
    return [1.0 if RANK == 0 else None for _ in completions]
'''


def test_reward_functions_that_score_only_some_processes(tmp_path):
    """Mixed-task data: each function returns None for the other task's rows, so a process may have no score from
    a function. The rollout's metrics must still have the same names on every process (the step's one reduction
    failed or mixed them up), be means over all processes, and PPO must not stop on a process whose rollout is
    entirely unscorable."""
    import json

    from ..conftest import write_jsonl

    (tmp_path / "rank_rewards.py").write_text(RANK_REWARDS)
    data = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"What is {k}+{k}?", "answer": str(2 * k)} for k in range(8)])
    small = ["--model", "tiny", "--no-progress", "--max-length", "48", "--max-new-tokens", "4", "--batch-size", "4",
             "--prompts-per-step", "1", "--max-steps", "2", "--save-steps", "0", "--data", data]
    funcs = ",".join(f"{tmp_path / 'rank_rewards.py'}:{f}" for f in ("a_on_rank0", "b_on_rank1", "c_on_rank0"))
    torchrun(["grpo", *small, "--num-generations", "4", "--output-dir", str(tmp_path / "grpo"), "--reward-funcs",
              funcs])
    for row in map(json.loads, open(tmp_path / "grpo" / "metrics.jsonl")):
        assert row["reward_a_on_rank0"] == pytest.approx(0.3) and row["reward_b_on_rank1"] == pytest.approx(0.7)
        assert row["reward_c_on_rank0"] == pytest.approx(1.0)
        # rank 0's completions score 0.3 + 1.0, rank 1's 0.7, as many of each
        assert row["reward"] == pytest.approx(1.0) and row["unscorable"] == 0.0
    torchrun(["ppo", *small, "--output-dir", str(tmp_path / "ppo"), "--reward-funcs",
              f"{tmp_path / 'rank_rewards.py'}:a_on_rank0"])  # rank 1: every completion unscorable
    assert len(open(tmp_path / "ppo" / "metrics.jsonl").readlines()) == 2

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

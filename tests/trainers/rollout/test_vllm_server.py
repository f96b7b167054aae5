"""Server mode on loopback: the vLLM engine in a separate local process, the trainer sampling from it and pushing
its weights over the socket. Greedy output equals the Hugging Face policy's before and after a sync; a bad
request comes back as an error and the server keeps serving. Skipped where vllm is not importable."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ptkernels.trainers
from ptkernels.trainers.modeling import save_pretrained
from ptkernels.trainers.rollout import vllm_server
from ptkernels.trainers.rollout.engines import HFGenerateEngine
from ptkernels.trainers.rollout.sampling import SamplingConfig

from .vllm_helpers import tiny_llama

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not importable in this interpreter (scripts/setup_vllm_venv.sh "
                                "builds its environment; scripts/ci_vllm.sh runs these tests there)")

REPO_ROOT = Path(ptkernels.trainers.__file__).parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(client, policy, tokenizer): a vllm_server process on a free loopback port serving the tiny policy."""
    model, tokenizer = tiny_llama()
    folder = tmp_path_factory.mktemp("served_policy")
    save_pretrained(model, tokenizer, str(folder))
    port_file = folder / "port"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(folder / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "ptkernels.trainers.rollout.vllm_server", "--model", str(folder),
                                "--port", "0", "--port-file", str(port_file), "--max-length", "128"],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    while not port_file.exists():
        if process.poll() is not None or time.perf_counter() - start > 600:
            process.kill()
            raise RuntimeError(f"vllm_server did not start: {(folder / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    print(f"\nvllm_server ready in {time.perf_counter() - start:.1f} s")
    client = vllm_server.VLLMServerClient("127.0.0.1", int(port_file.read_text()))
    yield client, model.eval(), tokenizer
    try:
        client.stop_server()
        client.close()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def _hf_greedy(model, tokenizer, prompts, n):
    return HFGenerateEngine(model, tokenizer).generate(
        prompts, SamplingConfig(max_new_tokens=n, do_sample=False)).completion_ids


def test_served_rollouts_follow_pushed_weights(server):
    client, model, tokenizer = server
    prompts = [tokenizer(t)["input_ids"] for t in ["What is 12+30?", "The model", "a"]]
    greedy = SamplingConfig(max_new_tokens=20, do_sample=False)
    before = client.generate(prompts, greedy)
    assert before.completion_ids == _hf_greedy(model, tokenizer, prompts, 20)
    assert [len(x) for x in before.sampler_logps] == [len(c) for c in before.completion_ids]

    updated = copy.deepcopy(model)
    with torch.no_grad():
        for p in updated.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    expected = _hf_greedy(updated, tokenizer, prompts, 20)
    assert expected != before.completion_ids, "the perturbation must change the greedy output"
    client.sync_weights(updated)
    assert client.generate(prompts, greedy).completion_ids == expected

    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    assert client.generate(prompts, sampling, seed=5).completion_ids == client.generate(
        prompts, sampling, seed=5).completion_ids


def test_bad_request_is_an_error_and_the_server_goes_on(server):
    client, _, tokenizer = server
    prompt = tokenizer("What is 1+1?")["input_ids"]
    with pytest.raises(RuntimeError, match="--max-length"):
        client.generate([prompt], SamplingConfig(max_new_tokens=500))
    assert len(client.generate([prompt], SamplingConfig(max_new_tokens=4)).completion_ids) == 1

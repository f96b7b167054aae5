"""Peak memory and step time of ``ptk dpo`` (live reference) and ``ptk grpo`` (beta > 0) with and without ``--lora``
(and, with bitsandbytes installed, QLoRA: ``--lora --load-in-4bit``).

Without LoRA both stages hold a second, frozen copy of the model as the reference (DPO with ``--ref-mode live``,
GRPO with ``--beta 0.1``) and AdamW state for every weight; with ``--lora`` the reference is the policy with its
adapter disabled and AdamW holds the adapter's state only. Each case runs the real command in a FRESH subprocess
(``python benchmarks/test_bench_lora.py STAGE ARGS...``) that times every optimizer step (``Trainer.step``) and
reports its peak RSS (CPU: ``VmHWM`` of the process) or ``torch.cuda.max_memory_allocated`` (CUDA).

Configs (``PTK_LORA_BENCH=cpu`` by default, ``gpu`` in scripts/gpu_session.sh):
    cpu   the ``small`` preset (4 layers, D=128; for QLoRA saved as a model folder, the same weights), DPO 4 pairs
          x up to 256 tokens, GRPO 2 prompts x 8 completions of 32 tokens; 4 steps, the median of steps 2-4 reported
    gpu   a random Llama of ~0.6B parameters (24 layers, D=1536, the shipped tokenizer's vocabulary) written to a
          temporary folder, bf16 autocast; DPO 4 pairs, GRPO 2 x 8 x 64 tokens

Times are never asserted; ``extra_info`` has ``step_s`` (median step), ``peak_mib`` and the settings. The
benchmark's own time is the whole subprocess (model build, data, steps).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time

import pytest

pytest.importorskip("peft")

CONFIG = os.environ.get("PTK_LORA_BENCH", "cpu")
STEPS = 4
GPU_MODEL = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=12,
                 num_key_value_heads=4)


def _pref_rows(n: int, words: int) -> list[dict]:
    rng = random.Random(0)
    filler = ["alpha", "beta", "gamma", "delta", "sum", "number", "answer", "the", "is", "of"]
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 60), rng.randint(10, 60)
        text = " ".join(rng.choice(filler) for _ in range(words))
        rows.append({"prompt": [{"role": "user", "content": f"{text} What is {a}+{b}?"}],
                     "chosen": [{"role": "assistant", "content": f"{text} Answer: {a + b}"}],
                     "rejected": [{"role": "assistant", "content": f"{text} maybe {a + b + 7}"}]})
    return rows


def _rl_rows(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {a}+{a + 3}?"}], "answer": str(2 * a + 3)}
            for a in range(10, 10 + n)]


def _write(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _gpu_model(folder) -> str:
    """A random ~0.6B Llama with the shipped tokenizer, saved once (nothing is downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ptkernels.trainers.modeling import load_tokenizer, save_pretrained

    path = os.path.join(folder, "llama-0.7b")
    if not os.path.exists(os.path.join(path, "config.json")):
        tok = load_tokenizer("tiny")
        config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=False,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **GPU_MODEL)
        save_pretrained(LlamaForCausalLM(config), tok, path)
    return path


def _small_folder(folder) -> str:
    """The ``small`` preset (seed 0, as ``--model small`` builds it) saved as a folder: QLoRA loads a folder."""
    from ptkernels.trainers.modeling import load_causal_lm, save_pretrained

    path = os.path.join(folder, "small")
    if not os.path.exists(os.path.join(path, "config.json")):
        save_pretrained(*load_causal_lm("small", seed=0), path)
    return path


def _args(stage: str, lora: str, folder) -> list[str]:
    gpu = CONFIG == "gpu"
    model = _gpu_model(folder) if gpu else _small_folder(folder) if lora == "qlora" else "small"
    common = ["--model", model, "--no-progress", "--max-steps", str(STEPS), "--output-dir",
              os.path.join(folder, f"{stage}-{lora}"), "--overwrite", "--lr", "1e-4", "--save-steps", "0"]
    if lora != "full":
        common += ["--lora", "--lora-r", "16"] + (["--load-in-4bit"] if lora == "qlora" else [])
    if stage == "dpo":
        data = _write(os.path.join(folder, "pref.jsonl"), _pref_rows(32, 40 if not gpu else 150))
        return ["dpo", "--data", data, "--ref-mode", "live", "--batch-size", "4",
                "--max-length", "256" if not gpu else "1024", *common]
    data = _write(os.path.join(folder, "rl.jsonl"), _rl_rows(32))
    return ["grpo", "--data", data, "--beta", "0.1", "--verifier", "math", "--prompts-per-step", "2",
            "--num-generations", "8", "--max-new-tokens", "32" if not gpu else "64", "--batch-size", "16", *common]


def _run_child(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=1800, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("lora", ["full", "lora", "qlora"])
@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_stage_memory_and_step_time(benchmark, tmp_path_factory, stage, lora):
    if lora == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("QLoRA is measured with bitsandbytes installed (pip install -e '.[qlora]')")
    folder = tmp_path_factory.getbasetemp() / "lora_bench"
    folder.mkdir(exist_ok=True)
    args = _args(stage, lora, folder)
    result = {}
    benchmark.pedantic(lambda: result.update(_run_child(args)), rounds=1, iterations=1)
    steps = result["step_s"][1:] or result["step_s"]
    print(f"\nlora case {stage}-{lora}:", json.dumps(result), flush=True)  # lands in the log (-s) as each case ends
    benchmark.extra_info.update(config=CONFIG, stage=stage, lora=lora, step_s=statistics.median(steps),
                                peak_mib=result["peak_mib"], peak_kind=result["peak_kind"],
                                trainable_params=result["trainable"], params=result["params"])


def _child(argv: list[str]) -> None:
    """Runs ``ptk ARGV`` in this process with every optimizer step timed; prints one JSON line."""
    import torch

    from ptkernels.cli import main as ptk
    from ptkernels.trainers.engine import loop

    times, counts = [], {}
    original_step, original_start = loop.Trainer.step, loop.Trainer.start

    def step(self, *a, **kw):
        t0 = time.perf_counter()
        out = original_step(self, *a, **kw)
        if self.info.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return out

    def start(self):
        out = original_start(self)
        counts["trainable"] = sum(p.numel() for p in self.params)
        counts["params"] = sum(p.numel() for p in self.module.parameters())
        return out

    loop.Trainer.step, loop.Trainer.start = step, start
    assert ptk(argv) == 0
    if torch.cuda.is_available():
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    else:
        with open("/proc/self/status", encoding="utf-8") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        peak, kind = hwm / 1024, "process VmHWM (RSS)"
    print(json.dumps({"step_s": times, "peak_mib": round(peak, 1), "peak_kind": kind, **counts}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _child(sys.argv[1:])

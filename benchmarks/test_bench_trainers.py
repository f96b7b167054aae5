"""One SFT training step (forward + backward + AdamW step) of a LlamaForCausalLM, ptkernels beside the model's own
Hugging Face loss.

Paths (``impl``), same initial weights, same batch:
    eager   the model's own Hugging Face loss: ``model(input_ids=..., attention_mask=..., labels=labels).loss``
            (full ``[B, T, V]`` logits, upcast and ``cross_entropy`` inside transformers)
    ptk     ``ptkernels.trainers.modeling.CausalLMLoss(model)(batch, norm)``, what ``ptk sft`` runs: the final
            hidden states and the head's weight into the fused ``linear_cross_entropy`` (no logits), the summed
            NLL over ``norm`` = the label tokens after the shift (the same mean as Hugging Face's loss)

Configs (fp32; CPU sizes, a GPU just runs them on CUDA):
    tiny                the ``tiny`` preset (2 layers, D=64, V=1024, tied head): the head is small, little to gain
    V32000-D512-L4      LlamaConfig(V=32000, D=512, intermediate 1376, 4 layers, 8 heads, untied head)
Batch: B x T tokens, all real (attention mask of ones), the first 25% of every row a prompt (labels -100).
``PTK_BENCH_SMALL=1`` shrinks the batch (a smoke run, figures meaningless). Without ``--benchmark-only`` the
timed cases are skipped and only the loss check runs, at a smoke size (seconds).

Each benchmark case runs both paths round-robin (one step of each per round, the order alternating every round)
so that a shared machine's load skews neither, and reports in ``extra_info`` per path: the median step time,
tokens/s (the batch's non-padding tokens / median step time), peak memory (CUDA: ``max_memory_allocated``
growth of a step; CPU: peak RSS growth of a fresh subprocess running a few steps of that path alone, after one
step that allocated the optimizer state, see _measure.py; the subprocess's absolute VmHWM is kept too), and
the ratios to the Hugging Face path measured in this run (time per round, then the median). Times are never
asserted; the first step's losses of the two paths must agree within 1e-4 relative (a correctness guard).
"""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch

pytest.importorskip("transformers")  # the models come from Transformers (the trainers' extra)

from _measure import cuda_peak_growth, peak_rss_growth, sync
from conftest import DEVICE, INTERLEAVED_RESULTS, SESSION_RESULTS, bench_rounds, bench_size, mem_repeats

IGNORE = -100
PROMPT_FRACTION = 0.25
IMPLS = ("eager", "ptk")
LARGE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
CONFIGS = ("tiny", "V32000-D512-L4")
MEM_STEPS = 2  # steps measured in the memory subprocess (after one unmeasured step that allocates AdamW state)


def batch_shape() -> tuple[int, int]:
    """(B, T) of the benchmark batch: 8 x 512 tokens, or a smoke size under PTK_BENCH_SMALL=1."""
    if bench_size().name.startswith("smoke"):
        return 2, 64
    return 8, 512


# ------------------------------------------------------------------------------------------- problem


def build_model(config: str, seed: int = 0):
    """A fresh fp32 LlamaForCausalLM of ``config``, initialized from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if config == "tiny":
        from ptkernels.trainers.modeling import load_causal_lm

        model, _ = load_causal_lm("tiny", seed=seed)
        return model
    if config != "V32000-D512-L4":
        raise ValueError(f"unknown config {config!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, rope_theta=10000.0, **LARGE))
    return model


def build_batch(vocab: int, b: int, t: int, device, seed: int = 1) -> dict:
    """A prompt-masked SFT batch: random tokens, no padding, labels -100 over the first 25% of each row."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, : int(t * PROMPT_FRACTION)] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


class Path:
    """One path's model (its own copy of the initial weights), optimizer and step."""

    def __init__(self, impl: str, model, batch: dict):
        from ptkernels.trainers.data.tokenization import token_count
        from ptkernels.trainers.modeling import CausalLMLoss

        self.impl, self.model, self.batch = impl, model, batch
        model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0,
                                           foreach=batch["input_ids"].device.type == "cuda")
        self.module = CausalLMLoss(model) if impl == "ptk" else None
        self.norm = float(max(token_count(batch), 1))
        self.device = batch["input_ids"].device

    def loss(self) -> torch.Tensor:
        if self.impl == "ptk":
            return self.module(self.batch, self.norm)[0]
        b = self.batch
        return self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    def step(self) -> float:
        """forward + backward + AdamW step; the loss of the step (before the update)."""
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return float(loss.detach())


def memory_case(impl: str, config: str, b: int, t: int, device: str = "cpu", steps: int = MEM_STEPS):
    """Factory for _measure.peak_rss_growth: model, optimizer and batch built and one step run (AdamW's state
    allocated) in the fresh process, before the baseline; the returned callable runs ``steps`` more steps."""
    model = build_model(config).to(device)
    path = Path(impl, model, build_batch(model.config.vocab_size, b, t, device))
    path.step()

    def run():
        for _ in range(steps):
            path.step()

    return run


# ------------------------------------------------------------------------------------------ reporting


def _peak_memory(impl: str, config: str, b: int, t: int, paths: dict) -> dict:
    if DEVICE.type == "cuda":
        path = paths[impl]
        peak = cuda_peak_growth(path.step, DEVICE)
        return {"peak_mem_bytes": peak, "peak_mem_method": "cuda max_memory_allocated - baseline, one step",
                "peak_mem_runs_mib": [round(peak / 2 ** 20, 1)]}
    runs = [peak_rss_growth(__file__, "memory_case", kwargs={"impl": impl, "config": config, "b": b, "t": t},
                            warmup_kwargs={"impl": impl, "config": "tiny", "b": 1, "t": 16, "steps": 1})
            for _ in range(max(1, mem_repeats()))]
    growth = [float(r["growth_bytes"]) for r in runs]
    hwm = [r["hwm_kib"] * 1024.0 for r in runs]
    return {
        "peak_mem_bytes": statistics.median(growth),
        "peak_rss_bytes": statistics.median(hwm),
        "peak_mem_method": (f"cpu peak RSS growth (VmHWM - VmRSS) over {MEM_STEPS} steps of a fresh subprocess "
                            f"after one unmeasured step, median of {len(runs)}"),
        "peak_mem_runs_mib": [round(m / 2 ** 20, 1) for m in growth],
        "peak_rss_runs_mib": [round(m / 2 ** 20, 1) for m in hwm],
    }


# ----------------------------------------------------------------------------------------- benchmarks


def _paths(config: str) -> tuple[dict, int, int, int]:
    b, t = batch_shape()
    model = build_model(config).to(DEVICE)
    batch = build_batch(model.config.vocab_size, b, t, DEVICE)
    paths = {impl: Path(impl, model if impl == IMPLS[-1] else copy.deepcopy(model), batch) for impl in IMPLS}
    return paths, b, t, int(batch["attention_mask"].sum())


def _label_tokens(paths: dict) -> int:
    from ptkernels.trainers.data.tokenization import token_count

    return token_count(paths["ptk"].batch)


def _check_first_losses(losses: dict, config: str) -> None:
    ref, got = losses["eager"], losses["ptk"]
    rel = abs(got - ref) / max(abs(ref), 1e-30)
    assert rel <= 1e-4, f"{config}: first-step loss ptk {got!r} vs Hugging Face {ref!r} (rel. {rel:.3g})"


def test_first_step_losses_agree():
    """The correctness guard alone, at a smoke size (what a run without --benchmark-only does)."""
    model = build_model("tiny")
    batch = build_batch(model.config.vocab_size, 2, 64, torch.device("cpu"))
    paths = {impl: Path(impl, copy.deepcopy(model), batch) for impl in IMPLS}
    _check_first_losses({impl: p.step() for impl, p in paths.items()}, "tiny")


@pytest.mark.parametrize("config", CONFIGS)
def test_sft_step(benchmark, config, request):
    if not request.config.getoption("benchmark_only"):
        pytest.skip("a training-step benchmark (minutes on CPU): pass --benchmark-only")
    paths, b, t, tokens = _paths(config)
    # Step 1 of each path from the same weights on the same batch: the losses must agree; it is also the
    # warm-up (AdamW allocates its state here).
    first = {impl: p.step() for impl, p in paths.items()}
    _check_first_losses(first, config)

    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    state = {"round": 0}

    def rotation():
        order = IMPLS if state["round"] % 2 == 0 else IMPLS[::-1]
        state["round"] += 1
        for impl in order:
            t0 = time.perf_counter()
            paths[impl].step()
            times[impl].append(time.perf_counter() - t0)

    name = f"{config}-B{b}xT{t}-fp32"
    benchmark.group = f"sft step (fwd+bwd+AdamW) round-robin {name}"
    rounds = bench_rounds() * (5 if config == "tiny" else 1)  # tiny steps take milliseconds: more rounds
    benchmark.pedantic(rotation, rounds=rounds, iterations=1, warmup_rounds=0)

    cfg = paths["ptk"].model.config
    label_tokens = _label_tokens(paths)
    n_params = sum(p.numel() for p in paths["ptk"].model.parameters())
    paths.clear()  # the memory subprocesses should not share the machine's memory with these models
    rows: dict[str, dict] = {}
    for impl in IMPLS:
        median = statistics.median(times[impl])
        rows[impl] = {"median_s": median, "min_s": min(times[impl]), "times_s": times[impl],
                      "tokens_per_s": tokens / median, "first_loss": first[impl],
                      **_peak_memory(impl, config, b, t, {})}
    for impl in IMPLS:
        r, base = rows[impl], rows["eager"]
        r["x_eager"] = statistics.median(a / e for a, e in zip(times[impl], times["eager"], strict=True))
        r["tokens_per_s_x_eager"] = statistics.median(
            e / a for a, e in zip(times[impl], times["eager"], strict=True))
        r["mem_x_eager"] = r["peak_mem_bytes"] / base["peak_mem_bytes"] if base["peak_mem_bytes"] else None
        if "peak_rss_bytes" in r:
            r["peak_rss_x_eager"] = r["peak_rss_bytes"] / base["peak_rss_bytes"]

    op = f"sft_step {name}"
    benchmark.extra_info.update({
        "op": op, "config": config, "b": b, "t": t, "tokens": tokens,
        "label_tokens": label_tokens,
        "vocab": cfg.vocab_size, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
        "tied_head": bool(cfg.tie_word_embeddings), "params": n_params, "dtype": "float32",
        "device": str(DEVICE), "threads": torch.get_num_threads(), "rounds": len(times["eager"]),
        "paths": rows,
    })
    INTERLEAVED_RESULTS[op] = {impl: {**r, "x_torch_chunked": None, "x_floor": None, "rounds": len(times[impl])}
                               for impl, r in rows.items()}
    for impl, r in rows.items():
        SESSION_RESULTS[(op, impl)] = {"median_s": r["median_s"], "peak_mem_bytes": r["peak_mem_bytes"]}

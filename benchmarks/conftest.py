"""Benchmark session setup: device, sizes, the matmul-rate floor, machine info and a summary table.

Run ``pytest benchmarks/ --benchmark-only`` (see benchmarks/README.md). Unlike tests/conftest.py this never
sets TRITON_INTERPRET: the interpreter is for correctness tests, never benchmarked.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass

import pytest
import torch
from _measure import MatmulRate, measure_matmul_rate

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Size:
    n: int  # tokens
    d: int  # hidden size
    v: int  # vocabulary
    masked: float  # fraction of tokens with label ignore_index
    dtype: torch.dtype
    name: str

    @property
    def n_valid(self) -> int:
        return self.n - int(self.n * self.masked)

    def as_kwargs(self) -> dict:
        return {"n": self.n, "d": self.d, "v": self.v, "masked": self.masked,
                "dtype": str(self.dtype).replace("torch.", "")}


# Benchmark sizes (benchmarks/README.md): CPU N=4096 (25% masked), D=512, V=32000 fp32; GPU a Llama-3-8B head in bf16.
CPU_SIZE = Size(n=4096, d=512, v=32000, masked=0.25, dtype=torch.float32, name="cpu-N4096-D512-V32000-fp32")
GPU_SIZE = Size(n=8192, d=4096, v=128256, masked=0.25, dtype=torch.bfloat16,
                name="gpu-N8192-D4096-V128256-bf16")
# PTK_BENCH_SMALL=1: a tiny size to smoke-test the suite itself (figures meaningless).
SMALL_SIZE = Size(n=512, d=64, v=2048, masked=0.25, dtype=torch.float32, name="smoke-N512-D64-V2048-fp32")
# The warm-up case of a fresh memory subprocess (initialises libraries before the measured run).
WARMUP_SIZE = Size(n=64, d=32, v=256, masked=0.25, dtype=torch.float32, name="warmup")


def bench_size() -> Size:
    if os.environ.get("PTK_BENCH_SMALL", "0") not in ("", "0"):
        if DEVICE.type == "cpu":
            return SMALL_SIZE
        return Size(**{**SMALL_SIZE.__dict__, "dtype": torch.bfloat16})
    return GPU_SIZE if DEVICE.type == "cuda" else CPU_SIZE


def bench_rounds() -> int:
    return int(os.environ.get("PTK_BENCH_ROUNDS", "3"))


def mem_repeats() -> int:
    """Fresh subprocesses per CPU peak-RSS figure (their median is reported): the peak of one run varies
    with how the allocator and the intra-op threads happen to interleave."""
    return int(os.environ.get("PTK_BENCH_MEM_REPEATS", "3"))


OPT_IN = {  # marker -> command-line flag that enables it
    "chunk_sweep": "--chunk-sweep",
    "interleaved": "--interleaved",
    "compact_blocks": "--compact-blocks",
}


def pytest_addoption(parser):
    parser.addoption("--chunk-sweep", action="store_true", default=False,
                     help="also time ptkernels over several chunk_size values (with --interleaved: in the "
                          "round-robin too)")
    parser.addoption("--compact-blocks", action="store_true", default=False,
                     help="time memory='compact' over a grid of block shapes (test_bench_compact_blocks.py)")
    parser.addoption("--interleaved", action="store_true", default=False,
                     help="also time every implementation round-robin (one of each per round, rotating "
                          "order) for ratios a shared machine cannot skew")


def pytest_configure(config):
    config.addinivalue_line("markers", "chunk_sweep: chunk-size sweep (runs only with --chunk-sweep)")
    config.addinivalue_line("markers", "interleaved: round-robin timing (runs only with --interleaved)")
    config.addinivalue_line("markers", "compact_blocks: compact mode's block shapes (runs only with --compact-blocks)")


def pytest_collection_modifyitems(config, items):
    for marker, flag in OPT_IN.items():
        if config.getoption(flag):
            continue
        skip = pytest.mark.skip(reason=f"opt-in: pass {flag}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def size() -> Size:
    return bench_size()


@pytest.fixture(scope="session")
def matmul_rate(size: Size, device: torch.device) -> MatmulRate:
    """The GEMM rate of this machine and dtype, measured once per session on the fused op's 3 products."""
    cpu = device.type == "cpu"
    return measure_matmul_rate(size.n_valid, size.d, size.v, size.dtype, device,
                               rounds=5 if cpu else 20, warmup=1 if cpu else 3)


# Filled by the benchmark cases: (op, impl) -> {"median_s": ..., "peak_mem_bytes": ...}, for ratios measured
# in one run and the terminal summary.
SESSION_RESULTS: dict[tuple[str, str], dict] = {}
# Filled by the round-robin cases: op -> impl -> {"median_s", "min_s", "x_eager", "x_torch_chunked", ...}.
INTERLEAVED_RESULTS: dict[str, dict[str, dict]] = {}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["ptk_cpu_model"] = cpu_model()
    machine_info["ptk_cpu_count"] = os.cpu_count()
    machine_info["ptk_torch_threads"] = torch.get_num_threads()
    machine_info["ptk_torch"] = torch.__version__
    try:
        import triton

        machine_info["ptk_triton"] = triton.__version__
    except ImportError:
        machine_info["ptk_triton"] = None
    machine_info["ptk_cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if INTERLEAVED_RESULTS:
        tr.write_sep("=", "ptkernels round-robin timings (per-round ratios, their medians)")
        tr.write_line("| op | impl | median (s) | min (s) | x eager | x torch chunked | x 3-GEMM floor | rounds |")
        tr.write_line("|---|---|---|---|---|---|---|---|")
        for op, rows in INTERLEAVED_RESULTS.items():
            for impl, r in rows.items():
                cells = [op, impl, fmt(r["median_s"], ".3f"), fmt(r["min_s"], ".3f"),
                         fmt(r.get("x_eager"), ".3f"), fmt(r.get("x_torch_chunked"), ".3f"),
                         fmt(r.get("x_floor"), ".3f"), str(r["rounds"])]
                tr.write_line("| " + " | ".join(cells) + " |")
    if not SESSION_RESULTS:
        return
    tr.write_sep("=", "ptkernels benchmark summary (medians of this run; ratios within this run)")
    tr.write_line(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                  f"threads {torch.get_num_threads()}, size {bench_size().name}")
    tr.write_line("| op | impl | median fwd+bwd (s) | x eager | x torch chunked | peak mem growth (MiB) "
                  "| mem x eager | TFLOP/s | time / floor |")
    tr.write_line("|---|---|---|---|---|---|---|---|---|")

    for (op, impl), r in SESSION_RESULTS.items():
        eager = SESSION_RESULTS.get((op, "eager"), {})
        chunked = SESSION_RESULTS.get((op, "torch_chunked"), {})
        t, m = r.get("median_s"), r.get("peak_mem_bytes")
        te, me, tc = eager.get("median_s"), eager.get("peak_mem_bytes"), chunked.get("median_s")
        cells = [
            op, impl, fmt(t, ".3f"),
            fmt(t / te if t and te else None, ".2f"),
            fmt(t / tc if t and tc else None, ".2f"),
            fmt(m / 2**20 if m is not None else None, ".0f"),
            fmt(m / me if m is not None and me else None, ".3f"),
            fmt(r.get("useful_tflops"), ".4f"),
            fmt(r.get("time_over_floor"), ".2f"),
        ]
        tr.write_line("| " + " | ".join(cells) + " |")


# ------------------------------------------------------------------ shared helpers of the per-family files


PTK_BACKENDS = ("torch", "triton", "native")  # "reference" is the eager oracle, never benchmarked as ptkernels
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smoke() -> bool:
    """PTK_BENCH_SMALL=1: every file picks its smoke size (figures meaningless)."""
    return os.environ.get("PTK_BENCH_SMALL", "0") not in ("", "0")


def ptk_skip_reason(backend: str, device: torch.device) -> str | None:
    """Why ptkernels' ``backend`` cannot be benchmarked on ``device`` (None when it can)."""
    from ptkernels.ops.core.dispatch import triton_interpreting, unusable_reason

    reason = unusable_reason(backend, device)
    if reason is not None:
        return f"ptkernels backend {backend!r} not usable: {reason}"
    if backend == "triton" and device.type == "cpu" and triton_interpreting():
        return "the Triton interpreter (TRITON_INTERPRET=1) is never benchmarked"
    return None


def median_seconds(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return None
    return float(stats.stats.median)


def peak_memory(module_file: str, kwargs: dict, warmup_kwargs: dict, step=None, reset=None,
                device: torch.device = DEVICE) -> tuple[float, str]:
    """Peak memory of one step: CUDA ``max_memory_allocated`` growth of ``step`` in this process; CPU the
    median peak RSS growth of ``mem_repeats()`` fresh subprocesses running ``memory_case(**kwargs)`` of
    ``module_file`` (after one ``memory_case(**warmup_kwargs)``)."""
    from _measure import cuda_peak_growth, peak_rss_growth

    if device.type == "cuda":
        return cuda_peak_growth(step, device, reset=reset), "cuda max_memory_allocated - baseline"
    runs = [float(peak_rss_growth(module_file, "memory_case", kwargs=kwargs,
                                  warmup_kwargs=warmup_kwargs)["growth_bytes"])
            for _ in range(max(1, mem_repeats()))]
    import statistics

    return (statistics.median(runs),
            f"cpu peak RSS growth (VmHWM - VmRSS) of a fresh subprocess, median of {len(runs)}")


def record(benchmark, op: str, impl: str, info: dict) -> dict:
    """Adds the median, the ratios to this run's ``eager`` case of ``op`` and ``info`` to ``extra_info``;
    keeps the row for the terminal summary. Run the eager case first (list it first) for the ratios."""
    median = median_seconds(benchmark)
    info = {"op": op, "impl": impl, "median_s": median, **info}
    mem = info.get("peak_mem_bytes")
    if mem is not None:
        info["peak_mem_mib"] = mem / 2 ** 20
    base = SESSION_RESULTS.get((op, "eager"))
    if base and median and base.get("median_s"):
        info["time_x_eager"] = median / base["median_s"]
        if mem is not None and base.get("peak_mem_bytes"):
            info["mem_x_eager"] = mem / base["peak_mem_bytes"]
    benchmark.extra_info.update(info)
    SESSION_RESULTS[(op, impl)] = info
    return info


class Leaves:
    """Base of a benchmark problem: ``leaves`` are the tensors whose gradients a step computes."""

    leaves: tuple[torch.Tensor, ...] = ()

    def reset_grads(self) -> None:
        for t in self.leaves:
            t.grad = None


def fwd_bwd(objective, device: torch.device):
    """One synchronized step of ``objective() -> (outputs, scalar or None)``: backward from the scalar when
    there is one; returns the detached outputs (a tuple), which the case checks against eager's."""
    from _measure import sync

    def step():
        outs, scalar = objective()
        if scalar is not None:
            scalar.backward()
        sync(device)
        return tuple(o.detach() for o in (outs if isinstance(outs, tuple) else (outs,)))

    return step


_EAGER: dict[tuple[str, str], tuple[tuple[torch.Tensor, ...], list]] = {}


def _eager(key, problem: Leaves, make_step):
    if key not in _EAGER:
        problem.reset_grads()
        outs = make_step("eager")()
        grads = [None if t.grad is None else t.grad.float().clone() for t in problem.leaves]
        _EAGER[key] = (tuple(o.float() for o in outs), grads)
        problem.reset_grads()
    return _EAGER[key]


def run_case(benchmark, *, module_file: str, op: str, impl: str, problem: Leaves, make_step, size: dict,
             warmup_size: dict, tol: float, info: dict | None = None) -> dict:
    """Times ``make_step(impl)`` (``bench_rounds()`` rounds after one warm-up; setup resets the gradients),
    checks its outputs and its leaves' gradients against ``make_step("eager")`` (run once per op, outside the
    timed rounds; relative error of the gradient's norm within ``tol``), measures its peak memory (see
    ``peak_memory``: ``module_file`` defines ``memory_case(op, impl, **size)``) and records ``extra_info``."""
    ref_outs, ref_grads = _eager((module_file, op), problem, make_step)
    name = "-".join(f"{k}{v}" for k, v in size.items())
    benchmark.group = f"{op} {DEVICE.type}-{name}"
    outs = benchmark.pedantic(make_step(impl), setup=problem.reset_grads, rounds=bench_rounds(), iterations=1,
                              warmup_rounds=1)
    for i, (o, r) in enumerate(zip(outs, ref_outs, strict=True)):
        torch.testing.assert_close(o.float(), r, rtol=tol, atol=tol, msg=lambda m, i=i: f"{op}/{impl} out {i}: {m}")
    for t, r in zip(problem.leaves, ref_grads, strict=True):
        if r is not None:
            err = (t.grad.float() - r).norm() / r.norm().clamp_min(1e-30)
            assert err < tol, f"{op}/{impl}: gradient rel. error {err:.3g}"
    mem, how = peak_memory(module_file, {"op": op, "impl": impl, **size}, {"op": op, "impl": impl, **warmup_size},
                           step=make_step(impl), reset=problem.reset_grads)
    problem.reset_grads()
    return record(benchmark, op, impl, {"size": f"{DEVICE.type}-{name}", **size, "peak_mem_bytes": mem,
                                        "peak_mem_method": how, **(info or {})})

"""Cost at every size: fused CE and token log-probs vs eager vs torch's ``F.linear_cross_entropy`` vs Cut
Cross-Entropy (when installed) vs the GEMM floor over N x V x D, round-robin in one process.

    pytest benchmarks/test_bench_size_sweep.py --benchmark-only                  the default subset (minutes)
    PTK_SWEEP=full pytest benchmarks/test_bench_size_sweep.py --benchmark-only   every cell that fits 24 GiB
    PTK_SWEEP=ci pytest benchmarks/test_bench_size_sweep.py --benchmark-only     seven cells, no peers (~2 min:
                                                                .ci/run, so every CI log has the figures of its CPU)
    python benchmarks/test_bench_size_sweep.py BENCH.json      the markdown table and fitted growth from a
                                                                pytest-benchmark JSON (--benchmark-json) or
                                                                the JSON lines of PTK_SWEEP_OUT=FILE

Grid: N in {64, 256, 1k, 4k, 16k, 64k} tokens (25% masked, as the CPU benchmark size), V in {872 (the quick preset),
8k, 32k, 128k (Llama 3), 256k}, D in {128, 512, 2048}, fp32 on CPU, bf16 on CUDA. A cell is skipped when eager's
logits and their gradient (and the head with its gradient) would pass 24 GiB, and, unless PTK_SWEEP=full, when
its useful work 6 N_valid D V passes ``DEFAULT_MAX_FLOPS`` (eager takes seconds per call on a 2-core CPU there).

Each cell is one pytest-benchmark case whose every round runs each implementation once, the order rotating
round to round, so the load of a shared machine hits them alike; a call shorter than ~20 ms is repeated within
its turn (``_reps``) so the timer's resolution and Python's jitter do not decide a small cell. Ratios are per
round, their median reported. Public API only: ``ptkernels.linear_cross_entropy`` / ``linear_token_logprobs``
with ``backend="auto"``. The floor is the three GEMMs of the fused op, unchunked, on the faster of torch.mm and
ptkernels' CPU GEMM route (benchmarks/_measure.py). Cut Cross-Entropy (``pip install cut-cross-entropy``)
runs the path it takes on the device: on CPU its torch.compile path (the valid rows' logits, compiled), on
CUDA its Triton kernels; the first cell pays its compilation in the warm-up call, outside the timed rounds.
Peak memory (CPU: peak RSS growth of a fresh subprocess; CUDA: max_memory_allocated) for eager and ptkernels'
CE; PTK_SWEEP_MEM=0 skips it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from _measure import cuda_peak_growth, peak_rss_growth, sync, three_gemms, useful_flops
from test_bench_linear_cross_entropy import cce_skip_reason, cut_cross_entropy

import ptkernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
IGNORE = -100
MASKED = 0.25
N_GRID = (64, 256, 1024, 4096, 16384, 65536)
V_GRID = (872, 8192, 32000, 128256, 256000)
D_GRID = (128, 512, 2048)
MAX_BYTES = 24 << 30
DEFAULT_MAX_FLOPS = 1.3e11  # ~1-2 s of eager fwd+bwd on the 2-core CPU; PTK_SWEEP=full lifts it
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
BENCH_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_bench_linear_cross_entropy.py")


# PTK_SWEEP=ci: cells that span the grid's regimes (the fixed per-call cost at the quick preset's head, a mid-size
# call at each hidden size, Llama 3's vocabulary over few rows, and N·V >= 2^26 where the GEMM floor decides), each
# under ~2 s of eager fwd+bwd on 2 cores; ptkernels against eager and the floor only, the peers' figures being in
# benchmarks/RESULTS.md (F.linear_cross_entropy alone takes ~19 s a call at N=256, D=512, V=128256 there).
CI_CELLS = ((64, 128, 872), (1024, 128, 8192), (16384, 128, 8192), (4096, 512, 8192), (1024, 512, 32000),
            (256, 512, 128256), (256, 2048, 32000))


def sweep_mode() -> str:
    return os.environ.get("PTK_SWEEP", "").strip().lower()


def full_sweep() -> bool:
    return sweep_mode() == "full"


def n_valid(n: int) -> int:
    return n - int(n * MASKED)


def eager_bytes(n: int, d: int, v: int) -> int:
    """What eager holds at its peak: fp32 logits, their log-softmax and its gradient, the head and its grad."""
    el = torch.finfo(DTYPE).bits // 8
    return 3 * n * v * 4 + 2 * v * d * el + 2 * n * d * el


def cell_skip_reason(n: int, d: int, v: int) -> str | None:
    if eager_bytes(n, d, v) > MAX_BYTES:
        return f"eager needs ~{eager_bytes(n, d, v) / 2**30:.0f} GiB > 24 GiB"
    if not full_sweep() and DEVICE.type == "cpu" and useful_flops(n_valid(n), d, v) > DEFAULT_MAX_FLOPS:
        return "too slow for the default subset (PTK_SWEEP=full runs it)"
    return None


CELLS = (list(CI_CELLS) if sweep_mode() == "ci" else
         [(n, d, v) for d, v, n in itertools.product(D_GRID, V_GRID, N_GRID)])


class Cell:
    def __init__(self, n: int, d: int, v: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.n, self.d, self.v = n, d, v
        self.hidden = torch.randn(n, d, generator=g).to(DEVICE, DTYPE).requires_grad_()
        self.weight = (torch.randn(v, d, generator=g) * 0.02).to(DEVICE, DTYPE).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=g)
        labels[torch.randperm(n, generator=g)[: int(n * MASKED)]] = IGNORE
        self.labels = labels.to(DEVICE)
        self.n_valid = n_valid(n)

    def steps(self) -> dict:
        """name -> one synchronized fwd+bwd (gradients of hidden and weight)."""
        h, w, y = self.hidden, self.weight, self.labels
        inv = 1.0 / max(self.n_valid, 1)
        valid = y != IGNORE
        safe_y = torch.where(valid, y, 0).unsqueeze(1)

        def eager_ce():
            return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=IGNORE)

        def eager_lp():
            lp = torch.log_softmax(F.linear(h, w).float(), -1).gather(1, safe_y).squeeze(1)
            return torch.where(valid, lp, 0.0).sum() * inv

        objectives = {
            "ce eager": eager_ce,
            "ce ptkernels": lambda: ptkernels.linear_cross_entropy(h, w, y, ignore_index=IGNORE),
            "logprobs eager": eager_lp,
            "logprobs ptkernels": lambda: ptkernels.linear_token_logprobs(h, w, y, ignore_index=IGNORE).sum() * inv,
        }
        peers = sweep_mode() != "ci"
        if peers and HAS_TORCH_LCE:
            opts = torch.nn.LinearCrossEntropyOptions()
            objectives["ce F.linear_cross_entropy"] = lambda: F.linear_cross_entropy(
                h, w, y, ignore_index=IGNORE, options=opts)
        if peers and cce_skip_reason() is None:
            objectives["ce Cut Cross-Entropy"] = lambda: cut_cross_entropy(h, w, y)
        steps = {}
        for name, objective in objectives.items():
            def step(objective=objective):
                h.grad = w.grad = None
                objective().backward()
                sync(DEVICE)
            steps[name] = step
        steps["floor (3 GEMMs)"] = self.floor_step()
        return steps

    def floor_step(self):
        """The fused op's three GEMMs, unchunked, on the faster library for this shape (tried once here)."""
        with torch.no_grad():
            hv = self.hidden.detach()[: self.n_valid].contiguous()
            w = self.weight.detach()
            dz = torch.randn(self.n_valid, self.v, device=DEVICE).to(DTYPE).mul_(1e-4)
            best = None
            for lib in ("torch.mm", "ptkernels"):
                gemms = list(three_gemms(hv, w, dz, lib).values())

                def run(gemms=gemms):
                    for f in gemms:
                        f()
                    sync(DEVICE)

                run()
                t0 = time.perf_counter()
                run()
                dt = time.perf_counter() - t0
                if best is None or dt < best[0]:
                    best = (dt, run)
        return best[1]


def _reps(step, target_s: float = 0.02, cap: int = 10) -> int:
    """Calls per turn so that one turn lasts about ``target_s`` (one warm call first)."""
    step()
    t0 = time.perf_counter()
    step()
    dt = time.perf_counter() - t0
    return max(1, min(cap, math.ceil(target_s / max(dt, 1e-6))))


def _peak_bytes(impl: str, cell: Cell) -> float | None:
    if os.environ.get("PTK_SWEEP_MEM", "1") in ("0", ""):
        return None
    op = "linear_cross_entropy"
    name = {"ce eager": "eager", "ce ptkernels": "ptk-auto"}[impl]
    if DEVICE.type == "cuda":
        step = cell.steps()[impl]
        return cuda_peak_growth(step, DEVICE)
    kwargs = dict(op=op, impl=name, n=cell.n, d=cell.d, v=cell.v, masked=MASKED, dtype="float32", device="cpu")
    warm = dict(kwargs, n=64, d=32, v=256)
    return float(peak_rss_growth(BENCH_FILE, "memory_case", kwargs, warmup_kwargs=warm)["growth_bytes"])


def _id(cell) -> str:
    n, d, v = cell
    return f"N{n}-D{d}-V{v}"


@pytest.mark.parametrize("cell", CELLS, ids=[_id(c) for c in CELLS])
def test_size_sweep(benchmark, cell):
    n, d, v = cell
    reason = cell_skip_reason(n, d, v)
    if reason:
        pytest.skip(reason)
    c = Cell(n, d, v)
    steps = c.steps()
    reps = {k: _reps(s) for k, s in steps.items()}
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    state = {"round": 0}

    def one_round():
        k = state["round"] % len(names)
        state["round"] += 1
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                steps[name]()
            times[name].append((time.perf_counter() - t0) / reps[name])

    rounds = int(os.environ.get("PTK_BENCH_ROUNDS", "3"))
    benchmark.group = "size sweep"
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    info = {"n": n, "d": d, "v": v, "n_valid": c.n_valid, "dtype": str(DTYPE).replace("torch.", ""),
            "device": str(DEVICE), "rounds": rounds, "reps_per_turn": reps,
            "median_s": {k: statistics.median(t) for k, t in times.items()}}
    floor = "floor (3 GEMMs)"
    info["x_eager"] = {k: ratio(k, ("logprobs" if k.startswith("logprobs") else "ce") + " eager")
                       for k in names if k != floor}
    info["x_floor"] = {k: ratio(k, floor) for k in names if k != floor}
    mem = {}
    for impl in ("ce eager", "ce ptkernels"):
        b = _peak_bytes(impl, c)
        if b is not None:
            mem[impl] = round(b / 2**20, 1)
    info["peak_mib"] = mem
    benchmark.extra_info.update(info)
    out = os.environ.get("PTK_SWEEP_OUT")
    if out:  # one JSON line per cell as it finishes, so a run cut short keeps what it measured
        with open(out, "a") as f:
            f.write(json.dumps(info) + "\n")


# ------------------------------------------------------------------------------------------ the report


def fit_growth(rows: list[dict], impl: str) -> tuple[float, float, float]:
    """Least-squares exponents (a, b, c) of time ~ N_valid^a V^b D^c over the cells measured."""
    xs, ys = [], []
    for r in rows:
        t = r["median_s"].get(impl)
        if t:
            xs.append([1.0, math.log(r["n_valid"]), math.log(r["v"]), math.log(r["d"])])
            ys.append(math.log(t))
    if len(xs) < 5:
        return (float("nan"),) * 3
    x = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64).unsqueeze(1)
    coef = torch.linalg.lstsq(x, y).solution.squeeze(1)
    return float(coef[1]), float(coef[2]), float(coef[3])


def render(path: str) -> str:
    """From a pytest-benchmark JSON, or the JSON lines of PTK_SWEEP_OUT."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
        rows = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("median_s")]
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows.sort(key=lambda r: (r["d"], r["v"], r["n"]))
    out = ["| N | D | V | eager CE (s) | CE × eager | CE × floor | F.lce × eager | CCE × eager | logprobs × eager | "
           "logprobs × floor | peak MiB eager / ptk |", "|" + "---:|" * 11]
    for r in rows:
        xe, xf, m = r["x_eager"], r["x_floor"], r.get("peak_mib", {})
        ratios = (xe["ce ptkernels"], xf["ce ptkernels"], xe.get("ce F.linear_cross_entropy"),
                  xe.get("ce Cut Cross-Entropy"), xe["logprobs ptkernels"], xf["logprobs ptkernels"])
        cells = [str(r["n"]), str(r["d"]), str(r["v"]), f"{r['median_s']['ce eager']:.4f}"]
        cells += ["" if x is None else f"{x:.2f}" for x in ratios]
        cells.append(f"{m['ce eager']} / {m['ce ptkernels']}" if len(m) == 2 else "")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("Fitted growth, time ~ N_valid^a · V^b · D^c (least squares over the cells above):")
    out.append("")
    out.append("| implementation | a (N) | b (V) | c (D) |")
    out.append("|---|---:|---:|---:|")
    impls = sorted({k for r in rows for k in r["median_s"]})
    for impl in impls:
        a, b, c = fit_growth(rows, impl)
        out.append(f"| {impl} | {a:.2f} | {b:.2f} | {c:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(sys.argv[1]))

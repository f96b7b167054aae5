"""Measurement helpers for the benchmarks: peak memory of one case, and the matmul-rate floor.

Peak memory
    CUDA: ``torch.cuda.max_memory_allocated()`` minus what was allocated before the case, in-process.
    CPU:  peak RSS growth of a FRESH subprocess that builds the tensors, runs one small warm-up (so lazily
          initialised libraries and thread pools are not charged to the case), trims the heap, resets the
          high-water mark (``echo 5 > /proc/self/clear_refs``), runs one fwd+bwd and reports
          ``VmHWM - VmRSS(before)``. The case is named by a file path and a factory in it (see
          ``peak_rss_growth``); the factory builds its tensors and returns a zero-argument step.

Floor
    The fused linear cross-entropy needs three GEMMs of useful work, 6*N_valid*D*V FLOPs in all:
    ``z = h @ W.T``, ``dh = dz @ W`` and ``dW = dz.T @ h``. ``measure_matmul_rate`` times exactly those three
    products, unchunked, on the machine and dtype of the benchmark with every GEMM library ptkernels can use
    there (``torch.mm``; on CPU in fp32 also oneDNN, see ptkernels/ops/core/gemm.py) and keeps the fastest: the
    floor time of a case is its useful FLOPs over that rate, so a faster library never flatters the ratio.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

MIB = float(1 << 20)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def useful_flops(n_valid: int, d: int, v: int) -> float:
    """FLOPs a fused linear cross-entropy must do in fwd+bwd: three [N_valid, D] x [D, V]-sized GEMMs."""
    return 6.0 * n_valid * d * v


# ---------------------------------------------------------------------------------------------- floor


@dataclass
class MatmulRate:
    """The measured GEMM rate of this machine and dtype (FLOP/s), from the fused op's three products.

    ``rate`` comes from the fastest round: a floor is what the machine can do, and on a shared machine the
    fastest round is the least disturbed one. ``median_rate`` is kept alongside.
    """

    device: str
    dtype: str
    shape: tuple[int, int, int]  # (N_valid, D, V)
    rate: float  # from the fastest round of the three GEMMs together, on the fastest library
    median_rate: float  # from the median round, same library
    per_gemm: dict[str, float] = field(default_factory=dict)  # best FLOP/s of each product, same library
    rounds: int = 0
    library: str = "torch.mm"  # the library the rate was measured on
    by_library: dict[str, float] = field(default_factory=dict)  # library -> rate (fastest round)

    def floor_seconds(self, flops: float) -> float:
        return flops / self.rate

    def as_info(self) -> dict:
        return {
            "floor_matmul_tflops": round(self.rate / 1e12, 5),
            "floor_matmul_tflops_median": round(self.median_rate / 1e12, 5),
            "floor_matmul_shape_nvalid_d_v": list(self.shape),
            "floor_matmul_tflops_per_gemm": {k: round(r / 1e12, 5) for k, r in self.per_gemm.items()},
            "floor_matmul_library": self.library,
            "floor_matmul_tflops_by_library": {k: round(r / 1e12, 5) for k, r in self.by_library.items()},
        }


def three_gemms(h: torch.Tensor, w: torch.Tensor, dz: torch.Tensor, library: str) -> dict:
    """The three products as zero-argument calls on ``library``: "torch.mm", or "ptkernels" (the GEMMs of
    ptkernels/ops/core/gemm.py, which take oneDNN for large fp32 CPU GEMMs and ``torch.mm`` elsewhere).

    The arithmetic only, not the allocation of its results: "torch.mm" writes into buffers allocated here once;
    oneDNN returns fresh products, so on CPU "ptkernels" forms GEMMs 1 and 2 in blocks of rows whose products
    stay below glibc's mmap threshold (``gemm.CPU_FRESH_BUFFER_BYTES``). A fresh [N, V] product above it is
    mapped and zero-filled on every call: at N=12288 valid rows, D=128, V=8192 (Zen 4 EPYC) that put ~75 ms of
    page faults into a 226 ms GEMM 1 and made the floor ~15% slower than the GEMMs."""
    n, v = dz.shape
    if library == "torch.mm":
        z, dh, dw = h.new_empty(n, v), h.new_empty(n, h.shape[1]), h.new_empty(v, h.shape[1])
        return {"h@W.T": lambda: torch.mm(h, w.t(), out=z), "dz@W": lambda: torch.mm(dz, w, out=dh),
                "dz.T@h": lambda: torch.mm(dz.t(), h, out=dw)}
    from ptkernels.ops.core import gemm

    acc = gemm.weight_grad_buffer(w, h, h.dtype)
    if h.device.type != "cpu":
        return {"h@W.T": lambda: gemm.logits(h, w), "dz@W": lambda: gemm.input_grad(dz, w),
                "dz.T@h": lambda: gemm.accumulate_weight_grad(acc, dz, h)}

    def in_blocks(product, columns: int):
        rows_fit = gemm.CPU_FRESH_BUFFER_BYTES // (columns * h.element_size())
        step = max(1, rows_fit // 32 * 32 or rows_fit)

        def run():  # each block's product is dropped before the next is formed: one block's memory, reused
            for r in range(0, n, step):
                product(slice(r, r + step))
        return run

    return {"h@W.T": in_blocks(lambda rows: gemm.logits(h[rows], w), v),
            "dz@W": in_blocks(lambda rows: gemm.input_grad(dz[rows], w), h.shape[1]),
            "dz.T@h": lambda: gemm.accumulate_weight_grad(acc, dz, h)}


def gemm_libraries(device: torch.device, dtype: torch.dtype) -> list[str]:
    from ptkernels.ops.core import gemm

    return ["torch.mm", "ptkernels"] if gemm.onednn_route(device, dtype) else ["torch.mm"]


def measure_matmul_rate(n_valid: int, d: int, v: int, dtype: torch.dtype, device: torch.device,
                        rounds: int = 5, warmup: int = 1) -> MatmulRate:
    """Times ``h @ W.T``, ``dz @ W`` and ``dz.T @ h`` (h [N_valid, D], W [V, D], dz [N_valid, V]) on every
    library of ``gemm_libraries`` and returns the fastest library's rate."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    h = torch.randn(n_valid, d, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(v, d, generator=g).mul_(0.02).to(device=device, dtype=dtype)
    dz = torch.randn(n_valid, v, generator=g).mul_(1e-4).to(device=device, dtype=dtype)
    flops = useful_flops(n_valid, d, v)
    best = None
    by_library = {}
    for library in gemm_libraries(device, dtype):
        gemms = three_gemms(h, w, dz, library)
        for _ in range(warmup):
            for f in gemms.values():
                f()
        sync(device)
        per: dict[str, list[float]] = {k: [] for k in gemms}
        totals = []
        for _ in range(rounds):
            total = 0.0
            for k, f in gemms.items():
                t0 = time.perf_counter()
                f()
                sync(device)
                dt = time.perf_counter() - t0
                per[k].append(dt)
                total += dt
            totals.append(total)
        rate = MatmulRate(
            device=str(device), dtype=str(dtype).replace("torch.", ""), shape=(n_valid, d, v),
            rate=flops / min(totals), median_rate=flops / statistics.median(totals),
            per_gemm={k: (flops / 3) / min(ts) for k, ts in per.items()}, rounds=rounds, library=library,
        )
        by_library[library] = rate.rate
        if best is None or rate.rate > best.rate:
            best = rate
    best.by_library = by_library
    return best


# --------------------------------------------------------------------------------------- peak memory


def cuda_peak_growth(step, device: torch.device, reset=None) -> float:
    """Bytes allocated at peak by one call of ``step()`` beyond what was allocated before it (CUDA)."""
    if reset is not None:
        reset()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - base)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _load_module(path: str):
    bench_dir = os.path.dirname(os.path.abspath(path))
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    name = "_bench_case_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _child(spec: dict) -> dict:
    mod = _load_module(spec["path"])
    factory = getattr(mod, spec["factory"])
    if spec.get("warmup_kwargs") is not None:
        warm = factory(**spec["warmup_kwargs"])
        warm()
        del warm
    _trim_heap()
    step = factory(**spec["kwargs"])  # tensors are built here, before the baseline
    _trim_heap()
    rss_before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    hwm_reset = _proc_status_kib("VmHWM")
    step()
    hwm = _proc_status_kib("VmHWM")
    return {"rss_before_kib": rss_before, "hwm_after_reset_kib": hwm_reset, "hwm_kib": hwm,
            "growth_bytes": (hwm - rss_before) * 1024}


def peak_rss_growth(path: str, factory: str, kwargs: dict, warmup_kwargs: dict | None = None,
                    timeout: float = 900.0) -> dict:
    """Peak RSS growth (bytes, in ``["growth_bytes"]``) of one ``factory(**kwargs)()`` in a fresh process.

    ``path`` is a Python file defining ``factory``; the factory builds its inputs and returns a zero-argument
    step (one fwd+bwd). ``warmup_kwargs``, when given, builds and runs a small case first.
    """
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("peak RSS needs Linux /proc (clear_refs, VmHWM)")
    spec = {"path": os.path.abspath(path), "factory": factory, "kwargs": kwargs,
            "warmup_kwargs": warmup_kwargs}
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # never measure the interpreter
    # The child imports what this process imports (e.g. an uninstalled checkout found through the cwd).
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd()] + [p for p in sys.path if p])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))

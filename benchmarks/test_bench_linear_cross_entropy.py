"""fwd+bwd benchmarks of linear_cross_entropy and linear_token_logprobs against their baselines.

Implementations (``impl``):
    eager          full logits: ``F.linear`` then ``F.cross_entropy(..., ignore_index)`` (log-probs:
                   ``log_softmax`` + ``gather``), upcast to fp32 as Hugging Face does (a no-op on fp32 CPU)
    torch_chunked  PyTorch's own ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
                   (log-probs: minus its ``reduction="none"`` loss)
    liger          Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (CUDA only, when installed)
    cce            Cut Cross-Entropy's ``linear_cross_entropy`` (``pip install cut-cross-entropy``, when
                   installed): its Triton kernels (impl="cce") on CUDA, its CPU path (impl="torch_compile", the
                   logits of the valid rows under torch.compile) on CPU; log-probs: minus its
                   ``reduction="none"`` loss
    ptk-<backend>  ptkernels on each usable backend except "reference" (the eager oracle) and the Triton
                   interpreter
    ptk-native+blas  the native backend with every GEMM on torch.mm (PTK_CPU_GEMM=blas), where ptkernels
                   would otherwise take oneDNN (fp32 on CPU): what the fusion gains apart from the library
    ptk-<backend>+compact  ``memory="compact"``: the weight gradient one vocabulary block at a time, no fp32
                   [V, D] accumulator (ops/core/vocab_blocks.py); its peak memory is the figure to read, against
                   ``grad_floor_bytes`` (dX + dW in the inputs' dtype) as ``mem_x_grad_floor``
    ptk-<backend>+keep  token log-probs only: forward keeps every chunk's logits for backward whatever their size
                   (``token_logprobs.KEEP_LOGITS_BYTES`` lifted), so backward runs 2 GEMMs instead of 3: what
                   3 GEMMs instead of 4 buy, and cost in memory, at sizes above the kept-logits bound

Each case reports in ``extra_info``: peak memory growth of one fwd+bwd (CUDA: max_memory_allocated minus
baseline; CPU: peak RSS growth of a fresh subprocess, see _measure.py), useful TFLOP/s (6*N_valid*D*V over
the median time), the floor time (those FLOPs at the GEMM rate measured once this session) and time / floor.
Times are never asserted; losses and the hidden-state gradient are checked against eager.
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from _measure import cuda_peak_growth, gemm_libraries, peak_rss_growth, sync, three_gemms, useful_flops
from conftest import INTERLEAVED_RESULTS, SESSION_RESULTS, WARMUP_SIZE, bench_rounds, mem_repeats

import ptkernels
from ptkernels.ops import token_logprobs
from ptkernels.ops.core import gemm
from ptkernels.ops.core.chunking import default_chunk_size
from ptkernels.ops.core.dispatch import resolve_backend, triton_interpreting, unusable_reason

IGNORE = -100
OPS = ("linear_cross_entropy", "linear_token_logprobs")
PTK_BACKENDS = ("torch", "triton", "native")
# memory="compact" on the default backend of each device (triton on CUDA, native on CPU)
COMPACT_IMPLS = ("ptk-triton+compact", "ptk-native+compact")
KEEP_IMPLS = ("ptk-triton+keep", "ptk-native+keep")  # token log-probs with every chunk's logits kept
IMPLS = (("eager", "torch_chunked", "liger", "cce") + tuple(f"ptk-{b}" for b in PTK_BACKENDS) + ("ptk-native+blas",)
         + COMPACT_IMPLS + KEEP_IMPLS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------- problem


class Problem:
    """Leaf tensors of one benchmark size: hidden [N, D], weight [V, D] (both requiring grad), labels [N]."""

    def __init__(self, n: int, d: int, v: int, masked: float, dtype, device, seed: int = 0):
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        device = torch.device(device)
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
        self.weight = (torch.randn(v, d, generator=g) * d ** -0.5).to(device=device, dtype=dtype)
        self.weight.requires_grad_()
        labels = torch.randint(0, v, (n,), generator=g)
        labels[torch.randperm(n, generator=g)[: int(n * masked)]] = IGNORE
        self.labels = labels.to(device)
        self.n_valid = int((labels != IGNORE).sum())
        self.device = device

    def reset_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


# ------------------------------------------------------------------------------------- implementations


def _chunked_options():
    return torch.nn.LinearCrossEntropyOptions()


def _liger_loss():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)


def cut_cross_entropy(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    """Cut Cross-Entropy's loss on the path it takes on ``h``'s device (its Triton kernels need CUDA)."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if h.device.type == "cuda" else "torch_compile"
    return linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction=reduction, impl=impl)


def cce_skip_reason() -> str | None:
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return "Cut Cross-Entropy is not installed (pip install cut-cross-entropy)"
    return None


def _objective(op: str, impl: str, p: Problem, chunk_size: int | None = None):
    """A zero-argument function returning the scalar that backward runs from."""
    h, w, y = p.hidden, p.weight, p.labels
    inv_valid = 1.0 / max(p.n_valid, 1)
    if impl.startswith("ptk-"):
        backend, _, variant = impl[4:].partition("+")
        memory = "compact" if variant == "compact" else "default"
        if op == "linear_cross_entropy":
            return lambda: ptkernels.linear_cross_entropy(h, w, y, ignore_index=IGNORE, chunk_size=chunk_size,
                                                          memory=memory, backend=backend)
        return lambda: ptkernels.linear_token_logprobs(h, w, y, ignore_index=IGNORE, chunk_size=chunk_size,
                                                       memory=memory, backend=backend).sum() * inv_valid
    if impl == "eager":
        if op == "linear_cross_entropy":
            return lambda: F.cross_entropy(F.linear(h, w).float(), y, ignore_index=IGNORE)

        def eager_logprobs():
            logp = torch.log_softmax(F.linear(h, w).float(), dim=-1)
            valid = y != IGNORE
            lp = logp.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
            return torch.where(valid, lp, 0.0).sum() * inv_valid

        return eager_logprobs
    if impl == "torch_chunked":
        opts = _chunked_options()
        if op == "linear_cross_entropy":
            return lambda: F.linear_cross_entropy(h, w, y, ignore_index=IGNORE, options=opts)
        return lambda: -F.linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction="none",
                                               options=opts).sum() * inv_valid
    if impl == "liger":
        loss_fn = _liger_loss()

        def liger():
            out = loss_fn(w, h, y)
            return out[0] if isinstance(out, tuple) else out

        return liger
    if impl == "cce":
        if op == "linear_cross_entropy":
            return lambda: cut_cross_entropy(h, w, y)
        return lambda: -cut_cross_entropy(h, w, y, reduction="none").sum() * inv_valid
    raise ValueError(f"unknown impl {impl!r}")


def _with_setting(step, module, name: str, value):
    """``step`` run with ``module.name`` set to ``value`` (restored after each call)."""
    def set_step():
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            return step()
        finally:
            setattr(module, name, saved)

    return set_step


def make_step(op: str, impl: str, p: Problem, chunk_size: int | None = None):
    """One fwd+bwd (gradients of hidden and weight), synchronized; returns the detached objective."""
    objective = _objective(op, impl, p, chunk_size)

    def step():
        out = objective()
        out.backward()
        sync(p.device)
        return out.detach()

    if impl.endswith("+blas"):  # ptkernels' GEMMs on torch.mm (what PTK_CPU_GEMM=blas sets at import)
        return _with_setting(step, gemm, "_CPU_GEMM", "blas")
    if impl.endswith("+keep"):  # token log-probs keep every chunk's logits for backward, whatever their size
        return _with_setting(step, token_logprobs, "KEEP_LOGITS_BYTES", 1 << 62)
    return step


def memory_case(op: str, impl: str, n: int, d: int, v: int, masked: float, dtype: str, device: str = "cpu",
                chunk_size: int | None = None):
    """Factory for _measure.peak_rss_growth: builds the problem in the (fresh) process, returns its step."""
    return make_step(op, impl, Problem(n, d, v, masked, dtype, device), chunk_size)


def skip_reason(op: str, impl: str, device: torch.device) -> str | None:
    if impl == "torch_chunked":
        if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
            return f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions"
        return None
    if impl == "liger":
        if op == "linear_token_logprobs":
            return "Liger-Kernel has no fused token log-prob op"
        if importlib.util.find_spec("liger_kernel") is None:
            return "Liger-Kernel is not installed (pip install liger-kernel)"
        if device.type != "cuda":
            return "Liger-Kernel's fused linear cross-entropy runs on CUDA only"
        return None
    if impl == "cce":
        return cce_skip_reason()
    if impl.startswith("ptk-"):
        backend, _, library = impl[4:].partition("+")
        if library == "blas" and not (device.type == "cpu" and gemm.cpu_gemm_library() == "onednn"):
            return "ptkernels' GEMMs are torch.mm here already"
        if library == "compact" and backend != ("triton" if device.type == "cuda" else "native"):
            return "memory='compact' is measured on the device's default backend only"
        if library == "keep":
            if op != "linear_token_logprobs":
                return "kept logits are a token log-probs variant"
            if backend != ("triton" if device.type == "cuda" else "native"):
                return "kept logits are measured on the device's default backend only"
        reason = unusable_reason(backend, device)
        if reason is not None:
            return f"ptkernels backend {backend!r} not usable: {reason}"
        if backend == "triton" and device.type == "cpu" and triton_interpreting():
            return "the Triton interpreter (TRITON_INTERPRET=1) is never benchmarked"
        rows_module = {"triton": "ptkernels.ops.backends.triton",
                       "native": "ptkernels.ops.backends.native"}.get(backend)
        if rows_module and importlib.util.find_spec(rows_module) is None:
            return f"ptkernels backend {backend!r}: {rows_module} does not exist yet"
    return None


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def problem(size, device) -> Problem:
    return Problem(size.n, size.d, size.v, size.masked, size.dtype, device)


_REFERENCE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def reference(op: str, p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager objective and hidden-state gradient (computed once per op), the correctness oracle."""
    if op not in _REFERENCE:
        p.reset_grads()
        out = make_step(op, "eager", p)()
        _REFERENCE[op] = (out.float(), p.hidden.grad.float().clone())
        p.reset_grads()
    return _REFERENCE[op]


# ------------------------------------------------------------------------------------------ reporting


def _peak_memory(op: str, impl: str, p: Problem, size, device, chunk_size=None) -> tuple[float, str, list]:
    if device.type == "cuda":
        step = make_step(op, impl, p, chunk_size)
        peak = cuda_peak_growth(step, device, reset=p.reset_grads)
        return peak, "cuda max_memory_allocated - baseline", [peak]
    runs = [
        float(peak_rss_growth(
            __file__, "memory_case",
            kwargs={"op": op, "impl": impl, **size.as_kwargs(), "chunk_size": chunk_size},
            warmup_kwargs={"op": op, "impl": impl, **WARMUP_SIZE.as_kwargs(), "chunk_size": None},
        )["growth_bytes"])
        for _ in range(max(1, mem_repeats()))
    ]
    how = f"cpu peak RSS growth (VmHWM - VmRSS) of a fresh subprocess, median of {len(runs)}"
    return statistics.median(runs), how, runs


def _median_seconds(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return None
    return float(stats.stats.median)


def _report(benchmark, op, impl, p: Problem, size, device, matmul_rate, chunk_size=None) -> dict:
    flops = useful_flops(p.n_valid, size.d, size.v)
    floor_s = matmul_rate.floor_seconds(flops)
    median = _median_seconds(benchmark)
    mem, mem_how, mem_runs = _peak_memory(op, impl, p, size, device, chunk_size)
    # the least any fwd+bwd can hold: dX and dW in the inputs' dtype (issue 26's "dX + dW floor")
    grad_floor = (size.n + size.v) * size.d * p.hidden.element_size()
    info = {
        "op": op, "impl": impl, "size": size.name, "dtype": str(size.dtype).replace("torch.", ""),
        "n": size.n, "n_valid": p.n_valid, "d": size.d, "v": size.v,
        "chunk_size": chunk_size if chunk_size else (
            default_chunk_size(size.v, device, None if impl.endswith("+blas") else size.dtype)
            if impl.startswith("ptk-") else None),
        "median_s": median,
        "useful_flops": flops,
        "useful_tflops": flops / median / 1e12 if median else None,
        "floor_s": floor_s,
        "time_over_floor": median / floor_s if median else None,
        "peak_mem_bytes": mem,
        "peak_mem_mib": mem / 2 ** 20,
        "peak_mem_method": mem_how,
        "peak_mem_runs_mib": [round(m / 2 ** 20, 1) for m in mem_runs],
        "grad_floor_bytes": grad_floor,
        "mem_x_grad_floor": mem / grad_floor,
        **matmul_rate.as_info(),
    }
    base = SESSION_RESULTS.get((op, "eager"))
    if base and median and base.get("median_s"):
        info["time_x_eager"] = median / base["median_s"]
        info["mem_x_eager"] = mem / base["peak_mem_bytes"] if base["peak_mem_bytes"] else None
    chunked = SESSION_RESULTS.get((op, "torch_chunked"))
    if chunked and median and chunked.get("median_s"):
        info["time_x_torch_chunked"] = median / chunked["median_s"]
    benchmark.extra_info.update(info)
    return info


def _check(op, impl, out, p: Problem, size):
    dh = p.hidden.grad.float().clone()  # before reference(), which may run eager and reset the grads
    ref_out, ref_dh = reference(op, p)
    tol = 2e-4 if size.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref_out, rtol=tol, atol=tol, msg=lambda m: f"{op}/{impl}: {m}")
    err = (dh - ref_dh).norm() / ref_dh.norm().clamp_min(1e-30)
    limit = 1e-4 if size.dtype == torch.float32 else 3e-2
    assert err < limit, f"{op}/{impl}: d hidden rel. error {err:.3g}"


# ----------------------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_fwd_bwd(benchmark, op, impl, problem, size, device, matmul_rate):
    reason = skip_reason(op, impl, device)
    if reason:
        pytest.skip(reason)
    reference(op, problem)  # the oracle first, outside the timed rounds
    benchmark.group = f"{op} fwd+bwd {size.name}"
    step = make_step(op, impl, problem)
    out = benchmark.pedantic(step, setup=problem.reset_grads, rounds=bench_rounds(), iterations=1,
                             warmup_rounds=1)
    _check(op, impl, out, problem, size)
    info = _report(benchmark, op, impl, problem, size, device, matmul_rate)
    SESSION_RESULTS[(op, impl)] = info
    problem.reset_grads()


@pytest.mark.parametrize("library", ["torch.mm", "ptkernels"])
def test_gemm_floor(benchmark, library, problem, size, device, matmul_rate):
    """The three GEMMs of useful work alone (h @ W.T, dz @ W, dz.T @ h), timed like the cases above, on
    ``torch.mm`` and on ptkernels' GEMMs (oneDNN for fp32 on CPU; the same torch.mm elsewhere)."""
    if library not in gemm_libraries(device, size.dtype):
        pytest.skip(f"{library} is torch.mm on {device.type} in {size.dtype}")
    step = _gemm_floor_step(problem, size, device, library)
    benchmark.group = f"gemm floor {size.name}"
    benchmark.pedantic(step, rounds=bench_rounds(), iterations=1, warmup_rounds=1)
    median = _median_seconds(benchmark)
    flops = useful_flops(problem.n_valid, size.d, size.v)
    benchmark.extra_info.update({
        "median_s": median, "useful_flops": flops,
        "useful_tflops": flops / median / 1e12 if median else None,
        "floor_s": matmul_rate.floor_seconds(flops),
        "time_over_floor": median / matmul_rate.floor_seconds(flops) if median else None,
        **matmul_rate.as_info(),
    })
    SESSION_RESULTS[("gemm_floor", f"3 x {library}")] = {
        "median_s": median, "peak_mem_bytes": None, "useful_tflops": benchmark.extra_info["useful_tflops"],
        "time_over_floor": benchmark.extra_info["time_over_floor"]}


SWEEP_CHUNKS = (64, 128, 256, 512, 1024, 2048, 4096)


@pytest.mark.chunk_sweep
@pytest.mark.parametrize("chunk_size", SWEEP_CHUNKS)
@pytest.mark.parametrize("op", OPS)
def test_chunk_size_sweep(benchmark, op, chunk_size, problem, size, device, matmul_rate):
    """ptkernels (auto backend) over chunk sizes; the default is ops.chunking.default_chunk_size."""
    impl = "ptk-" + resolve_backend("auto", device)
    reference(op, problem)  # the oracle first, outside the timed rounds
    benchmark.group = f"{op} chunk-size sweep {size.name}"
    step = make_step(op, impl, problem, chunk_size)
    out = benchmark.pedantic(step, setup=problem.reset_grads, rounds=bench_rounds(), iterations=1,
                             warmup_rounds=1)
    _check(op, impl, out, problem, size)
    info = _report(benchmark, op, impl, problem, size, device, matmul_rate, chunk_size)
    SESSION_RESULTS[(op, f"{impl} chunk={chunk_size}")] = info
    problem.reset_grads()



def _gemm_floor_step(problem: Problem, size, device, library: str = "torch.mm"):
    """The three unchunked GEMMs on ``library`` (see _measure.three_gemms) as one step."""
    h = problem.hidden.detach()[: problem.n_valid].contiguous()
    w = problem.weight.detach()
    dz = torch.empty(problem.n_valid, size.v, dtype=size.dtype, device=device).normal_(std=1e-4)
    gemms = list(three_gemms(h, w, dz, library).values())

    def step():
        for f in gemms:
            f()
        sync(device)

    return step


@pytest.mark.interleaved
@pytest.mark.parametrize("op", OPS)
def test_interleaved(benchmark, op, problem, size, device, request):
    """Every implementation (and the 3-GEMM floor) once per round, the order rotating every round.

    On a shared machine the load changes from one case to the next; here each round sees about the same
    load for all, and the ratio of two implementations is taken within each round (its median reported).
    """
    entries = {impl: make_step(op, impl, problem) for impl in IMPLS if skip_reason(op, impl, device) is None}
    if request.config.getoption("--chunk-sweep"):
        auto = "ptk-" + resolve_backend("auto", device)
        for c in SWEEP_CHUNKS:
            entries[f"{auto} chunk={c}"] = make_step(op, auto, problem, c)
    # The floor on each GEMM library: ratios are to the fastest one ("gemm_floor"), the others are shown.
    libraries = gemm_libraries(device, size.dtype)
    floors = {lib: _gemm_floor_step(problem, size, device, lib) for lib in libraries}
    for lib, step in floors.items():
        entries[f"gemm_floor {lib}"] = step
    names = list(entries)
    times: dict[str, list[float]] = {k: [] for k in names}
    state = {"round": 0}

    def rotation(record=True):
        k = state["round"] % len(names)
        state["round"] += 1
        for name in names[k:] + names[:k]:
            problem.reset_grads()
            t0 = time.perf_counter()
            entries[name]()
            if record:
                times[name].append(time.perf_counter() - t0)
        problem.reset_grads()

    rotation(record=False)  # warm-up: every implementation once
    benchmark.group = f"{op} round-robin {size.name}"
    benchmark.pedantic(rotation, rounds=bench_rounds(), iterations=1, warmup_rounds=0)

    fastest = min((f"gemm_floor {lib}" for lib in libraries), key=lambda k: statistics.median(times[k]))
    times["gemm_floor"] = times[fastest]

    def ratio(name, base):
        if base not in times:
            return None
        return statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))

    rows = {}
    for name in names + ["gemm_floor"]:
        rows[name] = {"median_s": statistics.median(times[name]), "min_s": min(times[name]),
                      "x_eager": ratio(name, "eager"), "x_torch_chunked": ratio(name, "torch_chunked"),
                      "x_floor": ratio(name, "gemm_floor"), "rounds": len(times[name]),
                      "times_s": times[name]}
    INTERLEAVED_RESULTS[op] = rows
    benchmark.extra_info.update({"op": op, "size": size.name, "n_valid": problem.n_valid,
                                 "round_robin": rows})

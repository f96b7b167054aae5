"""fwd+bwd of ``linear_jsd`` (generalized JSD between a teacher's and a student's heads, as in TRL's GKD and
Liger-Kernel's LigerFusedLinearJSD) beside eager PyTorch.

    eager          ptkernels.reference.linear_jsd: both models' full logits, log-softmax, the generalized JSD
    ptk-<backend>  ptkernels on each usable backend except "reference" and the Triton interpreter

Size: the token-level size of this device (conftest.bench_size: CPU N=4096 tokens with 25% labels = -100,
D=512, V=32000, fp32; GPU N=8192, D=4096, V=128256, bf16), student and teacher of the same shapes, beta = 0.5.
Gradients of the student's hidden states and head. ``extra_info``: median, peak memory (CUDA
max_memory_allocated growth; CPU peak RSS growth of a fresh subprocess), useful TFLOP/s over
8 * N_valid * D * V (the student's three GEMMs and the teacher's one), time over the GEMM floor,
``time_x_eager``, ``mem_x_eager``. Times are never asserted; each case checks its loss and gradients against eager.
"""

from __future__ import annotations

import pytest
import torch
from _measure import useful_flops
from conftest import (
    DEVICE,
    DTYPES,
    PTK_BACKENDS,
    WARMUP_SIZE,
    Leaves,
    bench_size,
    fwd_bwd,
    ptk_skip_reason,
    run_case,
)

import ptkernels
from ptkernels import reference
from ptkernels.ops import backends

IGNORE, BETA = -100, 0.5
IMPLS = ("eager",) + tuple(f"ptk-{b}" for b in PTK_BACKENDS)


class Problem(Leaves):
    """Student hidden [N, D] and head [V, D] (requiring grad), the teacher's near them, labels [N]."""

    def __init__(self, n: int, d: int, v: int, masked: float, dtype, device=DEVICE, seed: int = 0):
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        g = torch.Generator(device="cpu").manual_seed(seed)
        hidden = torch.randn(n, d, generator=g)
        weight = torch.randn(v, d, generator=g) * d ** -0.5
        self.ref_hidden = (hidden + 0.1 * torch.randn(n, d, generator=g)).to(device=device, dtype=dtype)
        self.ref_weight = (weight + 0.01 * torch.randn(v, d, generator=g)).to(device=device, dtype=dtype)
        self.hidden = hidden.to(device=device, dtype=dtype).requires_grad_()
        self.weight = weight.to(device=device, dtype=dtype).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=g)
        labels[torch.randperm(n, generator=g)[: int(n * masked)]] = IGNORE
        self.labels = labels.to(device)
        self.n_valid = int((labels != IGNORE).sum())
        self.leaves = (self.hidden, self.weight)


def make_step(op: str, impl: str, p: Problem):
    args = (p.hidden, p.weight, p.ref_hidden, p.ref_weight)
    kw = dict(labels=p.labels, beta=BETA, ignore_index=IGNORE)
    if impl == "eager":
        fn = lambda: reference.linear_jsd(*args, **kw)  # noqa: E731
    else:
        fn = lambda: ptkernels.linear_jsd(*args, backend=impl[4:], **kw)  # noqa: E731

    def objective():
        out = fn()
        return out, out

    return fwd_bwd(objective, p.hidden.device)


def memory_case(op: str, impl: str, n: int, d: int, v: int, masked: float, dtype: str, device: str = "cpu"):
    """Factory for _measure.peak_rss_growth: builds the problem in the (fresh) process, returns its step."""
    return make_step(op, impl, Problem(n, d, v, masked, dtype, device))


@pytest.fixture(scope="module")
def problem(size) -> Problem:
    return Problem(size.n, size.d, size.v, size.masked, size.dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_jsd_fwd_bwd(benchmark, impl, problem, size, matmul_rate):
    reason = ptk_skip_reason(impl[4:], DEVICE) if impl.startswith("ptk-") else None
    if impl.startswith("ptk-") and reason is None and getattr(backends.module(impl[4:]), "JSD_ROWS", None) is None:
        reason = f"backend {impl[4:]!r} has no linear_jsd row kernels (ptkernels.ops.backends.get raises)"
    if reason:
        pytest.skip(reason)
    flops = useful_flops(problem.n_valid, size.d, size.v) * 8 / 6  # + the teacher's logits GEMM
    info = run_case(benchmark, module_file=__file__, op="linear_jsd", impl=impl, problem=problem,
                    make_step=lambda i: make_step("linear_jsd", i, problem), size=bench_size().as_kwargs(),
                    warmup_size=WARMUP_SIZE.as_kwargs(), tol=1e-4 if size.dtype == torch.float32 else 3e-2,
                    info={"n_valid": problem.n_valid, "beta": BETA, "useful_flops": flops,
                          "floor_s": matmul_rate.floor_seconds(flops), **matmul_rate.as_info()})
    median = info["median_s"]
    if median:
        extra = {"useful_tflops": flops / median / 1e12, "time_over_floor": median / matmul_rate.floor_seconds(flops)}
        benchmark.extra_info.update(extra)
        info.update(extra)

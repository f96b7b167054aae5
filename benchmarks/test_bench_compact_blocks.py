"""``memory="compact"``'s block shape: the fused CE's time against the GEMM floor and its peak memory against
dX + dW, for each (fp32 accumulator bytes, logits per tile) of a grid (ops/core/vocab_blocks.py: ``ACC_BYTES``,
``TILE_LOGITS``, which ``block_shape`` turns into vocabulary columns per block and rows per tile).

    pytest benchmarks/test_bench_compact_blocks.py --benchmark-only --compact-blocks
    (scripts/gpu_session.sh runs it as its compact_blocks stage)

Why: on the H200 (2026-12-04, N=8192, D=4096, V=128256, bf16) compact CE ran at 50-63% of the matmul rate, where
its four GEMMs for three useful allow 75%; the block shape there was set by reasoning (every GEMM side >= 2048,
~128 MiB over the floor), never measured against others. Each case sets both figures for this process's device
only (restored after the case), runs fwd+bwd with ``memory="compact"`` on the device's default backend at the
benchmark size (benchmarks/README.md), checks the loss and both gradients against the default path, and records
``share_of_matmul_rate`` (the floor's time over the case's), the block shape and, on CUDA, ``mem_x_grad_floor``
(peak allocated over dX + dW in the inputs' dtype; the target is <= 1.2). CPU: time only (its peak RSS figure
needs a fresh process per case), a check that the cases run.
"""

from __future__ import annotations

import pytest
import torch
from _measure import cuda_peak_growth, sync, useful_flops
from conftest import DEVICE, bench_rounds, median_seconds, ptk_skip_reason
from test_bench_linear_cross_entropy import IGNORE, Problem

import ptkernels
from ptkernels.ops.core import vocab_blocks

MIB = 1 << 20
# (accumulator MiB, logits per tile): the current setting of each device among them
GRID = {
    "cuda": [(acc, tile) for acc in (16, 32, 64, 128) for tile in (1 << 23, 1 << 24, 1 << 25)],
    "cpu": [(acc, tile) for acc in (4, 16) for tile in (1 << 21, 1 << 22)],
}
BACKEND = "triton" if DEVICE.type == "cuda" else "native"

pytestmark = pytest.mark.compact_blocks


def _case_id(case) -> str:
    acc, tile = case
    return f"acc{acc}MiB-tile2^{tile.bit_length() - 1}"


@pytest.fixture(scope="module")
def problem(size, device):
    reason = ptk_skip_reason(BACKEND, device)
    if reason:
        pytest.skip(reason)
    return Problem(size.n, size.d, size.v, size.masked, size.dtype, device)


@pytest.fixture(scope="module")
def reference(problem):
    """Loss and gradients of the default path (its fp32 [V, D] accumulator), the figures every shape must give."""
    p = problem
    p.reset_grads()
    loss = ptkernels.linear_cross_entropy(p.hidden, p.weight, p.labels, ignore_index=IGNORE, backend=BACKEND)
    loss.backward()
    out = (loss.detach().float(), p.hidden.grad.float().clone(), p.weight.grad.float().clone())
    p.reset_grads()
    return out


@pytest.mark.parametrize("case", GRID[DEVICE.type], ids=[_case_id(c) for c in GRID[DEVICE.type]])
def test_compact_block_shape(benchmark, case, problem, reference, size, device, matmul_rate, monkeypatch):
    acc_mib, tile = case
    kind = "cuda" if device.type == "cuda" else "cpu"
    monkeypatch.setitem(vocab_blocks.ACC_BYTES, kind, acc_mib * MIB)
    monkeypatch.setitem(vocab_blocks.TILE_LOGITS, kind, tile)
    vb, rows = vocab_blocks.block_shape(size.v, size.d, device)
    p = problem

    def step():
        loss = ptkernels.linear_cross_entropy(p.hidden, p.weight, p.labels, ignore_index=IGNORE, memory="compact",
                                              backend=BACKEND)
        loss.backward()
        sync(device)
        return loss.detach()

    benchmark.group = f"compact block shape {device.type}-{size.name}"
    loss = benchmark.pedantic(step, setup=p.reset_grads, rounds=bench_rounds(), iterations=1, warmup_rounds=1)
    # the same sums in another order: the default path's figures within the dtype's rounding of a long sum
    tol = 2e-2 if size.dtype != torch.float32 else 1e-4
    ref_loss, ref_dh, ref_dw = reference
    torch.testing.assert_close(loss.float(), ref_loss, rtol=tol, atol=tol)
    for name, got, want in (("dX", p.hidden.grad, ref_dh), ("dW", p.weight.grad, ref_dw)):
        err = float((got.float() - want).norm() / want.norm().clamp_min(1e-30))
        assert err < tol, f"compact {_case_id(case)}: {name} rel. error {err:.3g} against the default path"
    median = median_seconds(benchmark)
    floor_s = matmul_rate.floor_seconds(useful_flops(p.n_valid, size.d, size.v))
    grad_floor = (size.n + size.v) * size.d * p.hidden.element_size()
    info = {"acc_bytes": acc_mib * MIB, "tile_logits": tile, "vocab_block": vb, "rows_per_tile": rows,
            "median_s": median, "share_of_matmul_rate": floor_s / median if median else None,
            "grad_floor_bytes": grad_floor}
    if device.type == "cuda":
        peak = cuda_peak_growth(step, device, reset=p.reset_grads)
        info.update(peak_mem_mib=peak / MIB, mem_x_grad_floor=peak / grad_floor)
    p.reset_grads()
    benchmark.extra_info.update(info)

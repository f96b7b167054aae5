"""GPU-only checks: skipped without CUDA (never faked). Run them with scripts/gpu_session.sh when a GPU is lent."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ptkernels as ptk
from ptkernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(n, d, v, dtype, masked=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g)).to("cuda", dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d ** -0.5).to("cuda", dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < masked] = -100
    return h, w, y.cuda()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_llama3_vocab_no_worse_than_eager(backend):
    h, w, y = _inputs(512, 256, 128_256, torch.bfloat16)
    ours = ptk.linear_cross_entropy(h, w, y, backend=backend)
    g_ours = torch.autograd.grad(ours, (h, w))
    eager = F.cross_entropy(F.linear(h, w).float(), y)
    g_eager = torch.autograd.grad(eager, (h, w))
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    truth = reference.linear_cross_entropy(h64, w64, y)
    g_truth = torch.autograd.grad(truth, (h64, w64))
    assert (ours.double() - truth).abs() <= (eager.double() - truth).abs() + 1e-3 * truth.abs()
    for a, e, t in zip(g_ours, g_eager, g_truth):
        assert (a.double() - t).norm() <= 1.1 * (e.double() - t).norm() + 1e-3 * t.norm()


def test_triton_fp32_matches_reference_with_every_option():
    h, w, y = _inputs(300, 64, 50_257, torch.float32)
    kw = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0, temperature=0.9)
    for reduction in ("mean", "none"):
        ours = ptk.linear_cross_entropy(h, w, y, reduction=reduction, backend="triton", **kw)
        h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
        truth = reference.linear_cross_entropy(h64, w64, y, reduction=reduction, **kw)
        torch.testing.assert_close(ours.double(), truth, rtol=1e-4, atol=1e-5)
        go = torch.rand_like(ours)
        g = torch.autograd.grad(ours, (h, w), go)
        t = torch.autograd.grad(truth, (h64, w64), go.double())
        for a, b in zip(g, t):
            torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-5 * b.abs().max().item())


def test_sync_free_under_cuda_graph_capture():
    h, w, y = _inputs(256, 64, 32_000, torch.bfloat16)
    h, w = h.detach(), w.detach()
    expected = ptk.linear_cross_entropy(h, w, y)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture (Triton compiles here)
        ptk.linear_cross_entropy(h, w, y, sync_free=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ptk.linear_cross_entropy(h, w, y)  # sync_free=None turns itself on while capturing
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# Value checks that on CUDA are device-side asserts (torch._assert_async or an assert in a kernel: no host
# synchronization). Each case must fail at the next synchronization, naming what is wrong where the assert can
# carry a message. A device-side assert ends the process's CUDA context, so each runs in its own process.
DEVICE_CHECKS = {
    "linear_cross_entropy labels": (
        "h = torch.randn(4, 8, device='cuda'); w = torch.randn(16, 8, device='cuda')\n"
        "ptk.linear_cross_entropy(h, w, torch.tensor([0, 1, 99, -100], device='cuda'), sync_free=True)\n"),
    "linear_cross_entropy labels, counting valid tokens": (
        "h = torch.randn(4, 8, device='cuda'); w = torch.randn(16, 8, device='cuda')\n"
        "ptk.linear_cross_entropy(h, w, torch.tensor([0, 1, -7, -100], device='cuda'))\n"),
    "linear_token_logprobs targets": (
        "h = torch.randn(4, 8, device='cuda'); w = torch.randn(16, 8, device='cuda')\n"
        "ptk.linear_token_logprobs(h, w, torch.tensor([0, 16, 1, -100], device='cuda'))\n"),
    "cross_entropy labels": (
        "ptk.cross_entropy(torch.randn(3, 16, device='cuda'), torch.tensor([0, 16, 1], device='cuda'))\n"),
    "packed_sequence_logprobs cu_seqlens": (
        "ptk.packed_sequence_logprobs(torch.randn(10, device='cuda'), torch.tensor([0, 6, 4, 10], device='cuda'))\n"),
    "fused_linear_preference_loss labels": (
        "h = torch.randn(2, 3, 8, device='cuda'); w = torch.randn(16, 8, device='cuda')\n"
        "ptk.fused_linear_preference_loss(h, w, torch.full((2, 3), 16, device='cuda'),\n"
        "                                 ref_chosen_logps=torch.zeros(1, device='cuda'),\n"
        "                                 ref_rejected_logps=torch.zeros(1, device='cuda'))\n"),
    "masked_var count": (
        "ptk.masked_var(torch.randn(2, 3, device='cuda'), torch.zeros(2, 3, dtype=torch.bool, device='cuda'))\n"),
}


@pytest.mark.parametrize("case", list(DEVICE_CHECKS))
def test_bad_values_fail_on_the_device_without_a_host_sync(case):
    code = "import torch, ptkernels as ptk\n" + DEVICE_CHECKS[case] + "torch.cuda.synchronize()\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, f"{case}: no error"
    assert "assert" in out.stderr.lower(), f"{case}: {out.stderr[-2000:]}"


def test_memory_stays_near_the_floor():
    """Peak memory of fwd+bwd is about dX + dW (fp32 accumulator) + one chunk of logits, never [N, V]."""
    n, d, v = 4096, 1024, 128_256
    h, w, y = _inputs(n, d, v, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = ptk.linear_cross_entropy(h, w, y, chunk_size=1024)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    floor = n * d * 2 + v * d * (4 + 2) + 1024 * v * 2  # dX bf16, dW fp32 + bf16 copy, one chunk of logits
    full_logits = n * v * 2
    assert peak < floor + full_logits // 4, (peak, floor)

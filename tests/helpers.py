"""Shared test helpers: which backends to test, and comparisons against a float64 truth."""

import torch

import ptkernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Every usable fused backend on this machine; "triton" is usable on CPU through the interpreter (conftest).
FUSED_BACKENDS = [b for b in ("torch", "triton", "native") if b in ptkernels.backends(DEVICE)]


def rand(*shape, dtype=torch.float64, requires_grad=True, scale=1.0, device=None):
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device or DEVICE, dtype=dtype)
    return t.requires_grad_(requires_grad)


def labels_with_mask(shape, num_classes, ignore_every=3, ignore_index=-100):
    y = torch.randint(0, num_classes, shape)
    if ignore_every:
        y.view(-1)[::ignore_every] = ignore_index
    return y.to(DEVICE)


def assert_close_to_truth(ours, truth, rtol=1e-5, what=""):
    """``ours`` within ``rtol`` of ``truth`` (float64), relative to truth's largest magnitude."""
    ours = ours.detach().double()
    truth = truth.detach().double()
    assert ours.shape == truth.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    scale = truth.abs().max().clamp(min=1e-12) if truth.numel() else 1.0
    err = (ours - truth).abs().max() if truth.numel() else torch.zeros(())
    assert err <= rtol * scale + 1e-12, f"{what}: max error {err:.3e} > {rtol:g} x {float(scale):.3e}"


def grads(outputs, inputs, grad_outputs):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=False)


def bf16_store_slack(backend, dtype) -> float:
    """Triton's CPU interpreter rounds fp32 -> bf16 stores toward zero (the GPU rounds to nearest even), which
    doubles the rounding error of a bf16 gradient written by a Triton kernel. Tests allow for that there only."""
    from ptkernels.ops.core.dispatch import triton_interpreting

    if backend == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu" and triton_interpreting():
        return 2.0
    return 1.0

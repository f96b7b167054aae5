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


# Tolerances are rules against a float64 truth that hold on any CPU, never multiples of the error eager PyTorch
# happens to make on the host that runs the tests: that error depends on the BLAS kernel (MKL sums a GEMM's K
# dimension in one sequential chain on AMD EPYC and in split chains on an AVX-512 Xeon: 1e-4 against 3e-6 for the
# same 70,001-term input gradient) and on ATen's vector width (8 or 16 lanes per softmax sum).
#
# The rule behind them (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5 and Lemma 3.1):
# a sum or dot product of k terms computed in floating point, in ANY order of additions (sequential, blocked,
# pairwise, any number of vector lanes or threads, with or without FMA), satisfies
#     |fl(sum x_i y_i) - sum x_i y_i| <= gamma_k * sum |x_i y_i|,    gamma_k = k u / (1 - k u),
# u the unit roundoff (2^-24 in fp32). It assumes IEEE arithmetic in the dtype (no bf16/TF32 down-conversion
# inside a fp32 GEMM: PyTorch's CPU default, torch.backends.mkldnn.matmul.fp32_precision == "ieee"). A bound
# built from gamma_k over the reduction lengths of a computation (D for the logits, V for a row's sum of exp or
# the input gradient, N for the weight gradient) therefore holds whatever library and CPU ran it. The fixed
# ``rtol`` of assert_close_to_truth is this rule for the tests' small shapes: fp32 reductions of at most a few
# hundred terms (k u <= ~2e-5 worst case, ~sqrt(k) u ~ 1e-6 for random data), against 1e-5 of the largest
# magnitude; a test with a longer reduction states its bound with ``gamma`` and ``assert_within``.


def unit_roundoff(dtype=torch.float32) -> float:
    """u: the largest relative error of one rounding to nearest in ``dtype`` (2^-24 for fp32, 2^-8 for bf16)."""
    return torch.finfo(dtype).eps / 2


def gamma(k: int, dtype=torch.float32) -> float:
    """Higham's gamma_k = k u / (1 - k u): the relative error bound of a k-term sum in any order (see above)."""
    ku = k * unit_roundoff(dtype)
    assert ku < 1, f"gamma_{k} is undefined in {dtype} (k u >= 1)"
    return ku / (1 - ku)


def assert_within(ours, truth, bound, what=""):
    """Elementwise ``|ours - truth| <= bound`` (float64), ``bound`` a tensor of truth's shape or a number."""
    ours, truth = ours.detach().double(), truth.detach().double()
    assert ours.shape == truth.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    bound = torch.as_tensor(bound, dtype=torch.float64, device=truth.device)
    err = (ours - truth).abs()
    excess = err - bound
    if excess.numel() and excess.max() > 0:
        i = int(excess.argmax())
        flat_bound = bound.expand_as(err).reshape(-1)
        raise AssertionError(f"{what}: error {float(err.reshape(-1)[i]):.3e} > bound "
                             f"{float(flat_bound[i]):.3e} at flat index {i}")


def assert_close_to_truth(ours, truth, rtol=1e-5, what=""):
    """``ours`` within ``rtol`` of ``truth`` (float64), relative to truth's largest magnitude (the rule: see the
    comment above ``unit_roundoff``)."""
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

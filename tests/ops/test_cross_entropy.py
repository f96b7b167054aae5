"""cross_entropy from logits on every fused backend against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

import ptkernels as ptk
from ptkernels import reference
from tests.helpers import (
    DEVICE,
    FUSED_BACKENDS,
    assert_close_to_truth,
    bf16_store_slack,
    labels_with_mask,
    rand,
)

OPTIONS = {"plain": {}, "all": dict(label_smoothing=0.1, z_loss=1e-3, softcap=6.0, temperature=0.8)}


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_reference(backend, reduction, option):
    logits = rand(2, 19, 251, scale=4.0)
    labels = labels_with_mask((2, 19), 251)
    kw = dict(reduction=reduction, **OPTIONS[option])
    ours = ptk.cross_entropy(logits, labels, chunk_size=7, backend=backend, **kw)
    truth = reference.cross_entropy(logits, labels, **kw)
    g = torch.randn(truth.shape, dtype=torch.float64, device=truth.device)
    rtol = 1e-10 if backend == "torch" else 1e-6
    assert_close_to_truth(ours, truth, rtol, "loss")
    assert_close_to_truth(torch.autograd.grad(ours, logits, g)[0], torch.autograd.grad(truth, logits, g)[0],
                          rtol, "grad")


def test_reference_agrees_with_pytorch():
    """The reference's semantics are PyTorch's F.cross_entropy where both define the loss."""
    logits = rand(40, 97)
    labels = labels_with_mask((40,), 97)
    for red in ("mean", "sum", "none"):
        for eps in (0.0, 0.3):
            ours = reference.cross_entropy(logits, labels, reduction=red, label_smoothing=eps)
            torch_ = F.cross_entropy(logits, labels, reduction=red, label_smoothing=eps)
            assert_close_to_truth(ours, torch_, 1e-12, f"{red} eps={eps}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_writes_the_gradient_over_the_logits(backend, reduction):
    base = rand(16, 101, requires_grad=False, dtype=torch.float32)
    labels = labels_with_mask((16,), 101)
    leaf = base.clone().requires_grad_()
    expected = torch.autograd.grad(reference.cross_entropy(leaf, labels, reduction=reduction).sum(), leaf)[0]
    logits = base.clone().requires_grad_()
    work = logits * 1.0  # a non-leaf whose storage the op may overwrite
    loss = ptk.cross_entropy(work, labels, reduction=reduction, inplace_backward=True, backend=backend)
    loss.sum().backward()
    assert_close_to_truth(logits.grad, expected, 1e-5, "grad")
    assert torch.equal(work.detach(), logits.grad)  # the gradient lives where the logits were


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_vocab_above_65536(backend):
    logits = rand(3, 70_001, dtype=torch.float32, scale=3.0)
    labels = torch.tensor([70_000, -100, 65_537], device=DEVICE)
    ours = ptk.cross_entropy(logits, labels, reduction="sum", backend=backend)
    truth = reference.cross_entropy(logits.detach().double(), labels, reduction="sum")
    assert_close_to_truth(ours, truth, 1e-5, "loss")
    g, = torch.autograd.grad(ours, logits)
    l64 = logits.detach().double().requires_grad_()
    t, = torch.autograd.grad(reference.cross_entropy(l64, labels, reduction="sum"), l64)
    assert_close_to_truth(g, t, 1e-5, "grad")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_bf16_no_worse_than_eager(backend):
    logits = rand(64, 509, dtype=torch.bfloat16, scale=5.0)
    labels = labels_with_mask((64,), 509)
    ours = ptk.cross_entropy(logits, labels, backend=backend)
    g_ours, = torch.autograd.grad(ours, logits)
    eager = F.cross_entropy(logits, labels)
    g_eager, = torch.autograd.grad(eager, logits)
    l64 = logits.detach().double().requires_grad_()
    truth = reference.cross_entropy(l64, labels)
    g_truth, = torch.autograd.grad(truth, l64)
    assert (ours.double() - truth).abs() <= (eager.double() - truth).abs() + 1e-4
    slack = 1.1 * bf16_store_slack(backend, torch.bfloat16)
    assert (g_ours.double() - g_truth).norm() <= slack * (g_eager.double() - g_truth).norm() + 1e-6

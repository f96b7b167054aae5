"""Under ``torch.no_grad()`` / ``torch.inference_mode()`` the fused ops form no gradients, even when the head
requires grad (``ctx.needs_input_grad`` would say it does): only the forward GEMMs run, the values are those
of grad mode, and ``cross_entropy(inplace_backward=True)`` leaves the caller's logits untouched."""

import pytest
import torch

import ptkernels as ptk
from ptkernels.ops.core.grad_mode import for_autograd
from tests.helpers import DEVICE, FUSED_BACKENDS

from .test_fused_grpo_options import _gemm_count

N, D, V, B, T = 12, 16, 40, 4, 3


def _head(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g, dtype=dtype).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, D, generator=g, dtype=dtype) * 0.3).to(DEVICE).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    return hidden, weight, labels.to(DEVICE)


def _calls():
    """name -> a call of a fused op that forms gradients in its forward pass when grad mode is on."""
    hidden, weight, labels = _head()
    ref_hidden = hidden.detach() + 0.1
    ids = labels.clamp(min=0)[: B * T].view(B, T)
    mask = torch.ones(B, T, device=DEVICE)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64, device=DEVICE)
    zeros2 = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    pairs = labels[:8].view(4, 2)  # 2 pairs (chosen rows first), 2 tokens each
    return {
        "linear_cross_entropy": lambda b: ptk.linear_cross_entropy(hidden, weight, labels, backend=b),
        "linear_jsd": lambda b: ptk.linear_jsd(hidden, weight, ref_hidden, weight.detach(), labels=labels,
                                               backend=b),
        "fused_linear_grpo_loss": lambda b: ptk.fused_linear_grpo_loss(
            hidden[: B * T].view(B, T, D), weight, ids, mask, adv, backend=b).loss,
        "fused_linear_preference_loss": lambda b: ptk.fused_linear_preference_loss(
            hidden[:8].view(4, 2, D), weight, pairs, ref_chosen_logps=zeros2, ref_rejected_logps=zeros2,
            backend=b).loss,
        "linear_token_logprobs": lambda b: ptk.linear_token_logprobs(hidden, weight, labels, backend=b),
    }


CASES = [(name, b) for name in _calls() for b in FUSED_BACKENDS
         if not (name == "linear_jsd" and b == "native")]  # (native has no JSD rows: the torch ones serve)


@pytest.mark.parametrize("name,backend", CASES)
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_runs_only_the_forward_gemms(name, mode, backend):
    call = _calls()[name]
    with torch.no_grad():
        wanted = call(backend)
    grad_value = call(backend)
    with mode():
        n_no_grad = _gemm_count(lambda: call(backend))
        got = call(backend)
    n_grad = _gemm_count(lambda: call(backend))
    assert got.grad_fn is None
    torch.testing.assert_close(got, wanted, rtol=0, atol=0)
    torch.testing.assert_close(got, grad_value.detach(), rtol=1e-12, atol=1e-12)
    # grad mode forms dX (and dW) in its forward pass for these ops (token log-probs: only keeps the logits)
    assert n_no_grad <= n_grad
    if name != "linear_token_logprobs":
        assert n_no_grad < n_grad, (n_no_grad, n_grad)


def test_inplace_cross_entropy_leaves_the_logits_alone_without_grad():
    logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    before = logits.detach().clone()
    labels = torch.randint(0, V, (N,))
    with torch.no_grad():
        loss = ptk.cross_entropy(logits, labels, inplace_backward=True)
    assert torch.equal(logits.detach(), before)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(before, labels))


def test_for_autograd_detaches_only_without_grad():
    x = torch.ones(2, requires_grad=True)
    assert for_autograd(x, None)[0] is x
    with torch.no_grad():
        y, none = for_autograd(x, None)
    assert none is None and not y.requires_grad and y.data_ptr() == x.data_ptr()

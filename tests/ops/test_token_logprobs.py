"""linear_token_logprobs and token_logprobs on every fused backend against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

import ptkernels as ptk
from ptkernels import reference
from tests.helpers import DEVICE, FUSED_BACKENDS, assert_close_to_truth, labels_with_mask, rand

N, D, V = 37, 19, 251
OPTIONS = {"plain": {}, "softcap": dict(softcap=3.0), "temperature": dict(temperature=0.6),
           "both": dict(softcap=5.0, temperature=1.4)}


def _outputs_and_grads(fn, first, inputs, targets, entropy, **kw):
    out = fn(*first, targets, return_entropy=entropy, **kw)
    out = out if entropy else (out,)
    gen = torch.Generator().manual_seed(3)
    gos = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in out]
    return out, torch.autograd.grad(out, inputs, gos)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("entropy", [False, True])
def test_linear_token_logprobs_matches_reference(backend, option, entropy):
    hidden, weight, bias = rand(N, D), rand(V, D), rand(V)
    targets = labels_with_mask((N,), V)
    kw = OPTIONS[option]
    ours, ours_g = _outputs_and_grads(ptk.linear_token_logprobs, (hidden, weight), (hidden, weight, bias),
                                      targets, entropy, bias=bias, chunk_size=8, backend=backend, **kw)
    truth, truth_g = _outputs_and_grads(reference.linear_token_logprobs, (hidden, weight),
                                        (hidden, weight, bias), targets, entropy, bias=bias, **kw)
    rtol = 1e-10 if backend == "torch" else 1e-6
    for a, b in zip(ours, truth):
        assert_close_to_truth(a, b, rtol, "output")
    for name, a, b in zip(("hidden", "weight", "bias"), ours_g, truth_g):
        assert_close_to_truth(a, b, rtol, f"grad {name}")
    assert torch.equal(ours[0][targets == -100], torch.zeros_like(ours[0][targets == -100]))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("entropy", [False, True])
def test_token_logprobs_from_logits_matches_reference(backend, entropy):
    logits = rand(3, 13, V, scale=3.0)
    targets = labels_with_mask((3, 13), V)
    ours, ours_g = _outputs_and_grads(ptk.token_logprobs, (logits,), (logits,), targets, entropy,
                                      temperature=0.9, chunk_size=5, backend=backend)
    truth, truth_g = _outputs_and_grads(reference.token_logprobs, (logits,), (logits,), targets, entropy,
                                        temperature=0.9)
    rtol = 1e-10 if backend == "torch" else 1e-6
    for a, b in zip(ours, truth):
        assert a.shape == (3, 13)
        assert_close_to_truth(a, b, rtol, "output")
    assert_close_to_truth(ours_g[0], truth_g[0], rtol, "grad logits")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_float32_and_entropy_only_gradient(backend):
    """A loss on the entropy alone (an entropy bonus) must still backpropagate correctly."""
    hidden, weight = rand(N, D, dtype=torch.float32), rand(V, D, dtype=torch.float32)
    targets = labels_with_mask((N,), V)
    _, ent = ptk.linear_token_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    g = torch.autograd.grad(ent.sum(), (hidden, weight))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    _, ent64 = reference.linear_token_logprobs(h64, w64, targets, return_entropy=True)
    g64 = torch.autograd.grad(ent64.sum(), (h64, w64))
    assert_close_to_truth(ent, ent64, 1e-5, "entropy")
    for a, b in zip(g, g64):
        assert_close_to_truth(a, b, 1e-5, "grad")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_bf16_no_worse_than_eager(backend):
    hidden, weight = rand(48, 32, dtype=torch.bfloat16, scale=2.0), rand(509, 32, dtype=torch.bfloat16)
    targets = labels_with_mask((48,), 509, ignore_every=4)
    ours = ptk.linear_token_logprobs(hidden, weight, targets, backend=backend)
    eager = torch.log_softmax(F.linear(hidden, weight), -1).gather(-1, targets.clamp(min=0)[:, None])[:, 0]
    eager = eager.masked_fill(targets == -100, 0)
    truth = reference.linear_token_logprobs(hidden.double(), weight.double(), targets)
    err_ours = (ours.double() - truth).abs().max()
    err_eager = (eager.double() - truth).abs().max()
    assert err_ours <= err_eager + 1e-3


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_sync_free_agrees(backend):
    hidden, weight = rand(N, D), rand(V, D)
    targets = labels_with_mask((N,), V)
    a = ptk.linear_token_logprobs(hidden, weight, targets, backend=backend, chunk_size=6)
    b = ptk.linear_token_logprobs(hidden, weight, targets, backend=backend, chunk_size=6, sync_free=True)
    assert_close_to_truth(b, a, 1e-12, "logp")
    ga = torch.autograd.grad(a.sum(), (hidden, weight))
    gb = torch.autograd.grad(b.sum(), (hidden, weight))
    for x, y in zip(gb, ga):
        assert_close_to_truth(x, y, 1e-12, "grad")


def test_all_ignored_gives_zeros():
    hidden, weight = rand(4, D), rand(V, D)
    targets = torch.full((4,), -100, device=DEVICE)
    logp, ent = ptk.linear_token_logprobs(hidden, weight, targets, return_entropy=True)
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(ent, torch.zeros_like(ent))
    gh, = torch.autograd.grad(logp.sum() + ent.sum(), (hidden,))
    assert torch.equal(gh, torch.zeros_like(gh))


# ------------------------------------------------------------------------ the small-shape fast path


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("option", [{}, dict(temperature=0.7), dict(softcap=3.0, temperature=1.3)])
@pytest.mark.parametrize("mask", ["some", "all"])
def test_fast_path_agrees_with_the_chunk_loop(monkeypatch, backend, entropy, option, mask):
    """Default (the one-chunk path: GEMM 1 once over every row, its logits kept for backward) vs the chunk
    loop (chunk_size=5) vs float64, with a bias, gradients of log-probs and entropy, masks, all ignored."""
    from ptkernels.ops.core import gemm

    seen = []
    real = gemm.logits
    monkeypatch.setattr(gemm, "logits", lambda h, w, b, out=None: seen.append(h.shape[0]) or real(h, w, b, out=out))
    hidden, weight, bias = rand(N, D), rand(V, D), rand(V)
    targets = labels_with_mask((N,), V) if mask == "some" else torch.full((N,), -100, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    w_lp = torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE)
    w_h = torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE)

    def run(fn, **kw):
        out = fn(hidden, weight, targets, bias=bias, return_entropy=entropy, **option, **kw)
        lp, h = out if entropy else (out, None)
        obj = (lp * w_lp).sum() + ((h * w_h).sum() if entropy else 0.0)
        return (lp, h), torch.autograd.grad(obj, (hidden, weight, bias))

    fast, fast_g = run(ptk.linear_token_logprobs, backend=backend)
    cpu_small = backend == "native" and DEVICE.type == "cpu"  # ops/small_head.py: the valid rows only
    rows = int((targets != -100).sum()) if cpu_small else N
    assert seen == [rows], "fast path: one GEMM 1 over the chunk's rows, none in backward"
    loop, loop_g = run(ptk.linear_token_logprobs, backend=backend, chunk_size=5)
    truth, truth_g = run(reference.linear_token_logprobs)
    for what, a, b, t in zip(("logp", "entropy", "dh", "dW", "db"), (*fast, *fast_g), (*loop, *loop_g),
                             (*truth, *truth_g)):
        if t is None:
            continue
        assert_close_to_truth(a, t, 1e-10, f"fast {what}")
        assert_close_to_truth(a, b, 1e-10, f"fast vs loop {what}")
        if mask == "all":
            assert not a.detach().abs().max() > 0, f"all ignored: {what} must be 0"


def test_fast_path_second_backward_reuses_the_kept_logits_intact():
    hidden, weight = rand(N, D), rand(V, D)
    targets = labels_with_mask((N,), V)
    lp = ptk.linear_token_logprobs(hidden, weight, targets, backend="torch")
    first = torch.autograd.grad(lp.sum(), (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(lp.sum(), (hidden, weight))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ kept chunk logits (3 GEMMs)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("entropy", [False, True])
def test_chunk_loop_keeps_small_logits_with_the_same_result(monkeypatch, backend, entropy):
    """The chunk loop (chunk_size=5) keeps each chunk's logits for backward when they fit KEEP_LOGITS_BYTES:
    backward runs no GEMM 1; with the budget at 0 it recomputes them. Both agree with float64 and each other, and
    a second backward finds the kept logits intact."""
    from ptkernels.ops import token_logprobs as tl
    from ptkernels.ops.core import gemm

    hidden, weight, bias = rand(N, D), rand(V, D), rand(V)
    targets = labels_with_mask((N,), V)
    g = torch.Generator().manual_seed(2)
    w_lp, w_h = (torch.randn(N, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    calls = []
    real = gemm.logits
    monkeypatch.setattr(gemm, "logits", lambda h, w, b, out=None: calls.append(h.shape[0]) or real(h, w, b, out=out))

    def run(fn, **kw):
        out = fn(hidden, weight, targets, bias=bias, return_entropy=entropy, **kw)
        lp, h = out if entropy else (out, None)
        obj = (lp * w_lp).sum() + ((h * w_h).sum() if entropy else 0.0)
        forward_calls = len(calls)
        grads = torch.autograd.grad(obj, (hidden, weight, bias), retain_graph=True)
        again = torch.autograd.grad(obj, (hidden, weight, bias))
        for a, b in zip(grads, again):
            assert torch.equal(a, b), "a second backward must see the same logits"
        return (lp, h), grads, len(calls) - forward_calls

    kept, kept_g, kept_gemm1 = run(ptk.linear_token_logprobs, backend=backend, chunk_size=5)
    monkeypatch.setattr(tl, "KEEP_LOGITS_BYTES", 0)
    calls.clear()
    again, again_g, again_gemm1 = run(ptk.linear_token_logprobs, backend=backend, chunk_size=5)
    truth, truth_g = run(reference.linear_token_logprobs)[:2]
    assert kept_gemm1 == 0 and again_gemm1 > 0, (kept_gemm1, again_gemm1)
    for what, a, b, t in zip(("logp", "entropy", "dh", "dW", "db"), (*kept, *kept_g), (*again, *again_g),
                             (*truth, *truth_g)):
        if t is None:
            continue
        assert_close_to_truth(a, t, 1e-10 if backend == "torch" else 1e-6, f"kept {what}")
        assert_close_to_truth(a, b, 1e-12, f"kept vs recomputed {what}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("weight_grad", [True, False])
def test_keeps_logits_up_to_the_weight_gradient_buffer(monkeypatch, backend, weight_grad):
    """Past KEEP_LOGITS_BYTES the chunk loop still keeps logits no larger than the weight gradient's fp32 buffer
    (V x D x 4 bytes), where that gradient is wanted: D valid rows of fp32 logits are kept, D + 1 are not, and
    without the weight's gradient neither is."""
    from ptkernels.ops import token_logprobs as tl
    from ptkernels.ops.core import gemm

    monkeypatch.setattr(tl, "KEEP_LOGITS_BYTES", 0)
    calls = []
    real = gemm.logits
    monkeypatch.setattr(gemm, "logits", lambda h, w, b, out=None: calls.append(h.shape[0]) or real(h, w, b, out=out))
    weight = rand(V, D, dtype=torch.float32, requires_grad=weight_grad)
    for n in (D, D + 1):
        hidden = rand(n, D, dtype=torch.float32)
        targets = torch.randint(0, V, (n,)).to(DEVICE)
        logp = ptk.linear_token_logprobs(hidden, weight, targets, chunk_size=5, backend=backend)
        forward = len(calls)
        logp.sum().backward()
        recomputed = len(calls) > forward
        assert recomputed == (not weight_grad or n > D), (n, weight_grad, calls)

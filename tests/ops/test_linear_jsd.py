"""linear_jsd / linear_kl_divergence on every fused backend against the float64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from ptkernels.ops.core import gemm
from ptkernels.ops.linear_jsd import linear_jsd, linear_kl_divergence
from ptkernels.reference import distill as reference
from tests.helpers import (
    DEVICE,
    FUSED_BACKENDS,
    assert_close_to_truth,
    bf16_store_slack,
    labels_with_mask,
    rand,
)

N, D, D_REF, V = 37, 19, 23, 251  # odd on purpose; V is prime; the teacher is wider than the student
BETAS = [0.0, 0.5, 1.0, 0.3]

OPTIONS = {
    "bias": dict(with_bias=True),
    "temperature": dict(temperature=0.7),
    "all": dict(with_bias=True, temperature=1.9),
    "no_labels": dict(no_labels=True, temperature=1.3),
}

# No native JSD rows: backend="native" is refused with a clear error (test_native_backend_is_refused).
JSD_BACKENDS = [b for b in FUSED_BACKENDS if b != "native"]


def _inputs(option, dtype=torch.float64, n=N, v=V):
    opt = OPTIONS[option]
    hidden, weight = rand(n, D, dtype=dtype), rand(v, D, dtype=dtype)
    # The reference model's tensors require grad on purpose: they must get none.
    ref_hidden, ref_weight = rand(n, D_REF, dtype=dtype), rand(v, D_REF, dtype=dtype)
    bias = rand(v, dtype=dtype) if opt.get("with_bias") else None
    ref_bias = rand(v, dtype=dtype) if opt.get("with_bias") else None
    labels = None if opt.get("no_labels") else labels_with_mask((n,), v)
    kw = dict(labels=labels, bias=bias, ref_bias=ref_bias)
    if "temperature" in opt:
        kw["temperature"] = opt["temperature"]
    return hidden, weight, ref_hidden, ref_weight, kw


def _run(fn, hidden, weight, ref_hidden, ref_weight, grad_seed, **kw):
    loss = fn(hidden, weight, ref_hidden, ref_weight, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    inputs = [t for t in (hidden, weight, kw.get("bias")) if t is not None]
    return loss, torch.autograd.grad(loss, inputs, g.to(device=loss.device, dtype=loss.dtype))


@pytest.mark.parametrize("backend", JSD_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_reference_float64(backend, reduction, beta, option):
    hidden, weight, ref_hidden, ref_weight, kw = _inputs(option)
    kw.update(reduction=reduction, beta=beta)
    ours, ours_g = _run(linear_jsd, hidden, weight, ref_hidden, ref_weight, 1, chunk_size=8, backend=backend, **kw)
    truth, truth_g = _run(reference.linear_jsd, hidden, weight, ref_hidden, ref_weight, 1, **kw)
    # The Triton kernel takes scalar options (beta, 1/T) as fp32, so fp64 inputs are exact only to ~1e-8 there.
    rtol = 1e-10 if backend == "torch" else 1e-6
    assert ours.dtype == torch.float64
    assert_close_to_truth(ours, truth, rtol, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), ours_g, truth_g):
        assert_close_to_truth(a, b, rtol, f"grad {name}")
    assert ref_hidden.grad is None and ref_weight.grad is None


def test_reference_matches_trl_formulas():
    """The oracle itself, against TRL's generalized_jsd_loss written out (F.kl_div, log-space mixture)."""
    s, t = rand(N, V, requires_grad=False), rand(N, V, requires_grad=False, scale=2.0)
    labels = labels_with_mask((N,), V)
    mask = labels != -100
    for beta in BETAS:
        log_q, log_p = F.log_softmax(s / 0.8, -1), F.log_softmax(t / 0.8, -1)
        if beta == 0:
            jsd = F.kl_div(log_q, log_p, reduction="none", log_target=True)
        elif beta == 1:
            jsd = F.kl_div(log_p, log_q, reduction="none", log_target=True)
        else:
            b = torch.tensor(beta, dtype=torch.float64)
            log_m = torch.logsumexp(torch.stack([log_q + torch.log(1 - b), log_p + torch.log(b)]), dim=0)
            jsd = b * F.kl_div(log_m, log_p, reduction="none", log_target=True) + (1 - b) * F.kl_div(
                log_m, log_q, reduction="none", log_target=True)
        trl = jsd[mask].sum() / mask.sum()  # TRL's "batchmean"
        ours = reference.generalized_jsd(s, t, labels, beta=beta, temperature=0.8)
        assert_close_to_truth(ours, trl, 1e-12, f"beta={beta}")


@pytest.mark.parametrize("backend", JSD_BACKENDS)
@pytest.mark.parametrize("direction, beta", [("forward", 0.0), ("reverse", 1.0)])
def test_kl_divergence_directions(backend, direction, beta):
    hidden, weight, ref_hidden, ref_weight, kw = _inputs("bias")
    ours = linear_kl_divergence(hidden, weight, ref_hidden, ref_weight, direction=direction, reduction="none",
                                backend=backend, **kw)
    same = linear_jsd(hidden, weight, ref_hidden, ref_weight, beta=beta, reduction="none", backend=backend, **kw)
    assert torch.equal(ours, same)
    log_q = F.log_softmax(F.linear(hidden, weight, kw["bias"]), -1)
    log_p = F.log_softmax(F.linear(ref_hidden, ref_weight, kw["ref_bias"]), -1)
    # forward: KL(P_ref || P_student); reverse: KL(P_student || P_ref)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) if direction == "forward" else (log_q.exp() * (log_q - log_p)).sum(-1)
    kl = torch.where(kw["labels"] != -100, kl, torch.zeros_like(kl))
    assert_close_to_truth(ours, kl, 1e-6, direction)
    with pytest.raises(ValueError, match="direction"):
        linear_kl_divergence(hidden, weight, ref_hidden, ref_weight, direction="both", backend=backend)


@pytest.mark.parametrize("backend", JSD_BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_float32_within_1e5_of_float64_truth(backend, beta):
    f32 = torch.float32
    hidden, weight, ref_hidden, ref_weight, kw = _inputs("all", dtype=f32)
    kw.update(beta=beta)
    ours, ours_g = _run(linear_jsd, hidden, weight, ref_hidden, ref_weight, 2, backend=backend, **kw)
    h64, w64, rh64, rw64 = (t.detach().double().requires_grad_() for t in (hidden, weight, ref_hidden, ref_weight))
    kw64 = dict(kw, bias=kw["bias"].detach().double().requires_grad_(), ref_bias=kw["ref_bias"].detach().double())
    truth, truth_g = _run(reference.linear_jsd, h64, w64, rh64, rw64, 2, **kw64)
    assert ours.dtype == f32
    assert_close_to_truth(ours, truth, 1e-5, "loss")
    for a, b in zip(ours_g, truth_g):
        assert a.dtype == f32
        assert_close_to_truth(a, b, 1e-5, "grad")


@pytest.mark.parametrize("backend", JSD_BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bf16_no_worse_than_eager(backend, beta):
    """|truth - ours| <= |truth - eager bf16| + a small tolerance, truth in float64."""
    bf16 = torch.bfloat16
    n, d, v = 48, 32, 509
    hidden, weight = rand(n, d, dtype=bf16, scale=2.0), rand(v, d, dtype=bf16)
    ref_hidden, ref_weight = rand(n, d, dtype=bf16, scale=2.0), rand(v, d, dtype=bf16)
    labels = labels_with_mask((n,), v, ignore_every=4)
    ours = linear_jsd(hidden, weight, ref_hidden, ref_weight, labels=labels, beta=beta, backend=backend)
    ours_g = torch.autograd.grad(ours, (hidden, weight))
    # Eager bf16: TRL's generalized_jsd_loss on bf16 logits, all in bf16.
    log_q = F.log_softmax(F.linear(hidden, weight), -1)
    log_p = F.log_softmax(F.linear(ref_hidden, ref_weight), -1).detach()
    if beta == 0:
        per = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    elif beta == 1:
        per = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    else:
        log_m = torch.logaddexp(log_q + math.log(1 - beta), log_p + math.log(beta))
        per = beta * F.kl_div(log_m, log_p, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
            log_m, log_q, reduction="none", log_target=True)
    mask = labels != -100
    eager = per[mask].sum() / mask.sum()
    eager_g = torch.autograd.grad(eager, (hidden, weight))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    truth = reference.linear_jsd(h64, w64, ref_hidden.double(), ref_weight.double(), labels=labels, beta=beta)
    truth_g = torch.autograd.grad(truth, (h64, w64))
    assert ours.dtype == torch.float32
    assert (ours.double() - truth).abs() <= (eager.double() - truth).abs() + 1e-2 * truth.abs()
    for a, e, t in zip(ours_g, eager_g, truth_g):
        assert a.dtype == bf16
        err_ours, err_eager = (a.double() - t).norm(), (e.double() - t).norm()
        assert err_ours <= 1.1 * bf16_store_slack(backend, bf16) * err_eager + 1e-2 * t.norm(), (
            float(err_ours), float(err_eager))


@pytest.mark.parametrize("backend", JSD_BACKENDS)
def test_teacher_in_another_dtype(backend):
    """A bf16 teacher beside an fp32 student: the teacher's logits are upcast in the row math."""
    hidden, weight = rand(N, D, dtype=torch.float32), rand(V, D, dtype=torch.float32)
    ref_hidden, ref_weight = rand(N, D_REF, dtype=torch.bfloat16), rand(V, D_REF, dtype=torch.bfloat16)
    labels = labels_with_mask((N,), V)
    ours, ours_g = _run(linear_jsd, hidden, weight, ref_hidden, ref_weight, 3, labels=labels, backend=backend)
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    zt = F.linear(ref_hidden, ref_weight).double()  # the teacher's logits as its bf16 GEMM makes them
    truth = reference.generalized_jsd(F.linear(h64, w64), zt, labels)
    g = torch.randn((), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    truth_g = torch.autograd.grad(truth, (h64, w64), g)
    assert_close_to_truth(ours, truth, 1e-5, "loss")
    for a, b in zip(ours_g, truth_g):
        assert_close_to_truth(a, b, 1e-5, "grad")


@pytest.mark.parametrize("backend", JSD_BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_identical_models_give_zero(backend, beta):
    hidden, weight = rand(N, D), rand(V, D)
    loss = linear_jsd(hidden, weight, hidden, weight, beta=beta, reduction="none", backend=backend)
    assert loss.abs().max() < 1e-12
    gh, gw = torch.autograd.grad(loss.sum(), (hidden, weight))
    assert gh.abs().max() < 1e-12 and gw.abs().max() < 1e-12


@pytest.mark.parametrize("backend", JSD_BACKENDS)
def test_symmetric_jsd_is_bounded_by_log2(backend):
    hidden, weight = rand(N, D, scale=5.0), rand(V, D)
    ref_hidden, ref_weight = rand(N, D_REF, scale=5.0), rand(V, D_REF)
    loss = linear_jsd(hidden, weight, ref_hidden, ref_weight, reduction="none", backend=backend)
    assert (loss >= -1e-12).all() and (loss <= math.log(2) + 1e-12).all()
    assert loss.max() > 0.5  # far apart models: the bound is nearly reached


@pytest.mark.parametrize("backend", JSD_BACKENDS)
def test_batch_dims_and_reduction_none_shape(backend):
    B, T = 3, 5
    hidden, weight = rand(B, T, D), rand(V, D)
    ref_hidden, ref_weight = rand(B, T, D_REF), rand(V, D_REF)
    labels = labels_with_mask((B, T), V, ignore_every=4)
    ours = linear_jsd(hidden, weight, ref_hidden, ref_weight, labels=labels, reduction="none", backend=backend)
    truth = reference.linear_jsd(hidden, weight, ref_hidden, ref_weight, labels=labels, reduction="none")
    assert ours.shape == (B, T)
    assert_close_to_truth(ours, truth, 1e-6, "loss")
    assert (ours[labels == -100] == 0).all()


@pytest.mark.parametrize("backend", JSD_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_masked_gives_zero_loss_and_zero_grads(backend, reduction):
    hidden, weight = rand(N, D), rand(V, D)
    ref_hidden, ref_weight = rand(N, D_REF), rand(V, D_REF)
    labels = torch.full((N,), -100, device=DEVICE)
    loss = linear_jsd(hidden, weight, ref_hidden, ref_weight, labels=labels, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    gh, gw = torch.autograd.grad(loss.sum(), (hidden, weight))
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("backend", JSD_BACKENDS)
def test_zero_tokens(backend):
    hidden, weight = rand(0, D), rand(V, D)
    ref_hidden, ref_weight = rand(0, D_REF), rand(V, D_REF)
    loss = linear_jsd(hidden, weight, ref_hidden, ref_weight, backend=backend)
    assert loss.item() == 0.0
    assert linear_jsd(hidden, weight, ref_hidden, ref_weight, reduction="none", backend=backend).shape == (0,)
    gw, = torch.autograd.grad(loss, (weight,))
    assert torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("backend", JSD_BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_huge_logits_are_finite_and_accurate(backend, beta):
    f32 = torch.float32
    hidden, weight = rand(N, D, dtype=f32, scale=30.0), rand(V, D, dtype=f32, scale=30.0)
    ref_hidden, ref_weight = rand(N, D, dtype=f32, scale=30.0), rand(V, D, dtype=f32, scale=30.0)
    labels = labels_with_mask((N,), V)
    ours = linear_jsd(hidden, weight, ref_hidden, ref_weight, labels=labels, beta=beta, reduction="none",
                      backend=backend)
    h64, w64 = hidden.detach().double(), weight.detach().double()
    assert (h64 @ w64.T).abs().max() > 5e3  # logits of magnitude ~1e4
    truth = reference.linear_jsd(h64, w64, ref_hidden.double(), ref_weight.double(), labels=labels, beta=beta,
                                 reduction="none")
    assert torch.isfinite(ours).all()
    assert_close_to_truth(ours, truth, 1e-5, "loss")
    gh, = torch.autograd.grad(ours.sum(), (hidden,))
    assert torch.isfinite(gh).all()


@pytest.mark.parametrize("backend", JSD_BACKENDS)
def test_vocab_above_65536(backend):
    v, d = 70_001, 4
    f32 = torch.float32
    hidden, weight = rand(3, d, dtype=f32), rand(v, d, dtype=f32)
    ref_hidden, ref_weight = rand(3, d, dtype=f32), rand(v, d, dtype=f32)
    labels = torch.tensor([0, -100, 65_536], device=DEVICE)
    for beta in (0.0, 0.5, 1.0):
        ours = linear_jsd(hidden, weight, ref_hidden, ref_weight, labels=labels, beta=beta, reduction="none",
                          backend=backend)
        truth = reference.linear_jsd(hidden.double(), weight.double(), ref_hidden.double(), ref_weight.double(),
                                     labels=labels, beta=beta, reduction="none")
        assert_close_to_truth(ours, truth, 1e-5, f"loss beta={beta}")


@pytest.mark.parametrize("backend", JSD_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_sync_free_and_chunk_sizes_agree(backend, reduction, beta):
    hidden, weight, ref_hidden, ref_weight, kw = _inputs("bias")
    kw.update(reduction=reduction, beta=beta, backend=backend)
    base = linear_jsd(hidden, weight, ref_hidden, ref_weight, **kw)
    base_g = torch.autograd.grad(base.sum(), (hidden, weight))
    for extra in (dict(sync_free=True), dict(chunk_size=3), dict(chunk_size=7, sync_free=True),
                  dict(chunk_size=999)):
        out = linear_jsd(hidden, weight, ref_hidden, ref_weight, **kw, **extra)
        g = torch.autograd.grad(out.sum(), (hidden, weight))
        assert_close_to_truth(out, base, 1e-10, str(extra))
        for a, b in zip(g, base_g):
            assert_close_to_truth(a, b, 1e-10, str(extra))


def test_reference_backend_dispatch():
    hidden, weight, ref_hidden, ref_weight, kw = _inputs("all")
    ours = linear_jsd(hidden, weight, ref_hidden, ref_weight, beta=0.3, backend="reference", **kw)
    truth = reference.linear_jsd(hidden, weight, ref_hidden, ref_weight, beta=0.3, **kw)
    assert_close_to_truth(ours, truth, 1e-12, "loss")
    ours.backward()
    assert ref_hidden.grad is None and ref_weight.grad is None and kw["ref_bias"].grad is None
    assert hidden.grad is not None and kw["bias"].grad is not None


@pytest.mark.parametrize("backend", JSD_BACKENDS)
def test_reference_model_gets_no_gradient(backend):
    hidden, weight, ref_hidden, ref_weight, kw = _inputs("bias")
    loss = linear_jsd(hidden, weight, ref_hidden, ref_weight, backend=backend, **kw)
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None and kw["bias"].grad is not None
    assert ref_hidden.grad is None and ref_weight.grad is None and kw["ref_bias"].grad is None
    # Only the reference requires grad: the output does not.
    h, w = hidden.detach(), weight.detach()
    assert not linear_jsd(h, w, ref_hidden, ref_weight, backend=backend).requires_grad


def test_masked_rows_skip_every_matmul(monkeypatch):
    seen = []
    real = gemm.logits

    def counting(h, w, b, out=None):
        seen.append(h.shape[0])
        return real(h, w, b, out=out)

    monkeypatch.setattr(gemm, "logits", counting)
    hidden, weight, ref_hidden, ref_weight, kw = _inputs("temperature")
    n_valid = int((kw["labels"] != -100).sum())
    loss = linear_jsd(hidden, weight, ref_hidden, ref_weight, chunk_size=5, backend="torch", **kw)
    assert sum(seen) == 2 * n_valid  # student and teacher logits, valid rows only
    loss.backward()  # mean: gradients were formed in forward, no further matmul rows
    assert sum(seen) == 2 * n_valid


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_vocab_mismatch_names_both_heads():
    with pytest.raises(ValueError, match=r"weight.*ref_weight"):
        linear_jsd(rand(4, D), rand(V, D), rand(4, D_REF), rand(V + 1, D_REF))


def test_shape_dtype_device_mismatches_name_the_arguments():
    with pytest.raises(ValueError, match=r"hidden.*ref_hidden"):
        linear_jsd(rand(4, D), rand(V, D), rand(5, D_REF), rand(V, D_REF))
    with pytest.raises(ValueError, match=r"ref_hidden.*ref_weight"):
        linear_jsd(rand(4, D), rand(V, D), rand(4, D_REF + 1), rand(V, D_REF))
    with pytest.raises(ValueError, match=r"hidden.*weight"):
        linear_jsd(rand(4, D + 1), rand(V, D), rand(4, D_REF), rand(V, D_REF))
    with pytest.raises(ValueError, match="ref_bias"):
        linear_jsd(rand(4, D), rand(V, D), rand(4, D_REF), rand(V, D_REF), ref_bias=rand(V + 1))
    with pytest.raises(TypeError, match=r"ref_hidden.*ref_weight"):
        linear_jsd(rand(4, D), rand(V, D), rand(4, D_REF, dtype=torch.float32), rand(V, D_REF))
    with pytest.raises(ValueError, match=r"hidden.*ref_hidden"):
        meta = dict(dtype=torch.float64, device="meta")
        linear_jsd(rand(4, D), rand(V, D), torch.randn(4, D_REF, **meta), torch.randn(V, D_REF, **meta))
    with pytest.raises(ValueError, match=r"labels.*hidden"):
        linear_jsd(rand(4, D), rand(V, D), rand(4, D_REF), rand(V, D_REF),
                   labels=torch.zeros(5, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("kw, word", [
    (dict(beta=-0.1), "beta"), (dict(beta=1.5), "beta"), (dict(reduction="avg"), "reduction"),
    (dict(temperature=0.0), "temperature"), (dict(chunk_size=0), "chunk_size"),
])
def test_bad_options(kw, word):
    with pytest.raises(ValueError, match=word):
        linear_jsd(rand(4, D), rand(V, D), rand(4, D_REF), rand(V, D_REF), **kw)


@pytest.mark.skipif("native" not in FUSED_BACKENDS, reason="the native extension is not usable here")
def test_native_backend_is_refused():
    """The native extension has no JSD rows: asking for them is an error, never a silent fallback."""
    with pytest.raises(RuntimeError, match="native"):
        linear_jsd(rand(4, D), rand(V, D), rand(4, D_REF), rand(V, D_REF), backend="native")

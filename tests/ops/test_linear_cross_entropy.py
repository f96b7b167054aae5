"""linear_cross_entropy on every fused backend against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

import ptkernels as ptk
from ptkernels import reference
from ptkernels.ops.core import gemm
from tests.helpers import (
    DEVICE,
    FUSED_BACKENDS,
    assert_close_to_truth,
    assert_within,
    bf16_store_slack,
    gamma,
    labels_with_mask,
    rand,
    unit_roundoff,
)

N, D, V = 37, 19, 251  # odd on purpose; V is prime

OPTIONS = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=3.0),
    "temperature": dict(temperature=0.7),
    "all": dict(label_smoothing=0.2, z_loss=1e-2, softcap=4.0, temperature=1.3),
}


def _run(fn, hidden, weight, labels, bias, grad_seed, **kw):
    loss = fn(hidden, weight, labels, bias=bias, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    return loss, torch.autograd.grad(loss, inputs, g.to(device=loss.device, dtype=loss.dtype))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference_float64(backend, reduction, option, with_bias):
    hidden, weight = rand(N, D), rand(V, D)
    bias = rand(V) if with_bias else None
    labels = labels_with_mask((N,), V)
    kw = dict(reduction=reduction, **OPTIONS[option])
    ours, ours_g = _run(ptk.linear_cross_entropy, hidden, weight, labels, bias, 1, chunk_size=8, backend=backend,
                        **kw)
    truth, truth_g = _run(reference.linear_cross_entropy, hidden, weight, labels, bias, 1, **kw)
    # The Triton kernels take scalar options as fp32, so fp64 inputs are exact only to ~1e-8 there.
    rtol = 1e-10 if backend == "torch" else 1e-6
    assert_close_to_truth(ours, truth, rtol, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), ours_g, truth_g):
        assert_close_to_truth(a, b, rtol, f"grad {name}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float32_within_1e5_of_float64_truth(backend, reduction):
    f32 = torch.float32
    hidden, weight, bias = rand(N, D, dtype=f32), rand(V, D, dtype=f32), rand(V, dtype=f32)
    labels = labels_with_mask((N,), V)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    ours, ours_g = _run(ptk.linear_cross_entropy, hidden, weight, labels, bias, 2, backend=backend, **kw)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    truth, truth_g = _run(reference.linear_cross_entropy, h64, w64, labels, b64, 2, **kw)
    assert ours.dtype == torch.float32
    assert_close_to_truth(ours, truth, 1e-5, "loss")
    for a, b in zip(ours_g, truth_g):
        assert a.dtype == torch.float32
        assert_close_to_truth(a, b, 1e-5, "grad")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_eager(backend, dtype):
    """|truth - ours| <= |truth - eager in the same dtype| + a small tolerance, truth in float64."""
    hidden, weight = rand(64, 32, dtype=dtype, scale=2.0), rand(509, 32, dtype=dtype)
    labels = labels_with_mask((64,), 509, ignore_every=4)
    ours = ptk.linear_cross_entropy(hidden, weight, labels, backend=backend)
    ours_g = torch.autograd.grad(ours, (hidden, weight))
    eager = F.cross_entropy(F.linear(hidden, weight), labels)
    eager_g = torch.autograd.grad(eager, (hidden, weight))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    truth = reference.linear_cross_entropy(h64, w64, labels)
    truth_g = torch.autograd.grad(truth, (h64, w64))
    assert ours.dtype == torch.float32
    assert (ours.double() - truth).abs() <= (eager.double() - truth).abs() + 1e-3 * truth.abs()
    for a, e, t in zip(ours_g, eager_g, truth_g):
        assert a.dtype == dtype
        err_ours = (a.double() - t).norm()
        err_eager = (e.double() - t).norm()
        slack = 1.1 * bf16_store_slack(backend, dtype)
        assert err_ours <= slack * err_eager + 1e-3 * t.norm(), (float(err_ours), float(err_eager))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_shift_matches_hugging_face_convention(backend):
    B, T = 3, 11
    hidden, weight = rand(B, T, D), rand(V, D)
    labels = labels_with_mask((B, T), V, ignore_every=5)
    ours = ptk.linear_cross_entropy(hidden, weight, labels, shift=True, backend=backend)
    logits = F.linear(hidden, weight)
    hf = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close_to_truth(ours, hf, 1e-6, "loss")
    g_ours = torch.autograd.grad(ours, (hidden, weight))
    g_hf = torch.autograd.grad(hf, (hidden, weight))
    for a, b in zip(g_ours, g_hf):
        assert_close_to_truth(a, b, 1e-6, "grad")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_masked_gives_zero_loss_and_zero_grads(backend, reduction):
    hidden, weight = rand(N, D), rand(V, D)
    labels = torch.full((N,), -100, device=DEVICE)
    loss = ptk.linear_cross_entropy(hidden, weight, labels, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    gh, gw = torch.autograd.grad(loss.sum(), (hidden, weight))
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_zero_tokens(backend):
    hidden, weight = rand(0, D), rand(V, D)
    labels = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = ptk.linear_cross_entropy(hidden, weight, labels, backend=backend)
    assert loss.item() == 0.0
    assert ptk.linear_cross_entropy(hidden, weight, labels, reduction="none", backend=backend).shape == (0,)
    gw, = torch.autograd.grad(loss, (weight,))
    assert torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_huge_logits_are_finite_and_accurate(backend):
    hidden, weight = rand(N, D, dtype=torch.float32, scale=30.0), rand(V, D, dtype=torch.float32, scale=30.0)
    labels = labels_with_mask((N,), V)
    ours = ptk.linear_cross_entropy(hidden, weight, labels, reduction="none", backend=backend)
    h64, w64 = hidden.detach().double(), weight.detach().double()
    assert (h64 @ w64.T).abs().max() > 5e3  # logits of magnitude ~1e4
    truth = reference.linear_cross_entropy(h64, w64, labels, reduction="none")
    assert torch.isfinite(ours).all()
    assert_close_to_truth(ours, truth, 1e-5, "loss")
    gh, = torch.autograd.grad(ours.sum(), (hidden,))
    assert torch.isfinite(gh).all()


def ce_grad_bounds(h64, w64, labels, ignore_index=-100):
    """Elementwise bounds on the fp32 errors of d(sum of CE losses)/d(hidden, weight), from gamma_k (tests/helpers):
    they hold for any summation order, so for any BLAS, oneDNN kernel, vector width or thread count.

    Each p_ij = softmax(z_i)_j is formed from fp32 logits (GEMM 1 over D: |dz_ij| <= gamma_D a_ij, a = |h| |w|.T,
    which moves p_ij by at most 2 gamma_D max_j a_ij relatively), the rounding of z - max and of lse
    (u (|z - lse| + |lse|)), the positive V-term sum of exp (gamma_V, any order) and a few roundings of the exp
    and the division (8 u). The gradient dz = p - onehot adds one rounding (u |dz|). GEMM 2 (dX = dz W) sums V
    terms, GEMM 3 (dW = dz.T h, accumulated over chunks) N; one more rounding each for the per-row scaling.
    """
    u = unit_roundoff(torch.float32)
    n, d = h64.shape
    v = w64.shape[0]
    h, w = h64.detach(), w64.detach()
    z = h @ w.T
    a = h.abs() @ w.abs().T
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    p = torch.softmax(z, dim=1)
    valid = labels != ignore_index
    dz = p.clone()
    dz[valid, labels[valid]] -= 1
    dz[~valid] = 0
    rho = 2 * gamma(d) * a.max(dim=1, keepdim=True).values + u * ((z - lse).abs() + lse.abs()) + gamma(v) + 8 * u
    dz_err = (rho * p + u * dz.abs()) * valid[:, None]
    bound_dx = gamma(v + 2) * (dz.abs() @ w.abs()) + dz_err @ w.abs()
    bound_dw = gamma(n + 2) * (dz.abs().T @ h.abs()) + dz_err.T @ h.abs()
    return bound_dx, bound_dw


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_vocab_above_65536(backend):
    v = 70_001
    hidden, weight = rand(5, 4, dtype=torch.float32), rand(v, 4, dtype=torch.float32)
    labels = torch.tensor([0, v - 1, 65_536, -100, 12_345], device=DEVICE)
    ours = ptk.linear_cross_entropy(hidden, weight, labels, reduction="none", backend=backend)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    truth = reference.linear_cross_entropy(h64, w64, labels, reduction="none")
    assert_close_to_truth(ours, truth, 1e-5, "loss")
    g = torch.autograd.grad(ours.sum(), (hidden, weight))
    t = torch.autograd.grad(truth.sum(), (h64, w64))
    # The input gradient sums 70,001 products: its fp32 error is the GEMM library's summation order (1e-4 with
    # MKL on AMD EPYC, 3e-6 on an AVX-512 Xeon), so the bound is the any-order rule, not a multiple of eager's.
    for a, b, bound, what in zip(g, t, ce_grad_bounds(h64, w64, labels), ("dX", "dW")):
        assert_within(a, b, bound, what)
    # The rule is loose (gamma_V ~ 4e-3 relative) but still far below what a wrong column would cost: the
    # label's -w_y term alone is ~1 in each row of dX.
    assert float(ce_grad_bounds(h64, w64, labels)[0].max()) < 0.1 * float(t[0].abs().max())


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sync_free_and_chunk_sizes_agree(backend, reduction):
    hidden, weight = rand(N, D), rand(V, D)
    labels = labels_with_mask((N,), V)
    base = ptk.linear_cross_entropy(hidden, weight, labels, reduction=reduction, backend=backend)
    base_g = torch.autograd.grad(base.sum(), (hidden, weight))
    for kw in (dict(sync_free=True), dict(chunk_size=1), dict(chunk_size=7, sync_free=True), dict(chunk_size=999)):
        out = ptk.linear_cross_entropy(hidden, weight, labels, reduction=reduction, backend=backend, **kw)
        g = torch.autograd.grad(out.sum(), (hidden, weight))
        assert_close_to_truth(out, base, 1e-10, str(kw))
        for a, b in zip(g, base_g):
            assert_close_to_truth(a, b, 1e-10, str(kw))


def test_masked_rows_skip_every_matmul(monkeypatch):
    seen = []
    real = gemm.logits

    def counting(h, w, b, out=None):
        seen.append(h.shape[0])
        return real(h, w, b, out=out)

    monkeypatch.setattr(gemm, "logits", counting)
    hidden, weight = rand(N, D), rand(V, D)
    labels = labels_with_mask((N,), V, ignore_every=3)
    n_valid = int((labels != -100).sum())
    loss = ptk.linear_cross_entropy(hidden, weight, labels, chunk_size=5, backend="torch")
    assert sum(seen) == n_valid
    loss.backward()  # mean: gradients were formed in forward, no further matmul rows
    assert sum(seen) == n_valid


def test_every_chunk_reuses_one_logits_buffer(monkeypatch):
    """GEMM 1 writes every chunk into one buffer (a fresh 64 MiB chunk each time cost ~5% on CPU)."""
    storages = []
    real = gemm.logits

    def recording(h, w, b, out=None):
        z = real(h, w, b, out=out)
        storages.append(z.untyped_storage().data_ptr())
        return z

    monkeypatch.setattr(gemm, "logits", recording)
    hidden, weight = rand(N, D), rand(V, D)
    labels = labels_with_mask((N,), V, ignore_every=3)
    ptk.linear_cross_entropy(hidden, weight, labels, chunk_size=5, backend="torch").backward()
    assert len(storages) > 2 and len(set(storages)) == 1


def test_no_grad_needed_runs_forward_only():
    hidden, weight = rand(N, D, requires_grad=False), rand(V, D, requires_grad=False)
    labels = labels_with_mask((N,), V)
    loss = ptk.linear_cross_entropy(hidden, weight, labels, backend="torch")
    assert not loss.requires_grad
    assert_close_to_truth(loss, reference.linear_cross_entropy(hidden, weight, labels), 1e-12, "loss")


# ------------------------------------------------------------------------ the small-shape fast path


def _rows_through_gemm1(monkeypatch):
    seen = []
    real = gemm.logits

    def counting(h, w, b, out=None):
        seen.append(h.shape[0])
        return real(h, w, b, out=out)

    monkeypatch.setattr(gemm, "logits", counting)
    return seen


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("mask", ["some", "all"])
def test_fast_path_agrees_with_the_chunk_loop(monkeypatch, backend, reduction, option, mask):
    """The one-chunk path (taken by default at this size: every row through one GEMM 1) and the chunk loop
    (chunk_size=5) against the float64 truth and each other, with a bias, every option, masks, all ignored."""
    seen = _rows_through_gemm1(monkeypatch)
    hidden, weight, bias = rand(N, D), rand(V, D), rand(V)
    labels = labels_with_mask((N,), V) if mask == "some" else torch.full((N,), -100, device=DEVICE)
    kw = dict(reduction=reduction, **OPTIONS[option])
    fast, fast_g = _run(ptk.linear_cross_entropy, hidden, weight, labels, bias, 3, backend=backend, **kw)
    n_valid = int((labels != -100).sum())
    if backend == "native" and DEVICE.type == "cpu" and reduction != "none":  # the CPU small path: valid rows
        assert seen == ([n_valid] if n_valid else []), "the CPU small path runs GEMM 1 once over the valid rows"
    else:
        assert seen and seen[0] == N, "the fast path runs GEMM 1 once over every row"
    seen.clear()
    loop, loop_g = _run(ptk.linear_cross_entropy, hidden, weight, labels, bias, 3, backend=backend,
                        chunk_size=5, **kw)
    assert max(seen, default=0) <= 5
    truth, truth_g = _run(reference.linear_cross_entropy, hidden, weight, labels, bias, 3, **kw)
    for what, a, b, t in zip(("loss", "dh", "dW", "db"), (fast, *fast_g), (loop, *loop_g), (truth, *truth_g)):
        assert_close_to_truth(a, t, 1e-10, f"fast {what}")
        assert_close_to_truth(a, b, 1e-10, f"fast vs loop {what}")
        if mask == "all":
            assert not a.detach().abs().max() > 0, f"all ignored: {what} must be 0"


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fast_path_float32_within_1e5_of_float64_truth(backend):
    hidden, weight = rand(N, D), rand(V, D)
    labels = labels_with_mask((N,), V)
    h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
    loss = ptk.linear_cross_entropy(h32, w32, labels, backend=backend)
    g = torch.autograd.grad(loss * 3.0, (h32, w32))  # an incoming gradient that is not 1
    truth = reference.linear_cross_entropy(hidden, weight, labels)
    tg = torch.autograd.grad(truth * 3.0, (hidden, weight))
    assert_close_to_truth(loss, truth, 1e-5, "loss")
    for a, t in zip(g, tg):
        assert_close_to_truth(a, t, 1e-5, "grad")


def test_fast_path_only_below_its_size(monkeypatch):
    from ptkernels.ops.core import chunking

    assert chunking.one_chunk(N, 4096, V, D)
    assert not chunking.one_chunk(N, N - 1, V, D)  # rows beyond one chunk: the loop
    assert not chunking.one_chunk(0, 4096, V, D)
    assert not chunking.one_chunk(4096, 4096, 32000, 512)  # big GEMMs: skipping masked rows pays
    seen = _rows_through_gemm1(monkeypatch)
    monkeypatch.setattr(chunking, "ONE_CHUNK_MAX_MACS", 0)
    hidden, weight = rand(N, D), rand(V, D)
    labels = labels_with_mask((N,), V, ignore_every=3)
    ptk.linear_cross_entropy(hidden, weight, labels, backend="torch")
    assert sum(seen) == int((labels != -100).sum())  # the loop: masked rows skipped

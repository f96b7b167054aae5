"""The chunk loop's GEMMs (ptkernels/ops/core/gemm.py): oneDNN for large fp32 CPU GEMMs, torch.mm elsewhere.

The oneDNN route is forced on tiny shapes here (the size thresholds set to 0) and checked against float64 and
against the torch.mm route, through the GEMM functions and through every fused op that uses them.
"""

import os
import subprocess
import sys

import pytest
import torch

import ptkernels as ptk
from ptkernels import reference
from ptkernels.ops.core import gemm
from ptkernels.ops.core.cpu_info import CPUInfo, parse_cpuinfo
from tests.helpers import assert_close_to_truth
from tests.helpers import labels_with_mask as _labels

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
    reason="this PyTorch build has no oneDNN linear")

N, D, V = 37, 19, 251
FP32 = 2e-6  # relative to the largest magnitude: a few fp32 roundings of sums of up to V terms


@pytest.fixture(autouse=True)
def _route_on(monkeypatch):
    """This file tests the oneDNN route itself: on whatever this machine's rule picks (blas on Intel) and even
    when the run sets PTK_CPU_GEMM=blas (.ci/run's second pass), which only sets ``gemm._CPU_GEMM`` at import."""
    monkeypatch.setattr(gemm, "_CPU_GEMM", "onednn")


def _onednn_at_any_size(monkeypatch):
    """The size thresholds of the oneDNN route off: GEMMs of any size, GEMM 3 of any rows (per product and in
    all and at any D, whatever this CPU's ``transposed_grad_bounds``)."""
    monkeypatch.setattr(gemm, "ONEDNN_MIN_FLOPS", 0)
    monkeypatch.setattr(gemm, "ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD", 1)
    monkeypatch.setattr(gemm, "_GRAD_BOUNDS", {"bounds": (0, 0, None)})


@pytest.fixture
def onednn_calls(monkeypatch):
    """Forces the oneDNN route at any size and counts its calls."""
    _onednn_at_any_size(monkeypatch)
    calls = []
    real = gemm._linear

    def counting(x, w, bias=None):
        calls.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, bias)

    monkeypatch.setattr(gemm, "_linear", counting)
    return calls


def rand(*shape):
    """float64 on the CPU whatever device the rest of the suite uses: the route under test is CPU-only."""
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def labels_with_mask(shape, num_classes):
    return _labels(shape, num_classes).cpu()


def _f32(*ts):
    return [t.detach().float() for t in ts]


def test_route_is_fp32_cpu_only(monkeypatch):
    cpu = torch.device("cpu")
    assert gemm.onednn_route(cpu, torch.float32)
    assert gemm.cpu_gemm_library() == "onednn"
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        assert not gemm.onednn_route(cpu, dtype)
    assert not gemm.onednn_route(torch.device("cuda"), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.onednn_route(cpu, torch.float32)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # what torch.backends.mkldnn.flags sets
    assert not gemm.onednn_route(cpu, torch.float32)


def test_small_gemms_stay_on_torch_mm(monkeypatch):
    calls = []
    monkeypatch.setattr(gemm, "_linear", lambda *a: calls.append(1))
    h, w = _f32(rand(N, D), rand(V, D))
    gemm.logits(h, w)
    assert calls == []  # 37 * 251 * 19 multiply-adds, far below ONEDNN_MIN_FLOPS
    assert gemm.weight_grad_buffer(w, h, torch.float32).is_contiguous()  # no transposed layout to undo


def test_gemms_match_float64(onednn_calls):
    h64, w64, b64, dz64 = rand(N, D), rand(V, D), rand(V), rand(N, V)
    h, w, b, dz = _f32(h64, w64, b64, dz64)
    assert_close_to_truth(gemm.logits(h, w), h64 @ w64.T, FP32, "logits")
    assert_close_to_truth(gemm.logits(h, w, b), h64 @ w64.T + b64, FP32, "logits + bias")
    assert_close_to_truth(gemm.input_grad(dz, w), dz64 @ w64, FP32, "input_grad")
    for alpha in (1.0, 0.3):
        acc = gemm.weight_grad_buffer(w, h, torch.float32)
        assert acc.shape == (V, D) and acc.t().is_contiguous()  # stored transposed on this route
        gemm.accumulate_weight_grad(acc, dz, h, alpha=alpha)
        gemm.accumulate_weight_grad(acc, dz[:5], h[:5], alpha=alpha)
        truth = alpha * (dz64.T @ h64 + dz64[:5].T @ h64[:5])
        assert_close_to_truth(acc, truth, FP32, f"weight grad, alpha {alpha}")
        result = gemm.weight_grad_result(acc, torch.float32)
        assert result.is_contiguous() and torch.equal(result, acc)
    assert len(onednn_calls) == 7  # logits twice, input_grad, 2 x 2 weight-grad chunks


def test_short_weight_grad_chunks_use_addmm_into_the_transposed_buffer(onednn_calls, monkeypatch):
    monkeypatch.setattr(gemm, "ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD", 8)
    h64, dz64 = rand(5, D), rand(5, V)
    h, w, dz = _f32(h64, rand(V, D), dz64)
    acc = gemm.weight_grad_buffer(w, torch.empty(64, D), torch.float32)  # 64 rows in all, a last chunk of 5
    assert acc.t().is_contiguous()
    gemm.accumulate_weight_grad(acc, dz, h, alpha=0.5)
    assert onednn_calls == []
    assert_close_to_truth(acc, 0.5 * dz64.T @ h64, FP32, "weight grad")


def test_weight_grad_buffer_is_transposed_only_where_a_chunk_can_take_onednn(onednn_calls, monkeypatch):
    """The buffer's layout follows the rows one GEMM 3 gets (the chunk), not the rows in all: with every chunk
    shorter than ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD no product ever goes to oneDNN, and a transposed buffer would only
    cost a slower addmm and a transposing copy at the end."""
    monkeypatch.setattr(gemm, "ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD", 8)
    w, many = torch.empty(V, D), torch.empty(64, D)
    assert gemm.weight_grad_buffer(w, many, torch.float32).t().is_contiguous()  # all 64 rows in one product
    assert gemm.weight_grad_buffer(w, many, torch.float32, rows_per_gemm=8).t().is_contiguous()
    assert gemm.weight_grad_buffer(w, many, torch.float32, rows_per_gemm=7).is_contiguous()


def test_weight_grad_buffer_is_transposed_only_where_the_rule_says_it_pays(onednn_calls, monkeypatch):
    """Where this CPU's rule bounds the transposed layout (Zen 4: rows in all, hidden size), fewer rows in all or a
    larger D keep the buffer contiguous (GEMM 3 on addmm), and the one-chunk GEMM 3 writes a contiguous [V, D]
    product."""
    monkeypatch.setattr(gemm, "_GRAD_BOUNDS", {"bounds": (0, 40, D)})
    w, many = torch.empty(V, D), torch.empty(64, D)
    assert gemm.weight_grad_buffer(w, many, torch.float32, rows_per_gemm=8, rows_in_all=39).is_contiguous()
    assert gemm.weight_grad_buffer(w, many, torch.float32, rows_per_gemm=8, rows_in_all=40).t().is_contiguous()
    assert gemm.weight_grad_buffer(w, many, torch.float32).t().is_contiguous()  # rows in all: like's 64
    wide_w, wide = torch.empty(V, D + 1), torch.empty(64, D + 1)
    assert gemm.weight_grad_buffer(wide_w, wide, torch.float32, rows_per_gemm=8).is_contiguous()  # D above the bound
    for rows, d, contiguous in ((39, D, True), (40, D, False), (40, D + 1, True)):
        h64, dz64 = rand(rows, d), rand(rows, V)
        h, dz = _f32(h64, dz64)
        onednn_calls.clear()
        gw = gemm.weight_grad(dz, h, torch.float32)
        assert gw.is_contiguous() == contiguous and bool(onednn_calls) != contiguous
        assert_close_to_truth(gw, dz64.T @ h64, FP32, f"one-chunk weight grad, {rows} rows, D={d}")


def test_weight_grad_buffer_is_transposed_only_for_chunks_of_enough_rows(onednn_calls, monkeypatch):
    """The per-chunk bound (Zen 4: 512 rows, where oneDNN's GEMM 3 into the transposed buffer starts to beat
    addmm): shorter chunks keep the buffer contiguous whatever the rows in all."""
    monkeypatch.setattr(gemm, "_GRAD_BOUNDS", {"bounds": (16, 40, D)})
    w, many = torch.empty(V, D), torch.empty(64, D)
    assert gemm.weight_grad_buffer(w, many, torch.float32, rows_per_gemm=15, rows_in_all=64).is_contiguous()
    assert gemm.weight_grad_buffer(w, many, torch.float32, rows_per_gemm=16, rows_in_all=64).t().is_contiguous()
    assert gemm.weight_grad_buffer(w, many, torch.float32, rows_per_gemm=16, rows_in_all=39).is_contiguous()


def test_ce_chunk_loop_of_short_chunks_keeps_a_contiguous_weight_grad(onednn_calls, monkeypatch):
    """End to end: chunks of 5 rows (below the weight-grad bound) accumulate dW with addmm into a contiguous
    buffer, which is the gradient itself (no transposing copy); GEMMs 1 and 2 still go to oneDNN."""
    monkeypatch.setattr(gemm, "ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD", 8)
    made = []
    real = gemm.weight_grad_buffer
    monkeypatch.setattr(gemm, "weight_grad_buffer", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    h64, w64 = rand(N, D), rand(V, D)
    y = _labels((N,), V)
    h, w = _f32(h64, w64)
    h.requires_grad_()
    w.requires_grad_()
    ptk.linear_cross_entropy(h, w, y, chunk_size=5, backend="torch").backward()
    assert made and made[0].is_contiguous() and onednn_calls
    assert_close_to_truth(w.grad, torch.autograd.grad(reference.linear_cross_entropy(h64, w64, y), w64)[0], FP32,
                          "weight grad")


def test_strided_operands_never_reach_onednn(onednn_calls):
    """A column slice is neither dense nor a dense transpose: oneDNN would take a reference path there."""
    h64, w64 = rand(N, 2 * D), rand(V, D)
    h, w = _f32(h64, w64)
    z = gemm.logits(h[:, ::2], w)
    assert onednn_calls == []
    assert_close_to_truth(z, h64[:, ::2] @ w64.T, FP32, "strided logits")


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_on_onednn(onednn_calls, backend, reduction):
    if backend not in ptk.backends():
        pytest.skip(f"backend {backend} is not built here")
    h64, w64, b64 = rand(N, D), rand(V, D), rand(V)
    labels = labels_with_mask((N,), V)
    h, w, b = (t.requires_grad_() for t in _f32(h64, w64, b64))
    ours = ptk.linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, chunk_size=8, backend=backend)
    truth = reference.linear_cross_entropy(h64, w64, labels, bias=b64, reduction=reduction)
    assert onednn_calls
    assert_close_to_truth(ours, truth, FP32, "loss")
    go = torch.rand_like(truth)
    ours_g = torch.autograd.grad(ours, (h, w, b), go.float())
    for a, t, name in zip(ours_g, torch.autograd.grad(truth, (h64, w64, b64), go), "hwb"):
        assert a.is_contiguous(), name
        assert_close_to_truth(a, t, 2 * FP32, f"grad {name}")


def test_token_logprobs_and_entropy_on_onednn(onednn_calls):
    h64, w64 = rand(N, D), rand(V, D)
    targets = labels_with_mask((N,), V)
    h, w = (t.requires_grad_() for t in _f32(h64, w64))
    lp, ent = ptk.linear_token_logprobs(h, w, targets, return_entropy=True, chunk_size=8, backend="torch")
    lp64, ent64 = reference.linear_token_logprobs(h64, w64, targets, return_entropy=True)
    g1, g2 = torch.rand(N, dtype=torch.float64), torch.rand(N, dtype=torch.float64)
    ours = torch.autograd.grad((lp * g1.float()).sum() + (ent * g2.float()).sum(), (h, w))
    truth = torch.autograd.grad((lp64 * g1).sum() + (ent64 * g2).sum(), (h64, w64))
    assert onednn_calls
    assert_close_to_truth(lp, lp64, FP32, "logp")
    for a, t, name in zip(ours, truth, "hw"):
        assert a.is_contiguous()
        assert_close_to_truth(a, t, 4 * FP32, f"grad {name}")


def _same_on_both_routes(run, inputs, monkeypatch, what):
    """``run()`` on the oneDNN route equals it on torch.mm (both fp32), loss and gradients."""
    blas_out = run()
    blas_grads = torch.autograd.grad(blas_out, inputs)
    _onednn_at_any_size(monkeypatch)
    calls = []
    real = gemm._linear
    monkeypatch.setattr(gemm, "_linear", lambda *a: calls.append(1) or real(*a))
    out = run()
    grads = torch.autograd.grad(out, inputs)
    assert calls, what
    assert_close_to_truth(out, blas_out, 1e-5, what)
    for a, b in zip(grads, blas_grads):
        assert a.is_contiguous()
        assert_close_to_truth(a, b, 1e-5, f"{what} gradient")


def test_fused_preference_on_onednn(monkeypatch):
    b, t = 3, 11
    h, w = (x.requires_grad_() for x in _f32(rand(2 * b, t, D), rand(V, D)))
    labels = labels_with_mask((2 * b, t), V)
    rc, rr = torch.randn(b), torch.randn(b)
    run = lambda: ptk.fused_linear_preference_loss(  # noqa: E731
        h, w, labels, ref_chosen_logps=rc, ref_rejected_logps=rr, nll_weight=0.5, chunk_size=8,
        backend="torch").loss
    _same_on_both_routes(run, (h, w), monkeypatch, "dpo + nll")


def test_fused_grpo_on_onednn(monkeypatch):
    b, t = 4, 9
    h, w = (x.requires_grad_() for x in _f32(rand(b, t, D), rand(V, D)))
    ids = torch.randint(0, V, (b, t))
    mask = torch.rand(b, t) > 0.2
    adv = torch.randn(b)
    run = lambda: ptk.fused_linear_grpo_loss(h, w, ids, mask, adv, old_logps=None, chunk_size=8,  # noqa: E731
                                             backend="torch").loss
    _same_on_both_routes(run, (h, w), monkeypatch, "grpo")


def test_linear_jsd_on_onednn(monkeypatch):
    h, w = (x.requires_grad_() for x in _f32(rand(N, D), rand(V, D)))
    rh, rw = _f32(rand(N, D), rand(V, D))
    run = lambda: ptk.linear_jsd(h, w, rh, rw, chunk_size=8, backend="torch")  # noqa: E731
    _same_on_both_routes(run, (h, w), monkeypatch, "jsd")


def test_env_blas_keeps_torch_mm_and_a_bad_value_names_the_variable():
    code = "from ptkernels.ops.core import gemm; print(gemm.cpu_gemm_library())"
    env = dict(os.environ, PTK_CPU_GEMM="blas")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "blas"
    env["PTK_CPU_GEMM"] = "onednn"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "onednn"
    env["PTK_CPU_GEMM"] = "mkl"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "PTK_CPU_GEMM" in bad.stderr


# ------------------------------------------------------------------------- the library chosen per machine

INTEL = CPUInfo("GenuineIntel", "Intel(R) Xeon(R) Platinum 8488C", frozenset({"avx2", "fma", "avx512f"}))
INTEL_AVX2 = CPUInfo("GenuineIntel", "Intel(R) Core(TM) i7-10700", frozenset({"avx2", "fma"}))
AMD = CPUInfo("AuthenticAMD", "AMD EPYC 9R14", frozenset({"avx2", "fma", "avx512f"}))
AMD_AVX2 = CPUInfo("AuthenticAMD", "AMD EPYC", frozenset({"avx2", "fma"}))
UNKNOWN = CPUInfo("", "", frozenset())


@pytest.mark.parametrize("cpu, mkl, want", [
    (INTEL, True, "blas"), (INTEL_AVX2, True, "blas"), (INTEL, False, "onednn"),
    (AMD, True, "onednn"), (AMD_AVX2, True, "blas"), (UNKNOWN, True, "blas")])
def test_rule_by_vendor(cpu, mkl, want):
    lib, why = gemm.choose_cpu_gemm("auto", cpu, blas_is_mkl=mkl, onednn_ok=True)
    assert lib == want and why


@pytest.mark.parametrize("cpu", [INTEL, AMD, UNKNOWN])
def test_override_beats_the_rule_and_no_onednn_means_blas(cpu):
    assert gemm.choose_cpu_gemm("blas", cpu, True, True)[0] == "blas"
    assert gemm.choose_cpu_gemm("onednn", cpu, True, True)[0] == "onednn"
    for setting in ("auto", "onednn"):
        assert gemm.choose_cpu_gemm(setting, cpu, True, onednn_ok=False)[0] == "blas"


def test_route_follows_the_mocked_cpu(monkeypatch):
    """cpu_gemm_choice -> onednn_route -> which function GEMM 1 calls, with the CPU read mocked."""
    monkeypatch.setattr(gemm, "_CPU_GEMM", "auto")
    monkeypatch.setattr(gemm, "_CHOICE", {})
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    for cpu, want in ((INTEL, "blas"), (AMD, "onednn")):
        monkeypatch.setattr(gemm, "cpu_info", lambda cpu=cpu: cpu)
        gemm._CHOICE.clear()
        assert gemm.cpu_gemm_library() == want
        assert gemm.onednn_route(torch.device("cpu"), torch.float32) == (want == "onednn")


def test_parse_cpuinfo_reads_the_first_processor():
    text = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel name\t: Intel(R) Xeon(R) CPU\n"
            "flags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nvendor_id\t: Other\n")
    info = parse_cpuinfo(text)
    assert info == CPUInfo("GenuineIntel", "Intel(R) Xeon(R) CPU", frozenset({"fpu", "avx2", "avx512f"}), 6)
    assert info.avx512
    assert parse_cpuinfo("vendor_id\t: X\n").family == -1  # no family line: unknown


ZEN4 = CPUInfo("AuthenticAMD", "AMD EPYC 9R14", frozenset({"avx2", "fma", "avx512f"}), 25)
ZEN3 = CPUInfo("AuthenticAMD", "AMD EPYC 7R13", frozenset({"avx2", "fma"}), 25)
ZEN5 = CPUInfo("AuthenticAMD", "AMD EPYC 9R45", frozenset({"avx2", "fma", "avx512f"}), 26)


@pytest.mark.parametrize("cpu, want", [
    (ZEN4, (gemm.ZEN4_TRANSPOSED_GRAD_MIN_CHUNK_ROWS, gemm.ZEN4_TRANSPOSED_GRAD_MIN_ROWS,
            gemm.ZEN4_TRANSPOSED_GRAD_MAX_DIM)),
    (ZEN3, (0, 0, None)), (ZEN5, (0, 0, None)), (INTEL, (0, 0, None)), (UNKNOWN, (0, 0, None))])
def test_transposed_grad_bounds_by_cpu(cpu, want):
    assert gemm.transposed_grad_bounds(cpu) == want


@pytest.mark.parametrize("setting", ["blas", "onednn"])
def test_both_libraries_within_the_float64_rule_at_a_chunked_size(monkeypatch, setting):
    """Each library, forced on a size where the oneDNN thresholds are met (and the chunked path runs), against
    float64: fp32 within a few roundings of V-term sums."""
    monkeypatch.setattr(gemm, "_CPU_GEMM", setting)
    _onednn_at_any_size(monkeypatch)
    h64, w64 = rand(N, D), rand(V, D)
    y = labels_with_mask((N,), V)
    h, w = (x.requires_grad_() for x in _f32(h64, w64))
    for chunk in (None, 8):  # the one-chunk fast path and the chunk loop
        loss = ptk.linear_cross_entropy(h, w, y, chunk_size=chunk, backend="native" if "native" in
                                        ptk.backends("cpu") else "torch")
        gh, gw = torch.autograd.grad(loss, (h, w))
        truth = reference.linear_cross_entropy(h64, w64, y)
        th, tw = torch.autograd.grad(truth, (h64, w64))
        assert_close_to_truth(loss, truth, FP32, f"{setting} loss")
        assert_close_to_truth(gh, th, FP32, f"{setting} dh")
        assert_close_to_truth(gw, tw, FP32, f"{setting} dW")

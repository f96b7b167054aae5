"""The native extension ptkernels._C behind the custom ops of ptkernels/ops/backends/native_ops/.

Bad input of every kind (dtype, strides, shapes, devices, zero sizes, index ranges, aliasing) gets a clear error or a
correct result, never an out-of-bounds access; the ops trace through torch.compile (fullgraph) and pass
torch.library.opcheck; the extension is really built in CI; a machine without it still imports ptkernels.
Numerics against the float64 reference are in tests/ops (every op runs there with backend="native" too).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ptkernels as ptk
from ptkernels import reference
from ptkernels.ops.backends import native_ops as native  # registers the torch.ops.ptkernels custom ops
from ptkernels.ops.backends.base import RowOptions
from ptkernels.ops.backends.torch import TorchRows
from ptkernels.ops.core import dispatch  # noqa: F401
from tests.helpers import FUSED_BACKENDS, assert_close_to_truth

REPO = Path(__file__).resolve().parents[3]
NATIVE_CPU = "native" in ptk.backends("cpu")
needs_native = pytest.mark.skipif(not NATIVE_CPU, reason=f"native backend unusable: "
                                                         f"{dispatch.unusable_reason('native', 'cpu')}")
OPS = torch.ops.ptkernels
TORCH_ROWS = TorchRows()
ALL = RowOptions(label_smoothing=0.1, z_loss=1e-3, softcap=6.0, temperature=0.8)


def _rows():
    from ptkernels.ops.backends.native import NATIVE_ROWS

    return NATIVE_ROWS


def _logits(n, v, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)


def _labels(n, v, seed=1, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return y


def _ce_args(o: RowOptions | None = None):
    o = o or RowOptions()
    return (o.ignore_index, o.label_smoothing, o.z_loss, 0.0 if o.softcap is None else o.softcap, 1.0 / o.temperature)


# --------------------------------------------------------------------------------------------- the build


def test_extension_is_built_in_ci():
    """CI (CI=true) installs with pip install -e . on a fresh machine: the extension must have been built there."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("not in CI")
    assert NATIVE_CPU, f"CI must build ptkernels._C: {dispatch.unusable_reason('native', 'cpu')}"
    assert "native" in FUSED_BACKENDS


@needs_native
def test_module_abi():
    from ptkernels import _C

    assert isinstance(_C.has_cuda, bool)
    assert _C.abi_version == dispatch.NATIVE_ABI_VERSION
    assert "cpu kernels" in _C.build_info()
    assert "native" in FUSED_BACKENDS
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "native"
    if not torch.cuda.is_available():
        assert "native" not in ptk.backends("cuda") or _C.has_cuda


def test_import_without_the_extension_falls_back():
    """A machine where the build failed: ptkernels imports, native is unusable and says why, auto uses torch."""
    code = (
        "import sys; sys.modules['ptkernels._C'] = None\n"
        "import torch, ptkernels as ptk\n"
        "from ptkernels.ops.core import dispatch\n"
        "assert 'native' not in ptk.backends('cpu'), ptk.backends('cpu')\n"
        "assert 'not built' in dispatch.unusable_reason('native', 'cpu')\n"
        "assert dispatch.resolve_backend('auto', torch.device('cpu')) == 'torch'\n"
        "h, w, y = torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 6, -100])\n"
        "ptk.linear_cross_entropy(h, w, y)\n"
        "try:\n"
        "    ptk.linear_cross_entropy(h, w, y, backend='native')\n"
        "    raise SystemExit('native did not raise')\n"
        "except RuntimeError as e:\n"
        "    assert 'native' in str(e)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_failed_build_by_hand_fails_saying_what_is_missing(tmp_path):
    """A broken compiler: `python setup.py build_ext` run by hand (the README's in-tree build) exits non-zero with a
    clear error naming what the build needs; exiting 0 would read as success. (pip's builds only warn: the
    extension is optional.)"""
    env = dict(os.environ, CXX="/bin/false", PTK_BUILD_CUDA="0")
    env.pop("PTK_REQUIRE_NATIVE", None)
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "tmp")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0, out.stderr[-3000:]
    assert "native extension ptkernels._C was not built" in out.stderr
    assert "pybind11 and ninja" in out.stderr
    assert not list((tmp_path / "lib").rglob("_C*.so"))


# ------------------------------------------------------------------------------------- cross-entropy rows


@needs_native
def test_ce_op_rejects_bad_dtypes_and_shapes():
    z, y = _logits(5, 11), _labels(5, 11)
    with pytest.raises(TypeError, match="logits"):
        OPS.ce_rows(z.to(torch.int32), y, None, None, *_ce_args())
    with pytest.raises(TypeError, match="logits"):
        OPS.ce_rows(z.to(torch.complex64), y, None, None, *_ce_args())
    with pytest.raises(TypeError, match="labels"):
        OPS.ce_rows(z, y.to(torch.int32), None, None, *_ce_args())
    with pytest.raises(ValueError, match="labels"):
        OPS.ce_rows(z, y[:4], None, None, *_ce_args())
    with pytest.raises(ValueError, match="logits must be 2-D"):
        OPS.ce_rows(z.view(-1), y, None, None, *_ce_args())
    with pytest.raises(ValueError, match="at least one column"):
        OPS.ce_rows(torch.empty(5, 0), y, None, None, *_ce_args())
    with pytest.raises(TypeError, match="grad_scale"):
        OPS.ce_rows(z, y, torch.ones(5, dtype=torch.float64), torch.empty_like(z), *_ce_args())
    with pytest.raises(ValueError, match="grad_scale"):
        OPS.ce_rows(z, y, torch.ones(4), torch.empty_like(z), *_ce_args())
    with pytest.raises(TypeError, match="grad"):
        OPS.ce_rows(z, y, None, torch.empty(5, 11, dtype=torch.float64), *_ce_args())
    with pytest.raises(ValueError, match="grad"):
        OPS.ce_rows(z, y, None, torch.empty(5, 12), *_ce_args())
    with pytest.raises(ValueError, match="inv_temperature"):
        OPS.ce_rows(z, y, None, None, -100, 0.0, 0.0, 0.0, 0.0)


@needs_native
def test_ce_op_rejects_bad_strides_and_aliasing():
    z, y = _logits(6, 10), _labels(6, 10)
    with pytest.raises(ValueError, match="unit stride"):
        OPS.ce_rows(z.t().contiguous().t(), y, None, None, *_ce_args())  # column-major
    with pytest.raises(ValueError, match="rows must not overlap"):
        OPS.ce_rows(z, y, None, torch.empty(10).expand(6, 10), *_ce_args())
    with pytest.raises(ValueError, match="overlaps logits"):
        big = _logits(6, 11)
        OPS.ce_rows(big[:, :10], y, None, big[:, 1:], *_ce_args())  # shifted by one column
    buf = torch.zeros(6, 10)
    labels_in_buf = buf.view(-1)[:12].view(torch.int64)  # int64 labels living inside the gradient buffer
    with pytest.raises(ValueError, match="overlaps labels"):
        OPS.ce_rows(z, labels_in_buf, None, buf, *_ce_args())
    with pytest.raises(ValueError, match="overlaps grad_scale"):
        OPS.ce_rows(z, y, buf[2, :6], buf, *_ce_args())


@needs_native
def test_ce_op_rejects_foreign_devices():
    """Mismatched devices name the argument; a device the kernels do not run on is refused (meta tensors reach
    only the fake kernel through the dispatcher, so the implementation is called directly here)."""
    z, y = _logits(4, 9), _labels(4, 9)
    with pytest.raises(ValueError, match="labels is on meta"):
        native.rows._run_ce(z, y.to("meta"), None, None, *_ce_args())
    with pytest.raises(ValueError, match="grad is on meta"):
        native.rows._run_ce(z, y, None, torch.empty(4, 9, device="meta"), *_ce_args())
    with pytest.raises(ValueError, match="CPU and CUDA"):
        native.rows._run_ce(z.to("meta"), y.to("meta"), None, None, *_ce_args())
    with pytest.raises(ValueError, match="labels is on meta.*logits"):
        ptk.cross_entropy(z, y.to("meta"), backend="native")


@needs_native
@pytest.mark.parametrize("bad", [9, -1, 10**9, -(2**62)])
def test_labels_out_of_range_raise(bad):
    z, y = _logits(4, 9), torch.tensor([0, bad, 8, -100])
    with pytest.raises(ValueError, match="labels"):
        OPS.ce_rows(z, y, None, None, *_ce_args())
    with pytest.raises(ValueError, match="labels"):
        OPS.ce_rows_inplace(z.clone(), y, None, *_ce_args())
    with pytest.raises(ValueError, match="targets"):
        OPS.logprob_fwd(z, y, -100, 0.0, 1.0, False)
    with pytest.raises(ValueError, match="labels"):
        ptk.cross_entropy(z, y, backend="native")
    with pytest.raises(ValueError, match="targets"):
        ptk.token_logprobs(z, y, backend="native")
    with pytest.raises(ValueError, match="labels"):
        ptk.linear_cross_entropy(torch.randn(4, 3), torch.randn(9, 3), y, backend="native")


@needs_native
def test_kernel_guards_labels_even_without_the_python_check(monkeypatch):
    """The C++ kernel checks the label range itself (no out-of-bounds access even if a caller skips the check)."""
    monkeypatch.setattr(native.rows, "check_index", lambda *a, **k: None)  # the row ops look it up there
    z = _logits(4, 9)
    grad = torch.full_like(z, 7.0)
    with pytest.raises(ValueError, match="1 value"):
        OPS.ce_rows(z, torch.tensor([0, 10**12, 8, -100]), None, grad, *_ce_args())
    assert torch.equal(grad[1], torch.zeros(9))  # the bad row: zero gradient, nothing outside it touched
    with pytest.raises(ValueError, match="2 value"):
        OPS.logprob_bwd(z, torch.tensor([-5, 9, 1, 2]), torch.zeros(4), None, torch.ones(4), None, grad,
                        -100, 0.0, 1.0)


@needs_native
def test_zero_rows_and_one_column():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        z = torch.empty(0, 7, dtype=dtype)
        loss, lse, grad = _rows().ce(z, torch.empty(0, dtype=torch.long), RowOptions(), want_grad=True)
        assert loss.shape == (0,) and lse.shape == (0,) and grad.shape == (0, 7)
        logp, lse, ms = _rows().logprob_fwd(z, torch.empty(0, dtype=torch.long), RowOptions(), True)
        assert logp.shape == (0,) and ms.shape == (0,)
    z = _logits(5, 1)
    loss, lse, grad = _rows().ce(z, torch.zeros(5, dtype=torch.long), RowOptions(), want_grad=True)
    assert torch.allclose(loss, torch.zeros(5), atol=1e-6) and torch.allclose(grad, torch.zeros(5, 1), atol=1e-6)
    assert torch.allclose(lse, z[:, 0], atol=1e-6)
    assert ptk.cross_entropy(torch.empty(0, 5), torch.empty(0, dtype=torch.long), backend="native").item() == 0.0


@needs_native
@pytest.mark.parametrize("layout", ["column_stride_2", "row_padding", "transposed", "expanded_rows", "int32_labels"])
def test_strided_inputs_give_correct_results(layout):
    v = 53
    base = _logits(9, 2 * v + 3)
    y = _labels(9, v)
    if layout == "column_stride_2":
        z = base[:, : 2 * v : 2]
    elif layout == "row_padding":  # row stride > V: used in place of a copy
        z = base[:, 3:v + 3]
    elif layout == "transposed":
        z = base[:, :v].t().contiguous().t()
    elif layout == "expanded_rows":  # stride 0 along rows: one row read 9 times
        z = base[0, :v].expand(9, v)
    else:
        z, y = base[:, :v], y.to(torch.int32)
    for o in (RowOptions(), ALL):
        want = TORCH_ROWS.ce(z.double(), y.long(), o, want_grad=True, grad_scale=torch.linspace(0.5, 2, 9,
                                                                                                   dtype=torch.float64))
        got = _rows().ce(z, y, o, want_grad=True, grad_scale=torch.linspace(0.5, 2, 9))
        for a, b, what in zip(got, want, ("loss", "lse", "grad")):
            assert_close_to_truth(a, b, 1e-5, f"{layout} {what}")
        lp_want = TORCH_ROWS.logprob_fwd(z.double(), y.long(), o, True)
        lp_got = _rows().logprob_fwd(z, y, o, True)
        for a, b, what in zip(lp_got, lp_want, ("logp", "lse", "mean_s")):
            assert_close_to_truth(a, b, 1e-5, f"{layout} {what}")
        g_want = torch.empty(9, v, dtype=torch.float64)
        gl, ge = torch.linspace(-1, 1, 9, dtype=torch.float64), torch.linspace(2, -1, 9, dtype=torch.float64)
        TORCH_ROWS.logprob_bwd(z.double(), y.long(), lp_want[1], lp_want[2], gl, ge, o, g_want)
        g_got = torch.empty(v, 9).t()  # a column-major grad_out: written through a buffer and copied
        _rows().logprob_bwd(z, y, lp_got[1], lp_got[2], gl, ge, o, g_got)
        assert_close_to_truth(g_got, g_want, 1e-5, f"{layout} logprob grad")


@needs_native
def test_grad_out_variants():
    z, y = _logits(7, 31), _labels(7, 31)
    want = TORCH_ROWS.ce(z, y, ALL, want_grad=True)[2]
    # separate buffer, other dtype, non-contiguous: all correct
    for grad_out in (torch.empty(7, 31), torch.empty(7, 31, dtype=torch.float64), torch.empty(31, 7).t(),
                     torch.empty(7, 40)[:, :31]):
        _, _, g = _rows().ce(z, y, ALL, want_grad=True, grad_out=grad_out)
        assert g is grad_out
        assert_close_to_truth(grad_out, want, 1e-5, "grad_out")
    assert torch.equal(z, _logits(7, 31)), "z must not be written unless allowed"
    # in place: scratch, or grad_out is z (the very object, or another view of the same memory)
    for how in ("scratch", "same", "view"):
        zz = z.clone()
        ptr = zz.data_ptr()
        if how == "scratch":
            _, _, g = _rows().ce(zz, y, ALL, want_grad=True, scratch=True)
        else:
            _, _, g = _rows().ce(zz, y, ALL, want_grad=True, grad_out=zz if how == "same" else zz.view(7, 31))
        assert g.data_ptr() == ptr
        assert_close_to_truth(zz, want, 1e-5, how)


@needs_native
def test_special_values_follow_pytorch():
    z = _logits(4, 20)
    z[0, 3] = float("-inf")  # a -inf logit: probability 0, finite loss
    z[1, 5] = float("nan")  # NaN propagates
    z[2, :] = 0.0  # uniform
    y = torch.tensor([1, 2, 7, -100])
    loss, lse, grad = _rows().ce(z, y, RowOptions(), want_grad=True)
    want = TORCH_ROWS.ce(z.double(), y, RowOptions(), want_grad=True)
    assert torch.isfinite(loss[0]) and grad[0, 3] == 0 and torch.isnan(loss[1])
    assert_close_to_truth(loss[[0, 2, 3]], want[0][[0, 2, 3]], 1e-6, "loss")
    assert loss[3] == 0 and lse[3] == 0 and torch.equal(grad[3], torch.zeros(20))


@needs_native
def test_large_vocab_and_threads_are_deterministic():
    """V > 65,536; the result does not depend on the number of threads (one row is one thread's work)."""
    z, y = _logits(6, 70_001, scale=5.0), _labels(6, 70_001)
    want = TORCH_ROWS.ce(z.double(), y, ALL, want_grad=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _rows().ce(z, y, ALL, want_grad=True)
        torch.set_num_threads(max(2, threads))
        many = _rows().ce(z, y, ALL, want_grad=True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    for a, b, what in zip(one, want, ("loss", "lse", "grad")):
        assert_close_to_truth(a, b, 1e-5, what)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_storage_computes_in_fp32(dtype):
    z, y = _logits(8, 300, dtype=dtype, scale=4.0), _labels(8, 300)
    loss, lse, grad = _rows().ce(z, y, ALL, want_grad=True)
    want = TORCH_ROWS.ce(z.double(), y, ALL, want_grad=True)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close_to_truth(loss, want[0], 1e-6, "loss")  # the logits are exact in fp32: fp32 accuracy
    assert_close_to_truth(grad, want[2], 2 ** -8, "grad")  # one rounding to the storage dtype


# ------------------------------------------------------------------------------------------ log-prob rows


@needs_native
def test_logprob_ops_reject_bad_input():
    z, y = _logits(5, 11), _labels(5, 11)
    lse, g = torch.zeros(5), torch.ones(5)
    with pytest.raises(TypeError, match="targets"):
        OPS.logprob_fwd(z, y.float(), -100, 0.0, 1.0, True)
    with pytest.raises(TypeError, match="lse"):
        OPS.logprob_bwd(z, y, lse.double(), None, g, None, torch.empty_like(z), -100, 0.0, 1.0)
    with pytest.raises(ValueError, match="g_logp"):
        OPS.logprob_bwd(z, y, lse, None, g[:4], None, torch.empty_like(z), -100, 0.0, 1.0)
    with pytest.raises(ValueError, match="g_logp must be contiguous"):
        OPS.logprob_bwd(z, y, lse, None, torch.ones(10)[::2], None, torch.empty_like(z), -100, 0.0, 1.0)
    with pytest.raises(ValueError, match="mean_s"):
        OPS.logprob_bwd(z, y, lse, None, g, g, torch.empty_like(z), -100, 0.0, 1.0)
    with pytest.raises(ValueError, match="overlaps g_logp"):
        buf = torch.zeros(5, 11)
        OPS.logprob_bwd(z, y, lse, None, buf[0, :5], None, buf, -100, 0.0, 1.0)


# ----------------------------------------------------------------------------------------- segment sums


@needs_native
def test_segment_ops_reject_bad_input():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="cu_seqlens"):
        OPS.segment_sums(x, None, torch.tensor([0, 4, 3, 10]), 3, False)
    with pytest.raises(ValueError, match="cu_seqlens"):
        OPS.segment_sums(x, None, torch.tensor([0, 4, 11]), 2, False)
    with pytest.raises(ValueError, match="cu_seqlens"):
        OPS.segment_sums(x, None, torch.tensor([1, 4, 10]), 2, False)
    with pytest.raises(TypeError, match="cu_seqlens"):
        OPS.segment_sums(x, None, torch.tensor([0, 10], dtype=torch.int32), 1, False)
    with pytest.raises(ValueError, match="cu_seqlens"):
        OPS.segment_sums(x, None, torch.tensor([0, 5, 10]), 1, False)  # n_seqs inconsistent with cu_seqlens
    with pytest.raises(TypeError, match="x must have dtype"):
        OPS.segment_sums(x.half(), None, torch.tensor([0, 10]), 1, False)
    with pytest.raises(TypeError, match="mask"):
        OPS.segment_sums(x, torch.ones(10, dtype=torch.bool), torch.tensor([0, 10]), 1, False)
    with pytest.raises(ValueError, match="contiguous"):
        OPS.segment_sums(torch.randn(20)[::2], None, torch.tensor([0, 10]), 1, False)
    with pytest.raises(ValueError, match="padded x"):
        OPS.segment_sums(x.view(2, 5), None, None, 3, False)
    with pytest.raises(ValueError, match="inconsistent"):
        OPS.segment_sums_bwd(torch.ones(2), torch.ones(2), None, None, 9, 5, False)
    with pytest.raises(ValueError, match="cu_seqlens"):  # the public function, through the native backend
        ptk.packed_sequence_logprobs(x, torch.tensor([0, 3, 2, 10]), backend="native")


@needs_native
def test_segment_sums_edge_cases():
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 0, 5, 5, 12], dtype=torch.int32)  # empty sequences in the middle and at the start
    mask = torch.rand(12, dtype=torch.float64) > 0.3
    for average in (False, True):
        ours = ptk.packed_sequence_logprobs(x, cu, mask=mask, average=average, backend="native")
        truth = reference.sequence.packed_sequence_logprobs(x, cu, mask=mask, average=average)
        assert_close_to_truth(ours, truth, 1e-14, "packed")
        g = torch.randn(4, dtype=torch.float64)
        assert_close_to_truth(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(truth, x, g)[0], 1e-14, "grad")
    assert ptk.packed_sequence_logprobs(torch.randn(0), torch.tensor([0]), backend="native").shape == (0,)
    out = ptk.sequence_logprobs(torch.randn(3, 0), torch.ones(3, 0, dtype=torch.bool), average=True, backend="native")
    assert torch.equal(out, torch.zeros(3))
    strided = torch.randn(4, 20, dtype=torch.float64)[:, ::3]  # non-contiguous input: made contiguous first
    m = torch.ones_like(strided, dtype=torch.bool)
    assert_close_to_truth(ptk.sequence_logprobs(strided, m, backend="native"),
                          reference.sequence.sequence_logprobs(strided, m), 1e-14, "strided")


# ------------------------------------------------------------------------------------------------ RL


@needs_native
def test_gae_op_rejects_bad_input_and_public_gae_takes_any_layout():
    r, v, m = torch.randn(3, 8), torch.randn(3, 8), torch.ones(3, 8)
    with pytest.raises(TypeError, match="values"):
        OPS.gae(r, v.double(), m, 1.0, 0.95)
    with pytest.raises(ValueError, match="mask has shape"):
        OPS.gae(r, v, m[:2], 1.0, 0.95)
    with pytest.raises(ValueError, match="contiguous"):
        OPS.gae(r, v.t().contiguous().t(), m, 1.0, 0.95)
    with pytest.raises(ValueError, match="gamma"):
        OPS.gae(r, v, m, 1.5, 0.95)
    with pytest.raises(ValueError, match="rewards must be 2-D"):
        OPS.gae(r.view(-1), v.view(-1), m.view(-1), 1.0, 0.95)
    adv, ret = OPS.gae(torch.empty(0, 8), torch.empty(0, 8), torch.empty(0, 8), 1.0, 0.95)
    assert adv.shape == (0, 8)
    rr, vv = torch.randn(8, 3, dtype=torch.float64).t(), torch.randn(8, 3, dtype=torch.float64).t()
    mm = (torch.rand(8, 3) > 0.2).t()
    ours = ptk.gae(rr, vv, mm, gamma=0.99, lam=0.9, backend="native")
    truth = reference.rl.gae(rr, vv, mm, gamma=0.99, lam=0.9)
    for a, b in zip(ours, truth):
        assert_close_to_truth(a, b, 1e-12, "gae")


@needs_native
def test_group_advantages_op_rejects_bad_input():
    r = torch.randn(12)
    with pytest.raises(ValueError, match="group_size"):
        OPS.group_advantages(r, 5, 0, 1e-4)
    with pytest.raises(ValueError, match="scale_mode"):
        OPS.group_advantages(r, 3, 7, 1e-4)
    with pytest.raises(ValueError, match="eps"):
        OPS.group_advantages(r, 3, 0, -1.0)
    with pytest.raises(ValueError, match="contiguous"):
        OPS.group_advantages(torch.randn(24)[::2], 3, 0, 1e-4)
    with pytest.raises(TypeError, match="rewards"):
        OPS.group_advantages(r.half(), 3, 0, 1e-4)
    assert OPS.group_advantages(torch.empty(0), 4, 1, 1e-4).shape == (0,)
    strided = torch.randn(24, dtype=torch.float64)[::2]
    for scale in ("group", "batch", "none"):
        ours = ptk.group_advantages(strided, group_size=4, scale=scale, backend="native")
        torch_ = ptk.group_advantages(strided, group_size=4, scale=scale, backend="torch")
        assert_close_to_truth(ours, torch_, 1e-12, scale)


# ------------------------------------------------------------------------------- custom ops and compile


def _opcheck_samples():
    z, y = _logits(6, 13), _labels(6, 13)
    lse = torch.logsumexp(z, 1)
    x = torch.randn(10)
    cu = torch.tensor([0, 3, 3, 10])
    return [
        ("ce_rows", (z, y, None, None, *_ce_args(ALL))),
        ("ce_rows", (z, y, torch.rand(6), torch.empty_like(z), *_ce_args(ALL))),
        ("ce_rows_inplace", (z.clone(), y, torch.rand(6), *_ce_args())),
        ("logprob_fwd", (z, y, -100, 6.0, 1.25, True)),
        ("logprob_bwd", (z, y, lse, torch.zeros(6), torch.randn(6), torch.randn(6), torch.empty_like(z), -100,
                         0.0, 1.0)),
        ("logprob_bwd_inplace", (z.clone(), y, lse, None, torch.randn(6), None, -100, 0.0, 1.0)),
        ("segment_sums", (x, torch.rand(10), cu, 3, True)),
        ("segment_sums", (x.view(2, 5), None, None, 2, False)),
        ("segment_sums_bwd", (torch.randn(3), torch.rand(3) + 1, torch.rand(10), cu, 10, 0, True)),
        ("gae", (torch.randn(3, 7), torch.randn(3, 7), (torch.rand(3, 7) > 0.3).float(), 0.99, 0.95)),
        ("group_advantages", (torch.randn(12), 4, 0, 1e-4)),
    ]


@needs_native
@pytest.mark.parametrize("case", range(len(_opcheck_samples())))
def test_opcheck(case):
    """Schema (mutations declared), fake kernels and AOT dispatch agree with the real kernels."""
    name, args = _opcheck_samples()[case]
    torch.library.opcheck(getattr(OPS, name).default, args)


@needs_native
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_compile_traces_the_native_ops(inplace_backward):
    logits0 = _logits(12, 37, dtype=torch.float32)
    y = _labels(12, 37)
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))  # with the autograd.Function bodies
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def f(logits, labels):
        work = logits * 1.0
        return ptk.cross_entropy(work, labels, label_smoothing=0.1, softcap=5.0, chunk_size=5, backend="native",
                                 inplace_backward=inplace_backward)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=recording_aot_eager, fullgraph=True)
    a = logits0.clone().requires_grad_()
    out = compiled(a, y)
    out.backward()
    b = logits0.clone().requires_grad_()
    ref = f(b, y)
    ref.backward()
    assert_close_to_truth(out, ref, 1e-6, "loss")
    assert_close_to_truth(a.grad, b.grad, 1e-6, "grad")
    assert any("ptkernels.ce_rows" in g for g in graphs), graphs


@needs_native
def test_compile_linear_ops_fullgraph_aot_eager():
    h, w = torch.randn(21, 8, requires_grad=True), torch.randn(97, 8, requires_grad=True)
    y = _labels(21, 97)

    def f(h, w, y):
        loss = ptk.linear_cross_entropy(h, w, y, z_loss=1e-3, chunk_size=8, backend="native")
        logp, ent = ptk.linear_token_logprobs(h, w, y, return_entropy=True, chunk_size=8, backend="native")
        seq = ptk.sequence_logprobs(logp.view(3, 7), (y != -100).view(3, 7), backend="native")
        return loss + seq.sum() * 0.01 + ent.sum() * 0.01

    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(h, w, y)
    g = torch.autograd.grad(out, (h, w))
    ref = f(h, w, y)
    g_ref = torch.autograd.grad(ref, (h, w))
    assert_close_to_truth(out, ref, 1e-6, "value")
    for a, b in zip(g, g_ref):
        assert_close_to_truth(a, b, 1e-6, "grad")


# ----------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_native_matches_torch():
    if "native" not in ptk.backends("cuda"):
        pytest.skip(f"native unusable on CUDA: {dispatch.unusable_reason('native', 'cuda')}")
    for dtype in (torch.float32, torch.bfloat16):
        z = _logits(33, 5003, dtype=dtype).cuda()
        y = _labels(33, 5003).cuda()
        got = _rows().ce(z, y, ALL, want_grad=True, grad_scale=torch.rand(33, device="cuda"))
        want = TORCH_ROWS.ce(z.double(), y, ALL, want_grad=True, grad_scale=got[0].new_ones(33).double())
        assert_close_to_truth(got[0], want[0], 1e-5, f"{dtype} loss")
    r = torch.randn(64, device="cuda")
    for scale in ("group", "batch", "none"):
        assert_close_to_truth(ptk.group_advantages(r, group_size=8, scale=scale, backend="native"),
                              ptk.group_advantages(r, group_size=8, scale=scale, backend="torch"), 1e-5, scale)
    rr, vv, mm = torch.randn(4, 50, device="cuda"), torch.randn(4, 50, device="cuda"), torch.rand(4, 50, device="cuda")
    for a, b in zip(ptk.gae(rr, vv, mm > 0.2, backend="native"), ptk.gae(rr, vv, mm > 0.2, backend="torch")):
        assert_close_to_truth(a, b, 1e-5, "gae")
    x, cu = torch.randn(100, device="cuda"), torch.tensor([0, 10, 10, 64, 100], device="cuda")
    assert_close_to_truth(ptk.packed_sequence_logprobs(x, cu, average=True, backend="native"),
                          ptk.packed_sequence_logprobs(x, cu, average=True, backend="torch"), 1e-5, "segments")


# --------------------------------------------------------------------------- eager calls without the dispatcher


@needs_native
def test_eager_calls_skip_the_dispatcher_with_the_same_result():
    """native_ops.X runs the op's own implementation in plain eager code (no ~0.1 ms of dispatch per call):
    the same numbers as the dispatched op, bit for bit."""
    z, y = _logits(7, 11), _labels(7, 11)
    direct_z, op_z = z.clone(), z.clone()
    direct = native.ce_rows_inplace(direct_z, y, None, *_ce_args(ALL))
    dispatched = OPS.ce_rows_inplace(op_z, y, None, *_ce_args(ALL))
    for a, b in zip(direct + (direct_z,), dispatched + (op_z,)):
        assert torch.equal(a, b)
    assert native.ce_rows_inplace.op is native.rows.ce_rows_inplace  # the op itself stays reachable
    # ... and in plain eager code the dispatcher is not entered (the profiler records every dispatched op)
    h, w = torch.randn(6, 5, requires_grad=True), torch.randn(9, 5, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ptk.linear_cross_entropy(h, w, _labels(6, 9), backend="native").backward()
    names = [e.name for e in prof.events()]
    assert "aten::mm" in names and not any(n.startswith("ptkernels::") for n in names), names


@needs_native
def test_a_dispatch_mode_still_sees_the_ops():
    """Under a TorchDispatchMode (FakeTensorMode, flop counters, debug modes) the calls go through the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    h = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(9, 5, requires_grad=True)
    y = _labels(6, 9)
    with Record() as mode:
        ptk.linear_cross_entropy(h, w, y, backend="native").backward()
    assert any("ptkernels.ce_rows" in name for name in mode.names), mode.names

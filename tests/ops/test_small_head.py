"""The CPU small-shape paths of linear_cross_entropy and linear_token_logprobs (ops/small_head.py): where they
are taken, and that they give the float64 truth and the general path's numbers with every option, mask and
gradient subset."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ptkernels as ptk
import ptkernels.ops.linear_cross_entropy as lce
import ptkernels.ops.small_head as small_head
import ptkernels.ops.token_logprobs as tl
from ptkernels import reference
from ptkernels.ops.core import gemm
from tests import helpers
from tests.helpers import assert_close_to_truth

pytestmark = pytest.mark.skipif("native" not in ptk.backends(torch.device("cpu")),
                                reason="the native extension is not built")

N, D, V = 37, 19, 251
CPU = torch.device("cpu")  # the small paths are CPU paths: every tensor here is on the CPU, also where a GPU is


def rand(*shape, **kw):
    return helpers.rand(*shape, device=CPU, **kw)


def labels_with_mask(*args, **kw):
    return helpers.labels_with_mask(*args, **kw).cpu()

OPTIONS = {
    "plain": {},
    "all": dict(label_smoothing=0.2, z_loss=1e-2, softcap=4.0, temperature=1.3),
}


def _spy(monkeypatch, module, name: str) -> list:
    """A list that gets one entry (the Function's 6th argument) per call of ``module.name``'s small path."""
    calls = []
    real = getattr(module, name)

    class Spy:
        @staticmethod
        def apply(*args):
            calls.append(args[5])
            return real.apply(*args)

    monkeypatch.setattr(module, name, Spy)
    return calls


@pytest.fixture
def taken(monkeypatch):
    return _spy(monkeypatch, lce, "SmallLinearCrossEntropy")


@pytest.fixture
def taken_lp(monkeypatch):
    return _spy(monkeypatch, tl, "SmallLinearTokenLogprobs")


def _labels(mask: str) -> torch.Tensor:
    if mask == "none":
        return torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    return labels_with_mask((N,), V) if mask == "some" else torch.full((N,), -100)


def _loss_and_grads(hidden, weight, bias, labels, **kw):
    loss = ptk.linear_cross_entropy(hidden, weight, labels, bias=bias, **kw)
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    if not inputs:
        assert not loss.requires_grad
        return loss, ()
    return loss, torch.autograd.grad(loss * 3.0, inputs)  # an incoming gradient that is not 1


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("mask", ["some", "none", "all"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_truth_and_the_chunk_loop(taken, reduction, option, mask, with_bias):
    hidden, weight = rand(N, D), rand(V, D)
    bias = rand(V) if with_bias else None
    labels = _labels(mask)
    kw = dict(reduction=reduction, **OPTIONS[option])
    small = _loss_and_grads(hidden, weight, bias, labels, backend="native", **kw)
    assert taken == [reduction]
    loop = _loss_and_grads(hidden, weight, bias, labels, backend="native", chunk_size=5, **kw)
    assert len(taken) == 1, "chunk_size below N takes the chunk loop"
    truth = _loss_and_grads(hidden, weight, bias, labels, backend="reference", **kw)
    for what, a, b, t in zip(("loss", "dh", "dW", "db"), (small[0], *small[1]), (loop[0], *loop[1]),
                             (truth[0], *truth[1])):
        assert_close_to_truth(a, t, 1e-10, f"small path {what}")
        assert_close_to_truth(a, b, 1e-10, f"small path vs chunk loop {what}")
        if mask == "all":
            assert not a.abs().max() > 0, f"all ignored: {what} must be 0"


@pytest.mark.parametrize("wants", ["hidden", "weight", "bias", "nothing"])
def test_forms_only_the_gradients_asked_for(monkeypatch, taken, wants):
    gemm_calls = []
    for name in ("logits", "input_grad", "weight_grad"):
        real = getattr(gemm, name)
        monkeypatch.setattr(gemm, name, lambda *a, _real=real, _name=name: gemm_calls.append(_name) or _real(*a))
    hidden, weight, bias = (rand(*s, requires_grad=wants == w) for s, w in (((N, D), "hidden"),
                                                                           ((V, D), "weight"), ((V,), "bias")))
    labels = labels_with_mask((N,), V)
    loss, grads = _loss_and_grads(hidden, weight, bias, labels, backend="native")
    assert taken == ["mean"]
    assert gemm_calls == ["logits"] + {"hidden": ["input_grad"], "weight": ["weight_grad"]}.get(wants, [])
    truth, truth_grads = _loss_and_grads(hidden, weight, bias, labels, backend="reference")
    assert_close_to_truth(loss, truth, 1e-10, "loss")
    for a, t in zip(grads, truth_grads):
        assert_close_to_truth(a, t, 1e-10, f"grad of {wants}")


def test_float32_and_odd_layouts_within_1e5_of_float64_truth(taken):
    """fp32, a non-contiguous hidden [B, T, D] view, int32 labels with a stride."""
    base = rand(D, 2, N, requires_grad=False)
    hidden64 = base.permute(1, 2, 0).requires_grad_()  # [2, N, D], strided
    weight64 = rand(V, D)
    labels = torch.stack([labels_with_mask((N,), V), labels_with_mask((N,), V, ignore_every=4)], 1).t()
    labels = labels.to(torch.int32)
    assert not hidden64.is_contiguous() and not labels.is_contiguous()
    h32 = hidden64.detach().float().requires_grad_()
    w32 = weight64.detach().float().requires_grad_()
    loss = ptk.linear_cross_entropy(h32, w32, labels)
    assert taken == ["mean"]
    g = torch.autograd.grad(loss, (h32, w32))
    truth = reference.linear_cross_entropy(hidden64, weight64, labels.long())
    tg = torch.autograd.grad(truth, (hidden64, weight64))
    assert_close_to_truth(loss, truth, 1e-5, "loss")
    for a, t in zip(g, tg):
        assert_close_to_truth(a, t, 1e-5, "grad")


def test_bad_label_raises_naming_labels(taken):
    labels = labels_with_mask((N,), V)
    labels[4] = V
    with pytest.raises(ValueError, match=r"labels has 1 value\(s\) outside \[0, 251\)"):
        ptk.linear_cross_entropy(rand(N, D), rand(V, D), labels)
    assert taken == ["mean"]


class _PassThrough(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------- token log-probs


def _logprobs_and_grads(hidden, weight, bias, targets, entropy, **kw):
    out = ptk.linear_token_logprobs(hidden, weight, targets, bias=bias, return_entropy=entropy, **kw)
    lp, h = out if entropy else (out, None)
    g = torch.Generator().manual_seed(2)
    objective = (lp * torch.randn(N, generator=g, dtype=lp.dtype)).sum()
    if entropy:
        objective = objective + (h * torch.randn(N, generator=g, dtype=h.dtype)).sum()
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    return (lp, h), (torch.autograd.grad(objective, inputs) if inputs else ())


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("mask", ["some", "none", "all"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_logprobs_match_float64_truth_and_the_chunk_loop(taken_lp, entropy, option, mask, with_bias):
    hidden, weight = rand(N, D), rand(V, D)
    bias = rand(V) if with_bias else None
    targets = _labels(mask)
    kw = {k: v for k, v in OPTIONS[option].items() if k in ("softcap", "temperature")}
    small = _logprobs_and_grads(hidden, weight, bias, targets, entropy, backend="native", **kw)
    assert taken_lp == [entropy]
    loop = _logprobs_and_grads(hidden, weight, bias, targets, entropy, backend="native", chunk_size=5, **kw)
    truth = _logprobs_and_grads(hidden, weight, bias, targets, entropy, backend="reference", **kw)
    assert len(taken_lp) == 1
    for what, a, b, t in zip(("logp", "entropy", "dh", "dW", "db"), (*small[0], *small[1]), (*loop[0], *loop[1]),
                             (*truth[0], *truth[1])):
        if t is None:
            assert a is None
            continue
        assert_close_to_truth(a, t, 1e-10, f"small path {what}")
        assert_close_to_truth(a, b, 1e-10, f"small path vs chunk loop {what}")


@pytest.mark.parametrize("wants", ["hidden", "weight", "bias", "nothing"])
def test_logprobs_gradient_subsets_and_a_second_backward(taken_lp, wants):
    hidden, weight, bias = (rand(*s, requires_grad=wants == w) for s, w in (((N, D), "hidden"),
                                                                           ((V, D), "weight"), ((V,), "bias")))
    targets = labels_with_mask((N,), V)
    lp = ptk.linear_token_logprobs(hidden, weight, targets, bias=bias)
    assert taken_lp == [False]
    truth = reference.linear_token_logprobs(hidden, weight, targets, bias=bias)
    assert_close_to_truth(lp, truth, 1e-10, "logp")
    if wants == "nothing":
        assert not lp.requires_grad
        return
    x = {"hidden": hidden, "weight": weight, "bias": bias}[wants]
    first = torch.autograd.grad(lp.sum(), x, retain_graph=True)[0]  # an expanded (stride-0) incoming gradient
    second = torch.autograd.grad((lp * 2.0).sum(), x)[0]  # the kept logits must be unchanged by the first
    want = torch.autograd.grad(truth.sum(), x)[0]
    assert_close_to_truth(first, want, 1e-10, f"grad of {wants}")
    assert_close_to_truth(second, 2.0 * want, 1e-10, f"second backward, grad of {wants}")


def test_logprobs_bad_target_raises_naming_targets(taken_lp):
    targets = labels_with_mask((N,), V)
    targets[7] = -3
    with pytest.raises(ValueError, match=r"targets has 1 value\(s\) outside \[0, 251\)"):
        ptk.linear_token_logprobs(rand(N, D), rand(V, D), targets)
    assert taken_lp == [False]


def test_small_shape_bounds():
    """Every row in one chunk, and at most 2^29 multiply-adds per GEMM (measured crossover, small_head.py)."""
    assert small_head.small_shape(4096, 4096, 872, 128)  # 2^28.8: beyond the other backends' one-chunk bound
    assert small_head.small_shape(128, 512, 8192, 512)  # 2^29 exactly
    assert not small_head.small_shape(1024, 2048, 8192, 128)  # 2^30: the chunk loop
    assert not small_head.small_shape(65, 64, 872, 128)  # rows beyond one chunk
    assert not small_head.small_shape(0, 4096, 872, 128)


CASES = ["compact", "sync_free", "torch", "big", "dispatch_mode"]


@pytest.mark.parametrize("op, case", [("ce", "none")] + [(op, c) for op in ("ce", "logprobs") for c in CASES])
def test_general_path_elsewhere(monkeypatch, op, case):
    """Not taken where its conditions fail; those calls give the same numbers through the general path."""
    taken = _spy(monkeypatch, lce, "SmallLinearCrossEntropy") if op == "ce" else \
        _spy(monkeypatch, tl, "SmallLinearTokenLogprobs")
    hidden, weight = rand(N, D), rand(V, D)
    labels = labels_with_mask((N,), V)
    kw = dict(backend="native")
    kw.update({"none": dict(reduction="none"), "compact": dict(memory="compact"), "sync_free": dict(sync_free=True),
               "torch": dict(backend="torch")}.get(case, {}))
    if case == "big":
        monkeypatch.setattr(small_head, "SMALL_PATH_MAX_MACS", 0)
    fn, ref, row_op = ((ptk.linear_cross_entropy, reference.linear_cross_entropy, "ptkernels.ce_rows") if op == "ce"
                       else (ptk.linear_token_logprobs, reference.linear_token_logprobs, "ptkernels.logprob_fwd"))
    mode = _PassThrough()
    if case == "dispatch_mode":
        with mode:
            out = fn(hidden, weight, labels, **kw)
        assert any(row_op in name for name in mode.ops), "a dispatch mode sees the row op"
    else:
        out = fn(hidden, weight, labels, **kw)
    assert taken == []
    ref_kw = {"reduction": kw["reduction"]} if "reduction" in kw else {}
    assert_close_to_truth(out, ref(hidden, weight, labels, **ref_kw), 1e-10, "output")

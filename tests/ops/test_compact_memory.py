"""memory="compact" (ops/core/vocab_blocks.py) for linear_cross_entropy and linear_token_logprobs: the weight
gradient one vocabulary block at a time, against the float64 reference, on odd shapes whose N, D and V are not
multiples of the blocks, and never through an fp32 [V, D] accumulator."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ptkernels as ptk
from ptkernels import reference
from ptkernels.ops.core import vocab_blocks
from tests.helpers import FUSED_BACKENDS, assert_close_to_truth, bf16_store_slack, labels_with_mask, rand

N, D, V = 37, 19, 251  # odd on purpose; V is prime
BLOCK_V, TILE = 64, 8  # V = 3 full blocks + one of 59 columns; 25 valid rows = 3 full tiles + one of 1

CE_OPTIONS = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "softcap_temperature": dict(softcap=3.0, temperature=0.7),
    "all": dict(label_smoothing=0.2, z_loss=1e-2, softcap=4.0, temperature=1.3),
}
LOGPROB_OPTIONS = {"plain": {}, "softcap_temperature": dict(softcap=5.0, temperature=1.4)}


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks small enough that every test shape spans several vocabulary blocks and row tiles."""
    monkeypatch.setattr(vocab_blocks, "block_shape", lambda v, d, device: (min(BLOCK_V, v), TILE))


def _grads(out, inputs, seed):
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    gos = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    return torch.autograd.grad(outs, inputs, gos)


def _rtol(backend):
    # The Triton kernels take scalar options as fp32, so fp64 inputs are exact only to ~1e-8 there.
    return 1e-10 if backend != "triton" else 1e-6


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(CE_OPTIONS))
def test_cross_entropy_matches_reference_float64(small_blocks, backend, reduction, option):
    hidden, weight, bias = rand(N, D), rand(V, D), rand(V)
    labels = labels_with_mask((N,), V)
    kw = dict(reduction=reduction, **CE_OPTIONS[option])
    ours = ptk.linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=8, memory="compact",
                                    backend=backend, **kw)
    truth = reference.linear_cross_entropy(hidden, weight, labels, bias=bias, **kw)
    assert_close_to_truth(ours, truth, _rtol(backend), "loss")
    ours_g = _grads(ours, (hidden, weight, bias), 1)
    truth_g = _grads(truth, (hidden, weight, bias), 1)
    for name, a, b in zip(("hidden", "weight", "bias"), ours_g, truth_g):
        assert_close_to_truth(a, b, _rtol(backend), f"grad {name}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("sync_free", [False, True])
def test_cross_entropy_agrees_with_default(small_blocks, backend, reduction, sync_free):
    """Without bias, with an ignore_index other than -100; the same numbers as the default path (float64)."""
    hidden, weight = rand(N, D), rand(V, D)
    labels = labels_with_mask((N,), V, ignore_index=-1)
    kw = dict(reduction=reduction, ignore_index=-1, z_loss=1e-3, backend=backend, chunk_size=6,
              sync_free=sync_free)
    a = ptk.linear_cross_entropy(hidden, weight, labels, **kw)
    b = ptk.linear_cross_entropy(hidden, weight, labels, memory="compact", **kw)
    assert_close_to_truth(b, a, 1e-12, "loss")
    for x, y in zip(_grads(b, (hidden, weight), 2), _grads(a, (hidden, weight), 2)):
        assert_close_to_truth(x, y, 1e-12, "grad")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_float32_within_1e5_of_float64_truth(backend, reduction):
    """The real block shape (one block at this V) in fp32: the gradient itself is the accumulator."""
    f32 = torch.float32
    hidden, weight, bias = rand(N, D, dtype=f32), rand(V, D, dtype=f32), rand(V, dtype=f32)
    labels = labels_with_mask((N,), V)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    ours = ptk.linear_cross_entropy(hidden, weight, labels, bias=bias, memory="compact", backend=backend, **kw)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    truth = reference.linear_cross_entropy(h64, w64, labels, bias=b64, **kw)
    assert_close_to_truth(ours, truth, 1e-5, "loss")
    for a, b in zip(_grads(ours, (hidden, weight, bias), 3), _grads(truth, (h64, w64, b64), 3)):
        assert a.dtype == f32
        assert_close_to_truth(a, b, 1e-5, "grad")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_low_precision_no_worse_than_eager(small_blocks, backend, dtype):
    """The rule of test_linear_cross_entropy.py: |truth - ours| <= |truth - eager in the same dtype| + a small
    tolerance, truth in float64; here dW crosses 8 vocabulary blocks, each summed in fp32 and rounded once."""
    hidden, weight = rand(64, 32, dtype=dtype, scale=2.0), rand(509, 32, dtype=dtype)
    labels = labels_with_mask((64,), 509, ignore_every=4)
    ours = ptk.linear_cross_entropy(hidden, weight, labels, memory="compact", backend=backend)
    ours_g = torch.autograd.grad(ours, (hidden, weight))
    eager = F.cross_entropy(F.linear(hidden, weight), labels)
    eager_g = torch.autograd.grad(eager, (hidden, weight))
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    truth = reference.linear_cross_entropy(h64, w64, labels)
    truth_g = torch.autograd.grad(truth, (h64, w64))
    assert (ours.double() - truth).abs() <= (eager.double() - truth).abs() + 1e-3 * truth.abs()
    for a, e, t in zip(ours_g, eager_g, truth_g):
        assert a.dtype == dtype
        err_ours, err_eager = (a.double() - t).norm(), (e.double() - t).norm()
        slack = 1.1 * bf16_store_slack(backend, dtype)
        assert err_ours <= slack * err_eager + 1e-3 * t.norm(), (float(err_ours), float(err_eager))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("option", list(LOGPROB_OPTIONS))
@pytest.mark.parametrize("entropy", [False, True])
def test_token_logprobs_match_reference_float64(small_blocks, backend, option, entropy):
    hidden, weight, bias = rand(N, D), rand(V, D), rand(V)
    targets = labels_with_mask((N,), V)
    kw = dict(bias=bias, return_entropy=entropy, **LOGPROB_OPTIONS[option])
    ours = ptk.linear_token_logprobs(hidden, weight, targets, chunk_size=8, memory="compact", backend=backend,
                                     **kw)
    truth = reference.linear_token_logprobs(hidden, weight, targets, **kw)
    for a, b in zip(ours if entropy else (ours,), truth if entropy else (truth,)):
        assert_close_to_truth(a, b, _rtol(backend), "output")
    for name, a, b in zip(("hidden", "weight", "bias"), _grads(ours, (hidden, weight, bias), 4),
                          _grads(truth, (hidden, weight, bias), 4)):
        assert_close_to_truth(a, b, _rtol(backend), f"grad {name}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_token_logprobs_bf16_no_worse_than_eager(small_blocks, backend):
    hidden, weight = rand(48, 32, dtype=torch.bfloat16, scale=2.0), rand(509, 32, dtype=torch.bfloat16)
    targets = labels_with_mask((48,), 509, ignore_every=4)
    ours = ptk.linear_token_logprobs(hidden, weight, targets, memory="compact", backend=backend)
    eager = torch.log_softmax(F.linear(hidden, weight), -1).gather(-1, targets.clamp(min=0)[:, None])[:, 0]
    eager = eager.masked_fill(targets == -100, 0)
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    truth = reference.linear_token_logprobs(h64, w64, targets)
    go = torch.randn(48, dtype=torch.float64, device=hidden.device)
    ours_g = torch.autograd.grad(ours, (hidden, weight), go.float())
    eager_g = torch.autograd.grad(eager, (hidden, weight), go.to(eager.dtype))
    truth_g = torch.autograd.grad(truth, (h64, w64), go)
    assert (ours.double() - truth).abs().max() <= (eager.double() - truth).abs().max() + 1e-3
    for a, e, t in zip(ours_g, eager_g, truth_g):
        err_ours, err_eager = (a.double() - t).norm(), (e.double() - t).norm()
        slack = 1.1 * bf16_store_slack(backend, torch.bfloat16)
        assert err_ours <= slack * err_eager + 1e-3 * t.norm(), (float(err_ours), float(err_eager))


class _LargestFloat32(TorchDispatchMode):
    """Records the largest fp32 tensor any aten op returns (allocations included: zeros, empty, to, mm)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def _largest_fp32_for(fn, memory, backend):
    hidden = rand(300, 64, dtype=torch.bfloat16)
    weight = rand(1000, 64, dtype=torch.bfloat16)
    labels = labels_with_mask((300,), 1000)
    with _LargestFloat32() as mode:
        out = fn(hidden, weight, labels, memory=memory, backend=backend, chunk_size=16)
        torch.autograd.grad(out.sum(), (hidden, weight))
    return mode.largest, weight.numel()


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "triton"])  # the interpreter hides ops
@pytest.mark.parametrize("fn", [ptk.linear_cross_entropy, ptk.linear_token_logprobs],
                         ids=["cross_entropy", "token_logprobs"])
def test_compact_never_allocates_a_float32_weight_sized_buffer(small_blocks, backend, fn):
    """bf16 head [1000, 64]: the default backward's fp32 accumulator is [1000, 64]; compact's largest fp32
    tensor is a chunk of logits ([16, 1000] in the chunk loop, [8, 64] per tile) or the [64, 64] block
    accumulator. The default is measured too, so the check would see the accumulator if it came back."""
    default, vd = _largest_fp32_for(fn, "default", backend)
    compact, _ = _largest_fp32_for(fn, "compact", backend)
    assert default >= vd
    assert compact <= max(BLOCK_V * 64, TILE * BLOCK_V, 16 * 1000) < vd


def test_block_shape_fits_its_budgets():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert vocab_blocks.block_shape(128256, 4096, cuda) == (2048, 8192)
    for v, d, dev in ((128256, 4096, cuda), (256000, 8192, cuda), (32000, 512, cpu), (872, 128, cpu)):
        vb, rows = vocab_blocks.block_shape(v, d, dev)
        kind = dev.type
        assert 0 < vb <= v and rows >= 256
        assert vb * d * 4 <= max(vocab_blocks.ACC_BYTES[kind], 256 * d * 4)
        assert vb * rows <= max(vocab_blocks.TILE_LOGITS[kind], 256 * vb)


def test_bad_memory_is_rejected_by_name():
    hidden, weight = rand(4, 3), rand(5, 3)
    labels = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="memory"):
        ptk.linear_cross_entropy(hidden, weight, labels, memory="small")
    with pytest.raises(ValueError, match="memory"):
        ptk.linear_token_logprobs(hidden, weight, labels, memory="auto")
    with pytest.raises(ValueError, match="memory"):
        ptk.nn.LinearCrossEntropyLoss(memory="tiny")


def test_module_passes_memory_through(small_blocks):
    hidden, weight = rand(N, D), rand(V, D)
    labels = labels_with_mask((N,), V)
    loss_fn = ptk.nn.LinearCrossEntropyLoss(memory="compact", backend="torch")
    ours = loss_fn(hidden, weight, labels)
    truth = reference.linear_cross_entropy(hidden, weight, labels)
    assert_close_to_truth(ours, truth, 1e-10, "loss")
    for a, b in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(truth, (hidden, weight))):
        assert_close_to_truth(a, b, 1e-10, "grad")


@pytest.mark.parametrize("wanted", ["hidden", "weight", "bias"])
def test_partial_gradients(small_blocks, wanted):
    """Only one of hidden / weight / bias needs a gradient (a frozen head, a frozen body): the loop or the
    vocabulary-block pass alone runs, with the same numbers."""
    hidden, weight, bias = (rand(N, D, requires_grad=wanted == "hidden"), rand(V, D, requires_grad=wanted == "weight"),
                            rand(V, requires_grad=wanted == "bias"))
    target = {"hidden": hidden, "weight": weight, "bias": bias}[wanted]
    labels = labels_with_mask((N,), V)
    for reduction in ("mean", "none"):
        kw = dict(bias=bias, reduction=reduction, z_loss=1e-3, label_smoothing=0.1)
        ours = ptk.linear_cross_entropy(hidden, weight, labels, chunk_size=8, memory="compact", backend="torch",
                                        **kw)
        truth = reference.linear_cross_entropy(hidden, weight, labels, **kw)
        assert_close_to_truth(_grads(ours, (target,), 5)[0], _grads(truth, (target,), 5)[0], 1e-10, wanted)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_token_logprobs_entropy_only_gradient(small_blocks, backend):
    """A loss on the entropy alone: the log-prob gradient is None, the block coefficients carry g_H only."""
    hidden, weight = rand(N, D), rand(V, D)
    targets = labels_with_mask((N,), V)
    _, ent = ptk.linear_token_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=8,
                                       memory="compact", backend=backend)
    _, ent64 = reference.linear_token_logprobs(hidden, weight, targets, return_entropy=True)
    for a, b in zip(torch.autograd.grad(ent.sum(), (hidden, weight)),
                    torch.autograd.grad(ent64.sum(), (hidden, weight))):
        assert_close_to_truth(a, b, _rtol(backend), "grad")

"""sequence_logprobs / packed_sequence_logprobs on every backend against the float64 reference."""

import pytest
import torch

from ptkernels.ops.sequence_logprobs import packed_sequence_logprobs, sequence_logprobs
from ptkernels.reference import sequence as reference
from tests.helpers import DEVICE, FUSED_BACKENDS, assert_close_to_truth, rand

BACKENDS = ["reference"] + FUSED_BACKENDS


def _mask(shape, kind):
    gen = torch.Generator().manual_seed(5)
    m = torch.rand(shape, generator=gen) > 0.35
    if len(shape) > 1:
        m.view(-1, shape[-1])[1] = False  # one fully masked sequence
    if kind == "int":
        m = m.to(torch.int64)
    elif kind == "float":
        m = m.to(torch.float64) * torch.rand(shape, generator=gen, dtype=torch.float64)
    return m.to(DEVICE)


def _grads(out, x):
    go = torch.linspace(-1.0, 2.0, out.numel(), dtype=torch.float64, device=DEVICE).view(out.shape).to(out.dtype)
    return torch.autograd.grad(out, x, go)[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 13), (2, 3, 37)])
@pytest.mark.parametrize("mask_kind", ["bool", "int", "float"])
@pytest.mark.parametrize("average", [False, True])
def test_padded_matches_reference(backend, shape, mask_kind, average):
    x = rand(*shape)
    m = _mask(shape, mask_kind)
    ours = sequence_logprobs(x, m, average=average, backend=backend)
    truth = reference.sequence_logprobs(x, m, average=average)
    assert ours.shape == shape[:-1] and ours.dtype == torch.float64
    assert_close_to_truth(ours, truth, 1e-12, "sequence logps")
    assert_close_to_truth(_grads(ours, x), _grads(truth, x), 1e-12, "grad")
    # a fully masked sequence gives 0 (also when averaging) and no gradient
    assert ours.reshape(-1)[1] == 0


def test_reference_matches_trl_formula():
    x, m = rand(4, 9), _mask((4, 9), "bool")
    m[1, 0] = True  # TRL's formula divides by the mask count: keep every row non-empty for the comparison
    trl_sum = (x * m).sum(-1)
    trl_avg = (x * m).sum(-1) / m.sum(-1)
    assert_close_to_truth(reference.sequence_logprobs(x, m), trl_sum, 1e-14, "sum")
    assert_close_to_truth(reference.sequence_logprobs(x, m, average=True), trl_avg, 1e-14, "average")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(backend, dtype):
    x = rand(3, 301, dtype=dtype, scale=3.0)
    m = _mask((3, 301), "bool")
    out = sequence_logprobs(x, m, average=True, backend=backend)
    assert out.dtype == torch.float32
    truth = reference.sequence_logprobs(x.double(), m, average=True)
    assert_close_to_truth(out, truth, 1e-5, "sequence logps")
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.dtype == dtype
    truth_g = (m / m.sum(-1, keepdim=True).clamp(min=1)).to(dtype)
    assert torch.equal(g, truth_g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("average", [False, True])
def test_packed_matches_reference(backend, cu_dtype, with_mask, average):
    lengths = [3, 0, 7, 1, 19, 0, 4]  # empty sequences included
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=cu_dtype, device=DEVICE)
    total = int(cu[-1])
    x = rand(total)
    m = _mask((total,), "bool") if with_mask else None
    ours = packed_sequence_logprobs(x, cu, mask=m, average=average, backend=backend)
    truth = reference.packed_sequence_logprobs(x, cu, mask=m, average=average)
    assert ours.shape == (len(lengths),)
    assert_close_to_truth(ours, truth, 1e-12, "packed logps")
    assert_close_to_truth(_grads(ours, x), _grads(truth, x), 1e-12, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_padded(backend):
    """A padded batch and the same sequences packed back to back give the same values and gradients."""
    lengths = [5, 11, 2]
    t = max(lengths)
    padded = torch.zeros(len(lengths), t, dtype=torch.float64, device=DEVICE)
    mask = torch.zeros(len(lengths), t, dtype=torch.bool, device=DEVICE)
    flat = rand(sum(lengths), requires_grad=False)
    start = 0
    for i, n in enumerate(lengths):
        padded[i, :n] = flat[start:start + n]
        mask[i, :n] = True
        start += n
    cu = torch.tensor([0, 5, 16, 18], device=DEVICE)
    for average in (False, True):
        a = sequence_logprobs(padded, mask, average=average, backend=backend)
        b = packed_sequence_logprobs(flat, cu, average=average, backend=backend)
        assert_close_to_truth(b, a, 1e-14, "packed vs padded")


def test_errors_name_the_argument():
    x = rand(4, 6)
    with pytest.raises(ValueError, match="mask.*token_logps"):
        sequence_logprobs(x, torch.ones(4, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="token_logps"):
        sequence_logprobs(torch.zeros(4, 6, dtype=torch.long, device=DEVICE), torch.ones(4, 6, device=DEVICE))
    flat = rand(10)
    for bad in ([1, 4, 10], [0, 6, 4, 10], [0, 4, 9], [0, 4, 11]):  # values: checked on the device on CUDA
        with pytest.raises(ValueError, match="cu_seqlens"):
            packed_sequence_logprobs(flat.cpu(), torch.tensor(bad))
    with pytest.raises(TypeError, match="cu_seqlens"):
        packed_sequence_logprobs(flat, torch.tensor([0.0, 10.0], device=DEVICE))
    with pytest.raises(ValueError, match="token_logps"):
        packed_sequence_logprobs(x, torch.tensor([0, 24], device=DEVICE))
    with pytest.raises(ValueError, match="mask.*token_logps"):
        packed_sequence_logprobs(flat, torch.tensor([0, 10], device=DEVICE), mask=torch.ones(9, device=DEVICE))
    with pytest.raises(RuntimeError, match="backend"):
        sequence_logprobs(x, torch.ones(4, 6, device=DEVICE), backend="cuda-graphs")

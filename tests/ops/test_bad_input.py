"""Bad input gets a clear error naming the argument(s) at fault."""

import pytest
import torch

import ptkernels as ptk
from tests.helpers import DEVICE, rand

D, V = 8, 31


# The range checks run on CPU tensors: on CUDA they are device-side asserts (no host synchronization), which end
# the process's CUDA context; tests/ops/test_gpu.py checks those in subprocesses.


@pytest.mark.parametrize("fn", [ptk.linear_cross_entropy, ptk.linear_token_logprobs])
@pytest.mark.parametrize("backend, chunk_size", [("reference", None)] + [
    (b, c) for b in ptk.backends("cpu") if b != "reference" for c in (None, 2)])  # small-shape paths, chunk loop
def test_label_out_of_range(fn, backend, chunk_size):
    """On CPU the native kernels count bad labels themselves (no separate Python pass): every path raises."""
    hidden, weight = rand(4, D, device="cpu"), rand(V, D, device="cpu")
    for bad in (V, -1, 10**6):
        labels = torch.tensor([0, 1, bad, -100])
        kw = dict(chunk_size=chunk_size) if chunk_size else {}
        with pytest.raises(ValueError, match=r"(labels|targets) has 1 value\(s\) outside \[0, 31\)"):
            fn(hidden, weight, labels, backend=backend, **kw)


@pytest.mark.parametrize("fn", [ptk.cross_entropy, ptk.token_logprobs])
def test_label_out_of_range_from_logits(fn):
    with pytest.raises(ValueError, match="labels|targets"):
        fn(rand(3, V, device="cpu"), torch.tensor([0, V, 1]))


def test_custom_ignore_index_is_respected():
    hidden, weight = rand(3, D), rand(V, D)
    labels = torch.tensor([0, -1, 2], device=DEVICE)
    loss = ptk.linear_cross_entropy(hidden, weight, labels, ignore_index=-1)
    assert torch.isfinite(loss)


def test_shape_mismatch_names_both():
    with pytest.raises(ValueError, match="labels.*hidden"):
        ptk.linear_cross_entropy(rand(4, D), rand(V, D), torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="hidden.*weight"):
        ptk.linear_cross_entropy(rand(4, D + 1), rand(V, D), torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        ptk.linear_cross_entropy(rand(4, D), rand(V, D), torch.zeros(4, dtype=torch.long, device=DEVICE),
                                 bias=rand(V + 1))


def test_dtype_mismatch_names_both():
    with pytest.raises(TypeError, match="hidden.*weight"):
        ptk.linear_cross_entropy(rand(4, D, dtype=torch.float32), rand(V, D),
                                 torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="labels"):
        ptk.linear_cross_entropy(rand(4, D), rand(V, D), torch.zeros(4, device=DEVICE))


def test_device_mismatch_names_both():
    with pytest.raises(ValueError, match="hidden.*weight"):
        ptk.linear_cross_entropy(rand(4, D), torch.randn(V, D, dtype=torch.float64, device="meta"),
                                 torch.zeros(4, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("kw, word", [
    (dict(reduction="avg"), "reduction"), (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"), (dict(softcap=0.0), "softcap"), (dict(temperature=0.0), "temperature"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_options(kw, word):
    with pytest.raises(ValueError, match=word):
        ptk.linear_cross_entropy(rand(4, D), rand(V, D), torch.zeros(4, dtype=torch.long, device=DEVICE), **kw)

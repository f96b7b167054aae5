"""Backend discovery and selection: usable backends, auto, and clear errors, never silent fallbacks."""

import pytest
import torch

import ptkernels as ptk
from ptkernels.ops.core import dispatch
from tests.helpers import rand


def _cpu_problem():  # backend selection is about the device: these cases are CPU ones even where CUDA is present
    return rand(2, 4, device="cpu"), rand(5, 4, device="cpu"), torch.tensor([0, 1])


def test_backends_lists_the_always_usable_ones():
    usable = ptk.backends("cpu")
    assert usable[:2] == ("reference", "torch")
    assert set(usable) <= set(dispatch.ALL_BACKENDS)


def test_auto_on_cpu_never_picks_the_interpreter():
    assert dispatch.resolve_backend("auto", torch.device("cpu")) in ("torch", "native")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in ptk.backends("cpu")
    with pytest.raises(RuntimeError, match="triton"):
        ptk.linear_cross_entropy(*_cpu_problem(), backend="triton")


def test_unbuilt_native_is_refused_not_replaced():
    if "native" in ptk.backends("cpu"):
        pytest.skip("the native extension is built here")
    with pytest.raises(RuntimeError, match="native"):
        ptk.linear_cross_entropy(*_cpu_problem(), backend="native")


def test_unknown_backend_lists_valid_names():
    with pytest.raises(RuntimeError, match="reference, torch, triton, native"):
        ptk.linear_cross_entropy(*_cpu_problem(), backend="cuda")


def test_reference_backend_is_the_reference():
    h, w, y = rand(3, 4, device="cpu"), rand(5, 4, device="cpu"), torch.tensor([0, 4, -100])
    assert torch.equal(ptk.linear_cross_entropy(h, w, y, backend="reference"),
                       ptk.reference.linear_cross_entropy(h, w, y))

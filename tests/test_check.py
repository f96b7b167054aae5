"""`ptk check` says which backend backend="auto" uses and why a fast one is missing (a native build that failed
under pip is otherwise invisible)."""

from ptkernels.check import backend_summary
from ptkernels.ops.core import dispatch


def test_check_names_the_active_backend_and_why_native_is_missing(monkeypatch):
    monkeypatch.setitem(dispatch._PROBES, "native", "the native extension ptkernels._C is not built (test)")
    text = backend_summary("cpu")
    assert "backend='auto' on cpu uses: torch" in text
    assert "native is not used: the native extension ptkernels._C is not built (test)" in text
    assert "python setup.py build_ext --inplace" in text


def test_check_with_native_built(monkeypatch):
    monkeypatch.setitem(dispatch._PROBES, "native", None)
    monkeypatch.setattr(dispatch, "unusable_reason",
                        lambda b, d: None if b in ("native", "torch", "reference") else "no triton (test)")
    text = backend_summary("cpu")
    assert "uses: native" in text and "native is not used" not in text

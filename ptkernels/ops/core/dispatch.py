"""Backend discovery and selection.

Backends:
    reference  eager PyTorch, materializes the logits (any device; the oracle)
    torch      chunked PyTorch (any device)
    triton     chunked, Triton row kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)
    native     the csrc extension ptkernels._C (C++ on CPU tensors, CUDA on GPU tensors)

``backend="auto"`` picks the fastest usable one for the tensors' device. Asking for a backend that is not
usable raises ``RuntimeError`` saying why; there is never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os

import torch

ALL_BACKENDS = ("reference", "torch", "triton", "native")


# Import probes are memoized in plain dicts (not functools caches) so torch.compile traces through them.
_PROBES: dict[str, str | None] = {}


def _triton_import_error() -> str | None:
    if "triton" not in _PROBES:
        _PROBES["triton"] = _probe_triton()
    return _PROBES["triton"]


def _probe_triton() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs only
        return f"importing triton failed: {exc}"
    return None


def triton_interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _native_import_error() -> str | None:
    if "native" not in _PROBES:
        _PROBES["native"] = _probe_native()
    return _PROBES["native"]


NATIVE_ABI_VERSION = 1  # csrc/module.cpp's kAbiVersion: a stale build of another version is not used


def _probe_native() -> str | None:
    try:
        from ptkernels import _C
    except ImportError as exc:
        return (f"the native extension ptkernels._C is not built ({exc}); `pip install -v -e .` shows the "
                "compiler's output")
    version = getattr(_C, "abi_version", None)
    if version != NATIVE_ABI_VERSION:
        return (f"the native extension ptkernels._C is stale (ABI {version}, expected {NATIVE_ABI_VERSION}); "
                "rebuild it: pip install -e . (or python setup.py build_ext --inplace)")
    return None


def unusable_reason(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None when it can."""
    device = torch.device(device)
    if backend in ("reference", "torch"):
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return (f"triton runs on CUDA tensors (or on CPU tensors only with TRITON_INTERPRET=1), "
                f"got device {device}")
    if backend == "native":
        err = _native_import_error()
        if err:
            return err
        if device.type == "cpu":
            return None
        from ptkernels import _C

        if device.type == "cuda" and getattr(_C, "has_cuda", False):
            return None
        return f"the native extension has no kernels for device {device}"
    return f"unknown backend {backend!r}; valid: {', '.join(ALL_BACKENDS)} or 'auto'"


def kernel_counts_bad_labels(backend: str, device: torch.device) -> bool:
    """Whether ``backend``'s row kernels on ``device`` count out-of-range labels themselves (and the op raises
    for them): the native CPU kernels do, in their own pass over each row (native_ops.common.check_index), so a
    separate Python check of the whole label tensor (~10-20 us a call) is skipped there."""
    return backend == "native" and device.type == "cpu"


def backends(device: torch.device | str | None = None) -> tuple[str, ...]:
    """The backends usable on ``device`` (default: CUDA when available, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return tuple(b for b in ALL_BACKENDS if unusable_reason(b, device) is None)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``backend`` (a name or "auto") into a usable backend name for ``device``, or raise."""
    if backend == "auto":
        if device.type == "cuda" and unusable_reason("triton", device) is None:
            return "triton"
        # The interpreter is for tests, never a fast path: on CPU, auto picks compiled code.
        if device.type == "cpu" and unusable_reason("native", device) is None:
            return "native"
        return "torch"
    reason = unusable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not usable here: {reason}")
    return backend

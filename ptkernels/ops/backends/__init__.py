"""The non-GEMM half of every op, one module per backend: ``torch`` (PyTorch ops, any device, the spec),
``triton`` (every Triton launcher), ``native`` (the csrc/ kernels through the custom ops of ``native_ops``).

``get(backend, family)`` is the one place an op asks for its implementation. Each backend module defines the
families it implements under the names of base.py (``ROWS``, ``BLOCK_ROWS``, ``JSD_ROWS``, ``grpo_rows``,
``group_advantages``, ``gae``, ``sequence_fwd``/``sequence_bwd``); a family a backend leaves out runs the torch
one, except JSD rows, for which ``get`` raises on "native". Adding a backend: a module here with those names, a
line in ``module``, and its probe in ops/core/dispatch.py. Backend modules are imported on first use (triton.py imports
triton, native_ops/ the extension).
"""

from __future__ import annotations

FAMILIES = ("ROWS", "BLOCK_ROWS", "JSD_ROWS", "grpo_rows", "group_advantages", "gae", "sequence_fwd", "sequence_bwd")


def module(backend: str):
    """The backend module of a resolved backend name ("torch", "triton", "native")."""
    if backend == "triton":
        from . import triton as mod
    elif backend == "native":
        from . import native as mod
    else:
        from . import torch as mod
    return mod


def get(backend: str, family: str):
    """``family`` (one of FAMILIES) of ``backend``, or the torch backend's where that backend has none."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    impl = getattr(module(backend), family, None)
    if impl is None and family == "JSD_ROWS":
        raise RuntimeError(f"backend={backend!r} has no linear_jsd row kernels; use 'torch' (any device), "
                           f"'triton' (CUDA) or 'reference'")
    return impl if impl is not None else getattr(module("torch"), family)


def get_rows(backend: str):
    """The logit-row functions (base.py's interface) of a resolved backend name."""
    return get(backend, "ROWS")


def get_block_rows(backend: str):
    """The compact-memory backward's block gradient (base.py: ``grad_block``); "native" runs the torch one."""
    return get(backend, "BLOCK_ROWS")

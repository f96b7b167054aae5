"""What every native custom op shares: the extension handle, the dtype tables, the Python-side argument
checks that run before each native call, and the ABI helpers (pointers, stream, threads)."""

from __future__ import annotations

import torch

try:
    from .... import _C
except ImportError:  # not built: the ops exist (torch.compile can see them) but running one raises
    _C = None

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
ROW_DTYPES = {"cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
              "cuda": (torch.float32, torch.float16, torch.bfloat16)}
VEC_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32,)}
SCALE_MODES = {"group": 0, "batch": 1, "none": 2}


def eager_direct(op):
    """``op`` (a ``torch.library.custom_op``), called as its own Python implementation in plain eager code.

    Going through the dispatcher costs ~100-150 us per call on CPU (argument defaults, the autograd and dynamo
    wrappers, redispatch): more than the row kernel itself at small shapes (64 rows x 872 classes: ~60 us), so it
    decided whether the fused ops beat eager PyTorch there. The implementation is exactly what the dispatcher
    would run for a plain CPU/CUDA tensor, so in plain eager code it is called directly. Whenever something
    else must see the op (torch.compile or export tracing, a functorch transform, a TorchDispatchMode such as
    FakeTensorMode or a flop counter, a tensor subclass) the call goes through ``op`` as before.
    """
    impl = op._init_fn

    def call(*args):
        return impl(*args) if plain_eager(args) else op(*args)

    call.op = op
    call.__doc__ = op._init_fn.__doc__
    call.__name__ = op._init_fn.__name__
    return call


def plain_eager(args) -> bool:
    """Whether a call with ``args`` runs in plain eager code, where nothing but the caller sees the native ops:
    no torch.compile or export tracing, no functorch transform, no TorchDispatchMode, no tensor subclass."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or torch._C._len_torch_dispatch_stack() > 0
                or any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor for a in args))


def lib():
    if _C is None:
        raise RuntimeError("the native extension ptkernels._C is not built (pip install -e . with a C++ compiler)")
    return _C


def supports(family: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the native ops of ``family`` ("rows" or "vector") run on ``device`` for ``dtype`` here."""
    if _C is None or device.type not in ("cpu", "cuda"):
        return False
    if device.type == "cuda" and not getattr(_C, "has_cuda", False):
        return False
    table = ROW_DTYPES if family == "rows" else VEC_DTYPES
    return dtype in table[device.type]


# ---------------------------------------------------------------------------------------------- validation


def check_tensor(name: str, t, device: torch.device, dtypes=None, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the first argument is on {device}; put them on one device")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names} here, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        if not getattr(lib(), "has_cuda", False):
            raise RuntimeError(f"{name} is a CUDA tensor but ptkernels._C was built without its CUDA kernels")
    elif t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}: the native kernels run on CPU and CUDA tensors only")


def check_rows(name: str, t: torch.Tensor, n: int, v: int) -> None:
    """A [n, v] matrix whose rows the kernels index by row stride with unit column stride."""
    if tuple(t.shape) != (n, v):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({n}, {v})")
    if v > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension, got strides {t.stride()}")


def check_written_rows(name: str, t: torch.Tensor, n: int, v: int) -> None:
    check_rows(name, t, n, v)
    if n > 1 and t.stride(0) < v:
        raise ValueError(f"{name} is written by the kernel, so its rows must not overlap (strides {t.stride()})")


def check_vector(name: str, t: torch.Tensor, n: int, dtype: torch.dtype, contiguous: bool = True) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if contiguous and n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) bytes of memory that ``t`` can touch."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
            and a.stride() == b.stride())


def check_alias(out_name: str, out: torch.Tensor, in_name: str, inp: torch.Tensor, *, allow_exact: bool) -> None:
    if out.numel() == 0 or inp.numel() == 0:
        return
    if allow_exact and same_view(out, inp):
        return
    (a0, a1), (b0, b1) = span(out), span(inp)
    if a0 < b1 and b0 < a1:
        raise ValueError(f"{out_name} overlaps {in_name} in memory (only the exact same view, an in-place update, "
                         "is allowed)")


def check_index(name: str, idx: torch.Tensor, n_cols: int, ignore_index: int) -> None:
    """CUDA: an asynchronous assert (no synchronization; the kernel skips such rows meanwhile). CPU: nothing
    here, as the kernel counts the bad indices in its own pass over the rows (zero row, no access outside it)
    and the op raises ``raise_bad_labels`` after it; a separate check cost ~50 us a call at small shapes."""
    if idx.device.type == "cuda":
        bad = ((idx < 0) | (idx >= n_cols)) & (idx != ignore_index)
        torch._assert_async(~bad.any(), f"{name} has a value outside [0, {n_cols}) that is not "
                                        f"ignore_index={ignore_index}")


def raise_bad_labels(count: int, name: str, n_cols: int, ignore_index: int) -> None:
    if count:
        raise ValueError(f"{name} has {count} value(s) outside [0, {n_cols}) that are not ignore_index={ignore_index}")


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def cuda_stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def threads() -> int:
    return max(1, torch.get_num_threads())


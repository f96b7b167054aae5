"""The native kernels (``ptkernels._C``, csrc/) as PyTorch custom ops in the ``ptkernels`` namespace.

Each op is a ``torch.library.custom_op`` with a ``register_fake`` (shapes and dtypes of its outputs), so eager code
calls the kernels directly while ``torch.compile`` traces through them (fullgraph, AOTAutograd) and sees exactly
which arguments they write (``mutates_args``). The implementation of every op validates its arguments in Python
before the native call: dtype, device, shape, unit column stride and no internal overlap of written rows,
aliasing between what is read and what is written (only an exact alias, an in-place update, is allowed), index
ranges (labels / targets in ``[0, V)`` or ``ignore_index``; on CUDA through ``torch._assert_async``, which does
not synchronize) and zero sizes. The kernels check the cheap things again (label range, segment bounds) and a
failure becomes a Python exception: no argument can make them read or write out of bounds.

The ABI to ``_C`` is pointers and sizes (csrc/module.cpp): CPU kernels take ``torch.get_num_threads()``, CUDA
kernels the current stream (``torch.cuda.current_stream().cuda_stream``) on the tensors' device.

    ce_rows(logits, labels, grad_scale?, grad?, ...) -> (loss, lse)         grad written when given
    ce_rows_inplace(logits, labels, grad_scale?, ...) -> (loss, lse)        the gradient over the logits
    logprob_fwd(logits, targets, ..., want_entropy) -> (logp, lse, mean_s)  mean_s empty unless wanted
    logprob_bwd(logits, targets, lse, mean_s?, g_logp, g_ent?, grad, ...)   writes grad
    logprob_bwd_inplace(logits, targets, lse, mean_s?, g_logp, g_ent?, ...)
    segment_sums(x, mask?, cu_seqlens?, n_seqs, average) -> (out, den)     padded [S, T] or packed [total]
    segment_sums_bwd(g, den, mask?, cu_seqlens?, total, seq_len, average) -> grad
    gae(rewards, values, mask, gamma, lam) -> (advantages, returns)
    group_advantages(rewards, group_size, scale_mode, eps) -> advantages

Dtypes: the row ops take fp32 / fp16 / bf16 / fp64 logits on CPU and fp32 / fp16 / bf16 on CUDA (math in fp32,
fp64 for fp64); the others fp32 / fp64 on CPU, fp32 on CUDA. ``supports(op_family, device, dtype)`` says which;
callers (native.py) route anything else to the PyTorch implementation.
"""

from __future__ import annotations

import torch

from ...types import compute_dtype

try:
    from ... import _C
except ImportError:  # not built: the ops exist (torch.compile can see them) but running one raises
    _C = None

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
ROW_DTYPES = {"cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
              "cuda": (torch.float32, torch.float16, torch.bfloat16)}
VEC_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32,)}
SCALE_MODES = {"group": 0, "batch": 1, "none": 2}


def _lib():
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


def _tensor(name: str, t, device: torch.device, dtypes=None, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the first argument is on {device}; put them on one device")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names} here, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _device_ok(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        if not getattr(_lib(), "has_cuda", False):
            raise RuntimeError(f"{name} is a CUDA tensor but ptkernels._C was built without its CUDA kernels")
    elif t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}: the native kernels run on CPU and CUDA tensors only")


def _rows(name: str, t: torch.Tensor, n: int, v: int) -> None:
    """A [n, v] matrix whose rows the kernels index by row stride with unit column stride."""
    if tuple(t.shape) != (n, v):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({n}, {v})")
    if v > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension, got strides {t.stride()}")


def _written_rows(name: str, t: torch.Tensor, n: int, v: int) -> None:
    _rows(name, t, n, v)
    if n > 1 and t.stride(0) < v:
        raise ValueError(f"{name} is written by the kernel, so its rows must not overlap (strides {t.stride()})")


def _vector(name: str, t: torch.Tensor, n: int, dtype: torch.dtype, contiguous: bool = True) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if contiguous and n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) bytes of memory that ``t`` can touch."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
            and a.stride() == b.stride())


def _check_alias(out_name: str, out: torch.Tensor, in_name: str, inp: torch.Tensor, *, allow_exact: bool) -> None:
    if out.numel() == 0 or inp.numel() == 0:
        return
    if allow_exact and _same_view(out, inp):
        return
    (a0, a1), (b0, b1) = _span(out), _span(inp)
    if a0 < b1 and b0 < a1:
        raise ValueError(f"{out_name} overlaps {in_name} in memory (only the exact same view, an in-place update, "
                         "is allowed)")


def _check_index(name: str, idx: torch.Tensor, n_cols: int, ignore_index: int) -> None:
    bad = ((idx < 0) | (idx >= n_cols)) & (idx != ignore_index)
    msg = f"{name} has a value outside [0, {n_cols}) that is not ignore_index={ignore_index}"
    if idx.device.type == "cuda":
        torch._assert_async(~bad.any(), msg)  # no synchronization; the kernel skips such rows meanwhile
    elif bool(bad.any()):
        raise ValueError(f"{msg} (first: {int(idx[bad][0])})")


def _raise_bad_labels(count: int, name: str, n_cols: int, ignore_index: int) -> None:
    if count:
        raise ValueError(f"{name} has {count} value(s) outside [0, {n_cols}) that are not ignore_index={ignore_index}")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cuda_stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _threads() -> int:
    return max(1, torch.get_num_threads())


# ---------------------------------------------------------------------------------------- cross-entropy rows


def _check_ce(logits, labels, grad_scale, grad, ignore_index, label_smoothing, z_loss, inv_temperature):
    _tensor("logits", logits, logits.device, dim=2)
    _device_ok("logits", logits)
    _tensor("logits", logits, logits.device, dtypes=ROW_DTYPES[logits.device.type])
    n, v = logits.shape
    if v < 1:
        raise ValueError("logits must have at least one column (V >= 1)")
    _rows("logits", logits, n, v)
    _tensor("labels", labels, logits.device)
    _vector("labels", labels, n, torch.int64)
    cd = compute_dtype(logits.dtype)
    if grad_scale is not None:
        _tensor("grad_scale", grad_scale, logits.device)
        _vector("grad_scale", grad_scale, n, cd, contiguous=False)
    if grad is not None:
        _tensor("grad", grad, logits.device, dtypes=(logits.dtype,))
        _written_rows("grad", grad, n, v)
        _check_alias("grad", grad, "logits", logits, allow_exact=True)
        _check_alias("grad", grad, "labels", labels, allow_exact=False)
        if grad_scale is not None:
            _check_alias("grad", grad, "grad_scale", grad_scale, allow_exact=False)
    if not 0.0 <= label_smoothing <= 1.0 or not z_loss >= 0.0 or not inv_temperature > 0.0:
        raise ValueError("label_smoothing must be in [0, 1], z_loss >= 0 and inv_temperature > 0")
    return n, v, cd


def _run_ce(logits, labels, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap, inv_temperature):
    n, v, cd = _check_ce(logits, labels, grad_scale, grad, ignore_index, label_smoothing, z_loss, inv_temperature)
    loss = torch.empty(n, dtype=cd, device=logits.device)
    lse = torch.empty(n, dtype=cd, device=logits.device)
    if n == 0:
        return loss, lse
    _check_index("labels", labels, v, ignore_index)
    lib = _lib()
    scale_stride = grad_scale.stride(0) if grad_scale is not None else 0
    grad_stride = grad.stride(0) if grad is not None else 0
    if logits.device.type == "cuda":
        with torch.cuda.device(logits.device):
            lib.cuda_ce_rows(logits.data_ptr(), logits.stride(0), _ptr(grad), grad_stride, DTYPE_CODES[logits.dtype],
                             labels.data_ptr(), _ptr(grad_scale), scale_stride, loss.data_ptr(), lse.data_ptr(), n, v,
                             ignore_index, label_smoothing, z_loss, softcap, inv_temperature, _cuda_stream(logits))
        return loss, lse
    bad = lib.cpu_ce_rows(logits.data_ptr(), logits.stride(0), _ptr(grad), grad_stride, DTYPE_CODES[logits.dtype],
                          labels.data_ptr(), _ptr(grad_scale), scale_stride, loss.data_ptr(), lse.data_ptr(), n, v,
                          ignore_index, label_smoothing, z_loss, softcap, inv_temperature, _threads())
    _raise_bad_labels(bad, "labels", v, ignore_index)
    return loss, lse


def _ce_fake(logits, labels, grad_scale, *rest):
    cd = compute_dtype(logits.dtype)
    n = logits.shape[0]
    return logits.new_empty(n, dtype=cd), logits.new_empty(n, dtype=cd)


@torch.library.custom_op("ptkernels::ce_rows", mutates_args=("grad",))
def ce_rows(logits: torch.Tensor, labels: torch.Tensor, grad_scale: torch.Tensor | None, grad: torch.Tensor | None,
            ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
            inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy rows of ``logits [n, V]`` -> (loss [n], lse [n]); d loss / d logits (times grad_scale per
    row) into ``grad`` when given (``grad`` may be ``logits`` itself). softcap <= 0: none."""
    return _run_ce(logits, labels, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap, inv_temperature)


@ce_rows.register_fake
def _(logits, labels, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap, inv_temperature):
    return _ce_fake(logits, labels, grad_scale)


@torch.library.custom_op("ptkernels::ce_rows_inplace", mutates_args=("logits",))
def ce_rows_inplace(logits: torch.Tensor, labels: torch.Tensor, grad_scale: torch.Tensor | None, ignore_index: int,
                    label_smoothing: float, z_loss: float, softcap: float,
                    inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``ce_rows`` with the gradient written over ``logits``."""
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        _written_rows("logits", logits, logits.shape[0], logits.shape[1])
    return _run_ce(logits, labels, grad_scale, logits, ignore_index, label_smoothing, z_loss, softcap,
                   inv_temperature)


@ce_rows_inplace.register_fake
def _(logits, labels, grad_scale, ignore_index, label_smoothing, z_loss, softcap, inv_temperature):
    return _ce_fake(logits, labels, grad_scale)


# ------------------------------------------------------------------------------------------- log-prob rows


def _check_logprob(logits, targets):
    _tensor("logits", logits, logits.device, dim=2)
    _device_ok("logits", logits)
    if logits.device.type != "cpu":
        raise NotImplementedError("the native log-prob rows run on CPU tensors (CUDA: use backend='triton')")
    _tensor("logits", logits, logits.device, dtypes=ROW_DTYPES["cpu"])
    n, v = logits.shape
    if v < 1:
        raise ValueError("logits must have at least one column (V >= 1)")
    _rows("logits", logits, n, v)
    _tensor("targets", targets, logits.device)
    _vector("targets", targets, n, torch.int64)
    return n, v, compute_dtype(logits.dtype)


@torch.library.custom_op("ptkernels::logprob_fwd", mutates_args=())
def logprob_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, softcap: float,
                inv_temperature: float, want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(target) [n], lse [n], E_p[s] [n] or [0]) of ``logits [n, V]``; 0 on ignored rows."""
    n, v, cd = _check_logprob(logits, targets)
    if not inv_temperature > 0.0:
        raise ValueError(f"inv_temperature must be > 0, got {inv_temperature}")
    logp = torch.empty(n, dtype=cd, device=logits.device)
    lse = torch.empty(n, dtype=cd, device=logits.device)
    mean_s = torch.empty(n if want_entropy else 0, dtype=cd, device=logits.device)
    if n == 0:
        return logp, lse, mean_s
    _check_index("targets", targets, v, ignore_index)
    bad = _lib().cpu_logprob_fwd(logits.data_ptr(), logits.stride(0), DTYPE_CODES[logits.dtype], targets.data_ptr(),
                                 logp.data_ptr(), lse.data_ptr(), mean_s.data_ptr() if want_entropy else 0, n, v,
                                 ignore_index, softcap, inv_temperature, _threads())
    _raise_bad_labels(bad, "targets", v, ignore_index)
    return logp, lse, mean_s


@logprob_fwd.register_fake
def _(logits, targets, ignore_index, softcap, inv_temperature, want_entropy):
    cd = compute_dtype(logits.dtype)
    n = logits.shape[0]
    return logits.new_empty(n, dtype=cd), logits.new_empty(n, dtype=cd), logits.new_empty(n if want_entropy else 0,
                                                                                           dtype=cd)


def _run_logprob_bwd(logits, targets, lse, mean_s, g_logp, g_ent, grad, ignore_index, softcap, inv_temperature):
    n, v, cd = _check_logprob(logits, targets)
    _tensor("grad", grad, logits.device, dtypes=(logits.dtype,))
    _written_rows("grad", grad, n, v)
    _check_alias("grad", grad, "logits", logits, allow_exact=True)
    for name, t in (("lse", lse), ("g_logp", g_logp), ("mean_s", mean_s), ("g_ent", g_ent)):
        if t is not None:
            _tensor(name, t, logits.device)
            _vector(name, t, n, cd)
            _check_alias("grad", grad, name, t, allow_exact=False)
    _check_alias("grad", grad, "targets", targets, allow_exact=False)
    if g_ent is not None and mean_s is None:
        raise ValueError("g_ent needs mean_s (E_p[s] from logprob_fwd with want_entropy=True)")
    if not inv_temperature > 0.0:
        raise ValueError(f"inv_temperature must be > 0, got {inv_temperature}")
    if n == 0:
        return
    _check_index("targets", targets, v, ignore_index)
    bad = _lib().cpu_logprob_bwd(logits.data_ptr(), logits.stride(0), grad.data_ptr(), grad.stride(0),
                                 DTYPE_CODES[logits.dtype], targets.data_ptr(), lse.data_ptr(),
                                 _ptr(mean_s) if g_ent is not None else 0, g_logp.data_ptr(), _ptr(g_ent), n, v,
                                 ignore_index, softcap, inv_temperature, _threads())
    _raise_bad_labels(bad, "targets", v, ignore_index)


@torch.library.custom_op("ptkernels::logprob_bwd", mutates_args=("grad",))
def logprob_bwd(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, mean_s: torch.Tensor | None,
                g_logp: torch.Tensor, g_ent: torch.Tensor | None, grad: torch.Tensor, ignore_index: int,
                softcap: float, inv_temperature: float) -> None:
    """d/d logits of sum(g_logp * logp + g_ent * entropy) into ``grad`` (may be ``logits`` itself)."""
    _run_logprob_bwd(logits, targets, lse, mean_s, g_logp, g_ent, grad, ignore_index, softcap, inv_temperature)


@logprob_bwd.register_fake
def _(logits, targets, lse, mean_s, g_logp, g_ent, grad, ignore_index, softcap, inv_temperature):
    return None


@torch.library.custom_op("ptkernels::logprob_bwd_inplace", mutates_args=("logits",))
def logprob_bwd_inplace(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, mean_s: torch.Tensor | None,
                        g_logp: torch.Tensor, g_ent: torch.Tensor | None, ignore_index: int, softcap: float,
                        inv_temperature: float) -> None:
    """``logprob_bwd`` with the gradient written over ``logits``."""
    _run_logprob_bwd(logits, targets, lse, mean_s, g_logp, g_ent, logits, ignore_index, softcap, inv_temperature)


@logprob_bwd_inplace.register_fake
def _(logits, targets, lse, mean_s, g_logp, g_ent, ignore_index, softcap, inv_temperature):
    return None


# ------------------------------------------------------------------------------------------- segment sums


def _check_segments(x, mask, cu_seqlens, n_seqs):
    """-> (packed, seq_len, total). Padded: x [S, T], cu None. Packed: x [total], cu int64 [S + 1]."""
    _tensor("x", x, x.device)
    _device_ok("x", x)
    _tensor("x", x, x.device, dtypes=VEC_DTYPES[x.device.type])
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous, got strides {x.stride()}")
    if mask is not None:
        _tensor("mask", mask, x.device, dtypes=(x.dtype,))
        if tuple(mask.shape) != tuple(x.shape) or not mask.is_contiguous():
            raise ValueError(f"mask must be contiguous with x's shape {tuple(x.shape)}, got {tuple(mask.shape)}")
    if n_seqs < 0:
        raise ValueError(f"n_seqs must be >= 0, got {n_seqs}")
    if cu_seqlens is None:
        if x.dim() != 2 or x.shape[0] != n_seqs:
            raise ValueError(f"padded x must be [n_seqs={n_seqs}, T], got {tuple(x.shape)}")
        return False, x.shape[1], x.numel()
    if x.dim() != 1:
        raise ValueError(f"packed x must be 1-D [total], got {tuple(x.shape)}")
    _tensor("cu_seqlens", cu_seqlens, x.device, dtypes=(torch.int64,))
    _vector("cu_seqlens", cu_seqlens, n_seqs + 1, torch.int64)
    if x.device.type == "cpu":  # the kernel checks again; this gives the message before anything runs
        cu = cu_seqlens
        if int(cu[0]) != 0 or int(cu[-1]) != x.shape[0] or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0, never decrease and end at {x.shape[0]}")
    else:
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == x.shape[0]) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
        torch._assert_async(ok, f"cu_seqlens must start at 0, never decrease and end at {x.shape[0]}")
    return True, 0, x.shape[0]


@torch.library.custom_op("ptkernels::segment_sums", mutates_args=())
def segment_sums(x: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, n_seqs: int,
                 average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [S], den [S]): per-sequence sums of x * mask (means with ``average``; 0 for an empty mask) and the mask
    sums, over rows of a padded ``x [S, T]`` (cu_seqlens None) or segments of a packed ``x [total]``."""
    packed, seq_len, total = _check_segments(x, mask, cu_seqlens, n_seqs)
    out = torch.empty(n_seqs, dtype=x.dtype, device=x.device)
    den = torch.empty(n_seqs, dtype=x.dtype, device=x.device)
    if n_seqs == 0:
        return out, den
    if x.device.type == "cuda":
        cu = cu_seqlens if packed else torch.arange(0, total + 1, max(seq_len, 1), device=x.device)[: n_seqs + 1]
        if not packed and seq_len == 0:
            cu = torch.zeros(n_seqs + 1, dtype=torch.int64, device=x.device)
        with torch.cuda.device(x.device):
            stream = _cuda_stream(x)
            _lib().cuda_segment_sums(x.data_ptr(), _ptr(mask), cu.data_ptr(), out.data_ptr(), n_seqs, average,
                                     stream)
            if mask is not None:
                _lib().cuda_segment_sums(mask.data_ptr(), 0, cu.data_ptr(), den.data_ptr(), n_seqs, False, stream)
            else:
                den.copy_(cu[1:] - cu[:-1])
        return out, den
    _lib().cpu_segment_sums(x.data_ptr(), _ptr(mask), _ptr(cu_seqlens), out.data_ptr(), den.data_ptr(), n_seqs,
                            seq_len, total, average, DTYPE_CODES[x.dtype], _threads())
    return out, den


@segment_sums.register_fake
def _(x, mask, cu_seqlens, n_seqs, average):
    return x.new_empty(n_seqs), x.new_empty(n_seqs)


@torch.library.custom_op("ptkernels::segment_sums_bwd", mutates_args=())
def segment_sums_bwd(g: torch.Tensor, den: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                     total: int, seq_len: int, average: bool) -> torch.Tensor:
    """The gradient of ``segment_sums``' out w.r.t. x: [S, T] (padded) or [total] (packed), ``g``'s dtype."""
    _tensor("g", g, g.device, dim=1)
    n_seqs = g.shape[0]
    shape = (total,) if cu_seqlens is not None else (n_seqs, seq_len)
    if total < 0 or seq_len < 0 or (cu_seqlens is None and n_seqs * seq_len != total):
        raise ValueError(f"inconsistent sizes: n_seqs={n_seqs}, seq_len={seq_len}, total={total}")
    grad = torch.empty(shape, dtype=g.dtype, device=g.device)
    _check_segments(grad, mask, cu_seqlens, n_seqs)
    _tensor("den", den, g.device)
    _vector("den", den, n_seqs, g.dtype)
    g = g.contiguous()
    if n_seqs == 0 or total == 0:
        return grad.zero_()
    if g.device.type == "cuda":  # a broadcast: PyTorch ops on the device, no synchronization
        gs = torch.where(den != 0, g / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(g)) \
            if average else g
        if cu_seqlens is None:
            grad.copy_(gs.unsqueeze(1).expand(shape))
        else:
            seg = torch.repeat_interleave(torch.arange(n_seqs, device=g.device), cu_seqlens[1:] - cu_seqlens[:-1],
                                          output_size=total)
            grad.copy_(gs.index_select(0, seg))
        return grad.mul_(mask) if mask is not None else grad
    _lib().cpu_segment_sums_bwd(g.data_ptr(), den.data_ptr(), _ptr(mask), _ptr(cu_seqlens), grad.data_ptr(), n_seqs,
                                seq_len, total, average, DTYPE_CODES[g.dtype], _threads())
    return grad


@segment_sums_bwd.register_fake
def _(g, den, mask, cu_seqlens, total, seq_len, average):
    shape = (total,) if cu_seqlens is not None else (g.shape[0], seq_len)
    return g.new_empty(shape)


# ------------------------------------------------------------------------------------------------- RL


@torch.library.custom_op("ptkernels::gae", mutates_args=())
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] of contiguous rewards, values, mask (one float dtype); see ops/ppo.py."""
    _tensor("rewards", rewards, rewards.device, dim=2)
    _device_ok("rewards", rewards)
    _tensor("rewards", rewards, rewards.device, dtypes=VEC_DTYPES[rewards.device.type])
    for name, t in (("values", values), ("mask", mask)):
        _tensor(name, t, rewards.device, dtypes=(rewards.dtype,))
        if tuple(t.shape) != tuple(rewards.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but rewards has shape {tuple(rewards.shape)}")
    for name, t in (("rewards", rewards), ("values", values), ("mask", mask)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma}, {lam}")
    b, t = rewards.shape
    adv = torch.empty_like(rewards)
    ret = torch.empty_like(rewards)
    if b == 0 or t == 0:
        return adv, ret
    if rewards.device.type == "cuda":
        with torch.cuda.device(rewards.device):
            _lib().cuda_gae(rewards.data_ptr(), values.data_ptr(), mask.data_ptr(), adv.data_ptr(), ret.data_ptr(), b,
                            t, gamma, lam, _cuda_stream(rewards))
        return adv, ret
    _lib().cpu_gae(rewards.data_ptr(), values.data_ptr(), mask.data_ptr(), adv.data_ptr(), ret.data_ptr(), b, t,
                   gamma, lam, DTYPE_CODES[rewards.dtype], _threads())
    return adv, ret


@gae.register_fake
def _(rewards, values, mask, gamma, lam):
    return torch.empty_like(rewards), torch.empty_like(rewards)


@torch.library.custom_op("ptkernels::group_advantages", mutates_args=())
def group_advantages(rewards: torch.Tensor, group_size: int, scale_mode: int, eps: float) -> torch.Tensor:
    """GRPO advantages of contiguous ``rewards [N]``; scale_mode 0 "group", 1 "batch", 2 "none" (ops/grpo.py)."""
    _tensor("rewards", rewards, rewards.device, dim=1)
    _device_ok("rewards", rewards)
    _tensor("rewards", rewards, rewards.device, dtypes=VEC_DTYPES[rewards.device.type])
    if not rewards.is_contiguous():
        raise ValueError(f"rewards must be contiguous, got stride {rewards.stride()}")
    n = rewards.shape[0]
    if group_size <= 0 or n % group_size != 0:
        raise ValueError(f"group_size={group_size} must be positive and divide the number of rewards {n}")
    if scale_mode not in (0, 1, 2):
        raise ValueError(f"scale_mode must be 0 (group), 1 (batch) or 2 (none), got {scale_mode}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    out = torch.empty_like(rewards)
    if n == 0:
        return out
    if rewards.device.type == "cuda":
        with torch.cuda.device(rewards.device):
            _lib().cuda_group_advantages(rewards.data_ptr(), out.data_ptr(), n, group_size, scale_mode, eps,
                                         _cuda_stream(rewards))
        return out
    _lib().cpu_group_advantages(rewards.data_ptr(), out.data_ptr(), n, group_size, scale_mode, eps,
                                DTYPE_CODES[rewards.dtype], _threads())
    return out


@group_advantages.register_fake
def _(rewards, group_size, scale_mode, eps):
    return torch.empty_like(rewards)

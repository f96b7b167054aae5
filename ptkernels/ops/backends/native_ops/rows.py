"""Custom ops of the logit-row kernels (csrc/*/rows.*): cross-entropy rows and log-prob rows, forward and
backward, with and without an in-place gradient."""

from __future__ import annotations

import torch

from ....types import compute_dtype
from .common import (
    DTYPE_CODES,
    ROW_DTYPES,
    check_alias,
    check_device,
    check_index,
    check_rows,
    check_tensor,
    check_vector,
    check_written_rows,
    cuda_stream,
    lib,
    ptr,
    raise_bad_labels,
    threads,
)


def _check_ce(logits, labels, grad_scale, grad, ignore_index, label_smoothing, z_loss, inv_temperature):
    check_tensor("logits", logits, logits.device, dim=2)
    check_device("logits", logits)
    check_tensor("logits", logits, logits.device, dtypes=ROW_DTYPES[logits.device.type])
    n, v = logits.shape
    if v < 1:
        raise ValueError("logits must have at least one column (V >= 1)")
    check_rows("logits", logits, n, v)
    check_tensor("labels", labels, logits.device)
    check_vector("labels", labels, n, torch.int64)
    cd = compute_dtype(logits.dtype)
    if grad_scale is not None:
        check_tensor("grad_scale", grad_scale, logits.device)
        check_vector("grad_scale", grad_scale, n, cd, contiguous=False)
    if grad is not None:
        check_tensor("grad", grad, logits.device, dtypes=(logits.dtype,))
        check_written_rows("grad", grad, n, v)
        check_alias("grad", grad, "logits", logits, allow_exact=True)
        check_alias("grad", grad, "labels", labels, allow_exact=False)
        if grad_scale is not None:
            check_alias("grad", grad, "grad_scale", grad_scale, allow_exact=False)
    if not 0.0 <= label_smoothing <= 1.0 or not z_loss >= 0.0 or not inv_temperature > 0.0:
        raise ValueError("label_smoothing must be in [0, 1], z_loss >= 0 and inv_temperature > 0")
    return n, v, cd


def _run_ce(logits, labels, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap, inv_temperature):
    n, v, cd = _check_ce(logits, labels, grad_scale, grad, ignore_index, label_smoothing, z_loss, inv_temperature)
    if n == 0:
        return torch.empty(n, dtype=cd, device=logits.device), torch.empty(n, dtype=cd, device=logits.device)
    check_index("labels", labels, v, ignore_index)
    return launch_ce(logits, labels, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap,
                     inv_temperature)


def launch_ce(logits, labels, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap, inv_temperature):
    """The native call of ``ce_rows`` without its argument checks: for callers that built every tensor
    themselves in the kernel's layout (``logits`` [n, V] with n >= 1 and unit column stride, int64 ``labels``
    [n], ``grad_scale`` [n] or [1] (one scale for every row) in the compute dtype, ``grad`` ``logits`` itself or
    disjoint from the inputs), as the small-shape path of ``linear_cross_entropy`` does. Bad labels still raise
    (the kernel counts them)."""
    n, v = logits.shape
    cd = compute_dtype(logits.dtype)
    loss = torch.empty(n, dtype=cd, device=logits.device)
    lse = torch.empty(n, dtype=cd, device=logits.device)
    ext = lib()
    scale_stride = grad_scale.stride(0) if grad_scale is not None and grad_scale.shape[0] > 1 else 0
    grad_stride = grad.stride(0) if grad is not None else 0
    if logits.device.type == "cuda":
        with torch.cuda.device(logits.device):
            ext.cuda_ce_rows(logits.data_ptr(), logits.stride(0), ptr(grad), grad_stride, DTYPE_CODES[logits.dtype],
                             labels.data_ptr(), ptr(grad_scale), scale_stride, loss.data_ptr(), lse.data_ptr(), n, v,
                             ignore_index, label_smoothing, z_loss, softcap, inv_temperature, cuda_stream(logits))
        return loss, lse
    bad = ext.cpu_ce_rows(logits.data_ptr(), logits.stride(0), ptr(grad), grad_stride, DTYPE_CODES[logits.dtype],
                          labels.data_ptr(), ptr(grad_scale), scale_stride, loss.data_ptr(), lse.data_ptr(), n, v,
                          ignore_index, label_smoothing, z_loss, softcap, inv_temperature, threads())
    raise_bad_labels(bad, "labels", v, ignore_index)
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
        check_written_rows("logits", logits, logits.shape[0], logits.shape[1])
    return _run_ce(logits, labels, grad_scale, logits, ignore_index, label_smoothing, z_loss, softcap,
                   inv_temperature)


@ce_rows_inplace.register_fake
def _(logits, labels, grad_scale, ignore_index, label_smoothing, z_loss, softcap, inv_temperature):
    return _ce_fake(logits, labels, grad_scale)


# ------------------------------------------------------------------------------------------- log-prob rows


def _check_logprob(logits, targets):
    check_tensor("logits", logits, logits.device, dim=2)
    check_device("logits", logits)
    if logits.device.type != "cpu":
        raise NotImplementedError("the native log-prob rows run on CPU tensors (CUDA: use backend='triton')")
    check_tensor("logits", logits, logits.device, dtypes=ROW_DTYPES["cpu"])
    n, v = logits.shape
    if v < 1:
        raise ValueError("logits must have at least one column (V >= 1)")
    check_rows("logits", logits, n, v)
    check_tensor("targets", targets, logits.device)
    check_vector("targets", targets, n, torch.int64)
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
    check_index("targets", targets, v, ignore_index)
    launch_logprob_fwd(logits, targets, logp, lse, mean_s if want_entropy else None, ignore_index, softcap,
                       inv_temperature)
    return logp, lse, mean_s


def launch_logprob_fwd(logits, targets, logp, lse, mean_s, ignore_index, softcap, inv_temperature) -> None:
    """The native call of ``logprob_fwd`` (CPU) without its argument checks, into ``logp``, ``lse`` and
    ``mean_s`` (None: no entropy): for callers that built every tensor themselves in the kernel's layout (as
    ``launch_ce`` says). Bad targets still raise (the kernel counts them)."""
    n, v = logits.shape
    bad = lib().cpu_logprob_fwd(logits.data_ptr(), logits.stride(0), DTYPE_CODES[logits.dtype], targets.data_ptr(),
                                logp.data_ptr(), lse.data_ptr(), ptr(mean_s), n, v, ignore_index, softcap,
                                inv_temperature, threads())
    raise_bad_labels(bad, "targets", v, ignore_index)


@logprob_fwd.register_fake
def _(logits, targets, ignore_index, softcap, inv_temperature, want_entropy):
    cd = compute_dtype(logits.dtype)
    n = logits.shape[0]
    return logits.new_empty(n, dtype=cd), logits.new_empty(n, dtype=cd), logits.new_empty(n if want_entropy else 0,
                                                                                           dtype=cd)


def _run_logprob_bwd(logits, targets, lse, mean_s, g_logp, g_ent, grad, ignore_index, softcap, inv_temperature):
    n, v, cd = _check_logprob(logits, targets)
    check_tensor("grad", grad, logits.device, dtypes=(logits.dtype,))
    check_written_rows("grad", grad, n, v)
    check_alias("grad", grad, "logits", logits, allow_exact=True)
    for name, t in (("lse", lse), ("g_logp", g_logp), ("mean_s", mean_s), ("g_ent", g_ent)):
        if t is not None:
            check_tensor(name, t, logits.device)
            check_vector(name, t, n, cd)
            check_alias("grad", grad, name, t, allow_exact=False)
    check_alias("grad", grad, "targets", targets, allow_exact=False)
    if g_ent is not None and mean_s is None:
        raise ValueError("g_ent needs mean_s (E_p[s] from logprob_fwd with want_entropy=True)")
    if not inv_temperature > 0.0:
        raise ValueError(f"inv_temperature must be > 0, got {inv_temperature}")
    if n == 0:
        return
    check_index("targets", targets, v, ignore_index)
    launch_logprob_bwd(logits, targets, lse, mean_s, g_logp, g_ent, grad, ignore_index, softcap, inv_temperature)


def launch_logprob_bwd(logits, targets, lse, mean_s, g_logp, g_ent, grad, ignore_index, softcap,
                       inv_temperature) -> None:
    """The native call of ``logprob_bwd`` (CPU) without its argument checks (see ``launch_logprob_fwd``)."""
    n, v = logits.shape
    bad = lib().cpu_logprob_bwd(logits.data_ptr(), logits.stride(0), grad.data_ptr(), grad.stride(0),
                                DTYPE_CODES[logits.dtype], targets.data_ptr(), lse.data_ptr(),
                                ptr(mean_s) if g_ent is not None else 0, g_logp.data_ptr(), ptr(g_ent), n, v,
                                ignore_index, softcap, inv_temperature, threads())
    raise_bad_labels(bad, "targets", v, ignore_index)


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



"""Argument checks shared by every op. Each error names the argument(s) at fault."""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {t.dtype}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, dtype: bool = True) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; put them on one device")
    if dtype and a.dtype != b.dtype:
        raise TypeError(f"{name_a} has dtype {a.dtype} but {name_b} has dtype {b.dtype}; they must match")


def check_labels(name: str, labels: torch.Tensor, expected_shape, num_classes: int, ignore_index: int,
                 like: torch.Tensor, like_name: str, *, check_range: bool = True) -> None:
    """Integer labels of ``expected_shape`` on ``like``'s device, each in [0, V) or ``ignore_index``
    (``check_range=False``: all but the range, for a caller whose kernel counts bad labels itself).

    On CPU an out-of-range label raises ValueError right away. On CUDA the range check is
    ``torch._assert_async``: it does not synchronize, and a bad label fails the next synchronizing call.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(
            f"{name} has shape {tuple(labels.shape)} but {like_name} implies {tuple(expected_shape)}"
        )
    if labels.device != like.device:
        raise ValueError(f"{name} is on {labels.device} but {like_name} is on {like.device}")
    if not check_range or labels.numel() == 0:
        return
    if labels.device.type == "cuda":
        bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
        torch._assert_async(~bad.any(), f"{name} has a value outside [0, {num_classes}) that is not ignore_index")
        return
    if torch.compiler.is_compiling():  # a data-dependent branch would break the graph; checked eagerly
        return
    # One pass for the common case (3 small ops instead of 6: this check was ~10% of a call at small shapes)
    lo, hi = torch.where(labels == ignore_index, 0, labels).aminmax()
    if int(lo) < 0 or int(hi) >= num_classes:
        bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"{name} has {int(bad.sum())} value(s) outside [0, {num_classes}) that are not "
            f"ignore_index={ignore_index} (first: {first})"
        )


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} but weight has shape {tuple(weight.shape)}: "
            f"hidden's last dim must equal weight's D={weight.shape[1]}"
        )
    check_same("hidden", hidden, "weight", weight)
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)} but weight implies ({weight.shape[0]},)")
        check_same("bias", bias, "weight", weight)


MEMORY_MODES = ("default", "compact")


def check_options(*, reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, temperature: float = 1.0, chunk_size: int | None = None,
                  memory: str = "default") -> None:
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def check_ref_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ref_hidden: torch.Tensor,
                   ref_weight: torch.Tensor | None, ref_bias: torch.Tensor | None):
    """A reference (teacher) model's hidden states and head beside the policy's (already checked by
    ``check_head``): same leading (token) dims and vocabulary V, the reference's own D, one dtype and device.
    ``ref_weight`` None means the policy's head (detached), and then ``ref_bias`` defaults to its bias.
    Returns ``(ref_hidden, ref_weight, ref_bias)``, detached: the reference model is a constant."""
    if ref_weight is None:
        ref_weight = weight.detach()
        if ref_bias is None and bias is not None:
            ref_bias = bias.detach()
    check_float("ref_hidden", ref_hidden)
    check_float("ref_weight", ref_weight)
    if ref_weight.dim() != 2:
        raise ValueError(f"ref_weight must be 2-D [V, D_ref], got shape {tuple(ref_weight.shape)}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but ref_weight has shape {tuple(ref_weight.shape)}:"
                         f" the reference head needs the same vocabulary (V={weight.shape[0]} vs "
                         f"V={ref_weight.shape[0]})")
    if ref_hidden.dim() < 1 or ref_hidden.shape[-1] != ref_weight.shape[1]:
        raise ValueError(f"ref_hidden has shape {tuple(ref_hidden.shape)} but ref_weight has shape "
                         f"{tuple(ref_weight.shape)}: ref_hidden's last dim must equal ref_weight's D")
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden has shape {tuple(ref_hidden.shape)} but hidden has shape "
                         f"{tuple(hidden.shape)}: hidden and ref_hidden must agree on every dimension but the last")
    check_same("ref_hidden", ref_hidden, "ref_weight", ref_weight)
    check_same("hidden", hidden, "ref_hidden", ref_hidden, dtype=False)
    if ref_bias is not None:
        check_float("ref_bias", ref_bias)
        if tuple(ref_bias.shape) != (ref_weight.shape[0],):
            raise ValueError(f"ref_bias has shape {tuple(ref_bias.shape)} but ref_weight implies "
                             f"({ref_weight.shape[0]},)")
        check_same("ref_bias", ref_bias, "ref_weight", ref_weight)
        ref_bias = ref_bias.detach()
    return ref_hidden.detach(), ref_weight.detach(), ref_bias

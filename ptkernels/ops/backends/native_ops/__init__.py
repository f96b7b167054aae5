"""The native kernels (``ptkernels._C``, csrc/) as PyTorch custom ops in the ``ptkernels`` namespace.

Each op is a ``torch.library.custom_op`` with a ``register_fake`` (shapes and dtypes of its outputs), so eager code
calls the kernels directly (without the dispatcher's ~0.1 ms per call: ``common.eager_direct``) while
``torch.compile`` traces through them (fullgraph, AOTAutograd) and sees exactly
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

One module per csrc family: ``rows``, ``sequence``, ``gae``, ``group_advantages``; ``common`` holds the
extension handle, the dtype tables and the argument checks they share. Importing this package registers
every ``torch.ops.ptkernels`` op.
"""

from . import gae as _gae
from . import group_advantages as _group_advantages
from . import rows as _rows
from . import sequence as _sequence
from .common import DTYPE_CODES, ROW_DTYPES, SCALE_MODES, VEC_DTYPES, eager_direct, plain_eager, supports
from .rows import launch_ce, launch_logprob_bwd, launch_logprob_fwd

# What the backends call: each op, dispatched only when something must see it (common.eager_direct); the ops
# themselves are torch.ops.ptkernels.* (and the ``op`` attribute of each name here).
ce_rows = eager_direct(_rows.ce_rows)
ce_rows_inplace = eager_direct(_rows.ce_rows_inplace)
logprob_fwd = eager_direct(_rows.logprob_fwd)
logprob_bwd = eager_direct(_rows.logprob_bwd)
logprob_bwd_inplace = eager_direct(_rows.logprob_bwd_inplace)
segment_sums = eager_direct(_sequence.segment_sums)
segment_sums_bwd = eager_direct(_sequence.segment_sums_bwd)
gae = eager_direct(_gae.gae)
group_advantages = eager_direct(_group_advantages.group_advantages)

__all__ = [
    "DTYPE_CODES",
    "ROW_DTYPES",
    "SCALE_MODES",
    "VEC_DTYPES",
    "ce_rows",
    "ce_rows_inplace",
    "gae",
    "group_advantages",
    "launch_ce",
    "launch_logprob_bwd",
    "launch_logprob_fwd",
    "logprob_bwd",
    "logprob_bwd_inplace",
    "logprob_fwd",
    "plain_eager",
    "segment_sums",
    "segment_sums_bwd",
    "supports",
]

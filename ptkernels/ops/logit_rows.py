"""Row math on one chunk of logits: the non-GEMM half of every fused op.

A fused op multiplies a chunk of hidden states by the head (a GEMM, always PyTorch's), hands the chunk of
logits ``z [c, V]`` to one of these row functions, then multiplies the gradient they write back by the head
(two more GEMMs). The row functions are the only part that differs between backends:

    TorchRows   plain PyTorch ops (any device)
    TritonRows  Triton kernels, one program per row, two passes over V (ptkernels/kernels/logit_rows.py)

Every row function understands ``ignore_index`` (that row gives 0 and a zero gradient), the logit transform
``s = softcap * tanh(z / softcap) / temperature`` and applies its chain rule, computes in fp32 (fp64 for fp64
input), and may write its gradient in place of ``z`` (``grad_out is z``).

Formulas (p = softmax(s), lse = logsumexp(s), y the label, eps label smoothing, c the z-loss coefficient):
    cross-entropy   loss = (1-eps)(lse - s_y) + eps(lse - mean(s)) + c lse^2
                    dloss/ds = p (1 + 2 c lse) - eps / V - (1-eps) onehot(y)
    log-prob        logp = s_y - lse;   entropy H = lse - E_p[s]
                    d/ds [g_logp logp + g_H H] = g_logp onehot(y) - p (g_logp + g_H (s - E_p[s]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowOptions:
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    temperature: float = 1.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchRows:
    """Row math in PyTorch ops. Works on any device; the CPU default until the native extension lands."""

    name = "torch"

    @staticmethod
    def _work_buffer(z: torch.Tensor, grad_out: torch.Tensor | None) -> torch.Tensor:
        # Work in place when the caller lets us overwrite z and it is already in the compute dtype.
        if grad_out is z and z.dtype == compute_dtype(z.dtype) and z.is_contiguous():
            return z
        return z.to(compute_dtype(z.dtype), copy=True)

    @staticmethod
    def _transform_(s: torch.Tensor, o: RowOptions):
        """s <- softcap*tanh(s/softcap)/T in place; returns dtanh = 1 - tanh^2 (or None) for the chain rule."""
        dtanh = None
        if o.softcap is not None:
            t = s.div_(o.softcap).tanh_()
            dtanh = 1.0 - t * t
            s.mul_(o.softcap)
        if o.temperature != 1.0:
            s.div_(o.temperature)
        return dtanh

    @staticmethod
    def _chain_(g: torch.Tensor, dtanh, o: RowOptions) -> None:
        if dtanh is not None:
            g.mul_(dtanh)
        if o.temperature != 1.0:
            g.div_(o.temperature)

    @classmethod
    def _read_only_view(cls, z, o: RowOptions):
        """The transformed logits when no gradient is written: copy only if a transform or upcast needs it."""
        if o.softcap is None and o.temperature == 1.0:
            return z.to(compute_dtype(z.dtype))
        s = cls._work_buffer(z, None)
        cls._transform_(s, o)
        return s

    def ce(self, z, labels, o: RowOptions, grad_scale=None, grad_out=None):
        if grad_scale is None:
            s, dtanh = self._read_only_view(z, o), None
        else:
            s = self._work_buffer(z, grad_out)
            dtanh = self._transform_(s, o)
        valid = labels != o.ignore_index
        y = torch.where(valid, labels, torch.zeros_like(labels)).long().unsqueeze(1)
        lse = torch.logsumexp(s, dim=1)
        eps = o.label_smoothing
        loss = (1.0 - eps) * (lse - s.gather(1, y).squeeze(1))
        if eps:
            loss = loss + eps * (lse - s.mean(dim=1))
        if o.z_loss:
            loss = loss + o.z_loss * lse * lse
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        loss = torch.where(valid, loss, zero)
        lse = torch.where(valid, lse, zero)
        if grad_scale is None:
            return loss, lse
        coef = torch.where(valid, grad_scale.to(s.dtype), zero)
        g = s.sub_(lse.unsqueeze(1)).exp_()  # p, in the work buffer
        g.mul_((coef * (1.0 + 2.0 * o.z_loss * lse)).unsqueeze(1) if o.z_loss else coef.unsqueeze(1))
        if eps:
            g.sub_((coef * (eps / s.shape[1])).unsqueeze(1))
        g.scatter_add_(1, y, (-(1.0 - eps) * coef).unsqueeze(1))
        self._chain_(g, dtanh, o)
        if grad_out is not g:
            grad_out.copy_(g)
        return loss, lse

    def logprob_fwd(self, z, targets, o: RowOptions, want_entropy: bool):
        s = self._read_only_view(z, o)
        valid = targets != o.ignore_index
        y = torch.where(valid, targets, torch.zeros_like(targets)).long().unsqueeze(1)
        lse = torch.logsumexp(s, dim=1)
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        logp = torch.where(valid, s.gather(1, y).squeeze(1) - lse, zero)
        lse = torch.where(valid, lse, zero)
        mean_s = None
        if want_entropy:
            p = torch.softmax(s, dim=1)
            mean_s = torch.where(valid, (p * s).sum(dim=1), zero)
        return logp, lse, mean_s

    def logprob_bwd(self, z, targets, lse, mean_s, g_logp, g_ent, o: RowOptions, grad_out):
        s = self._work_buffer(z, grad_out)
        dtanh = self._transform_(s, o)
        valid = targets != o.ignore_index
        y = torch.where(valid, targets, torch.zeros_like(targets)).long().unsqueeze(1)
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        g_logp = torch.where(valid, g_logp.to(s.dtype), zero)
        if g_ent is not None:
            g_ent = torch.where(valid, g_ent.to(s.dtype), zero)
            # -p * (g_logp + g_H (s - E[s])), built in place in s
            p = torch.exp(s - lse.unsqueeze(1))
            g = s.sub_(mean_s.unsqueeze(1)).mul_(g_ent.unsqueeze(1)).add_(g_logp.unsqueeze(1)).mul_(p).neg_()
        else:
            g = s.sub_(lse.unsqueeze(1)).exp_().mul_(-g_logp.unsqueeze(1))
        g.scatter_add_(1, y, g_logp.unsqueeze(1))
        self._chain_(g, dtanh, o)
        if grad_out is not g:
            grad_out.copy_(g)


_TORCH_ROWS = TorchRows()


def get_rows(backend: str):
    """The row implementation for a resolved backend name ("torch", "triton", "native")."""
    if backend == "triton":
        from .triton_rows import TRITON_ROWS

        return TRITON_ROWS
    if backend == "native":  # pragma: no cover - arrives with the csrc extension
        from .native_rows import NATIVE_ROWS

        return NATIVE_ROWS
    return _TORCH_ROWS

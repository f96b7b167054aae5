"""Row math on one chunk of logits: the non-GEMM half of every fused op.

A fused op multiplies a chunk of hidden states by the head (a GEMM, always PyTorch's), hands the chunk of
logits ``z [c, V]`` to one of these row functions, then multiplies the gradient they return by the head
(two more GEMMs). The row functions are the only part that differs between backends:

    TorchRows   plain PyTorch ops (any device)
    TritonRows  Triton kernels, one program per row, two passes over V (ptkernels/kernels/logit_rows.py)

Every row function understands ``ignore_index`` (that row gives 0 and a zero gradient), the logit transform
``s = softcap * tanh(z / softcap) / temperature`` and applies its chain rule, and computes in fp32 (fp64 for
fp64 input). The interface (TorchRows is the spec):

    ce(z, labels, o, *, want_grad, grad_scale=None, grad_out=None, scratch=False, all_valid=False)
        -> (loss [c], lse [c], grad [c, V] or None)
        grad = d loss_i / d z_i, times grad_scale[i] when given. It is written into grad_out when given;
        otherwise into any buffer, z itself included when ``scratch`` says z may be overwritten.
        ``all_valid`` promises that no label is ignore_index (lets an implementation skip the masking).
    logprob_fwd(z, targets, o, want_entropy) -> (logp, lse, E_p[s] or None)
    logprob_bwd(z, targets, lse, mean_s, g_logp, g_ent, o, grad_out)   grad written into grad_out

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

    def ce(self, z, labels, o: RowOptions, *, want_grad=False, grad_scale=None, grad_out=None, scratch=False,
           all_valid=False):
        cd = compute_dtype(z.dtype)
        transformed = o.softcap is not None or o.temperature != 1.0
        s = z if z.dtype == cd else z.to(cd)
        if transformed and s is z and not scratch:
            s = s.clone()
        dtanh = self._transform_(s, o) if transformed else None
        # log_softmax is one fused pass; lse follows from any column: lse = s_0 - logp_0.
        logp = torch.log_softmax(s, dim=1)
        valid = labels != o.ignore_index
        y = torch.where(valid, labels, torch.zeros_like(labels)).long().unsqueeze(1)
        lse = s[:, 0] - logp[:, 0]
        eps = o.label_smoothing
        loss = -(1.0 - eps) * logp.gather(1, y).squeeze(1)
        if eps:
            loss = loss - eps * logp.mean(dim=1)
        if o.z_loss:
            loss = loss + o.z_loss * lse * lse
        zero = torch.zeros((), dtype=cd, device=z.device)
        loss = torch.where(valid, loss, zero)
        lse = torch.where(valid, lse, zero)
        if not want_grad:
            return loss, lse, None
        # g = a * [p (1 + 2 c lse) - eps/V - (1 - eps) onehot(y)], a = grad_scale * valid (per row)
        a = None if grad_scale is None else grad_scale.to(cd)
        if not all_valid:
            a = torch.where(valid, a if a is not None else torch.ones((), dtype=cd, device=z.device), zero)
        b = a if not o.z_loss else (1.0 + 2.0 * o.z_loss * lse) * (a if a is not None else 1.0)
        g = logp.exp_()
        if b is not None:
            g.mul_(b.unsqueeze(1))
        if eps:
            g.sub_((eps / s.shape[1]) * (a.unsqueeze(1) if a is not None else 1.0))
        onehot_coef = -(1.0 - eps) * (a if a is not None else torch.ones(g.shape[0], dtype=cd, device=z.device))
        g.scatter_add_(1, y, onehot_coef.unsqueeze(1))
        self._chain_(g, dtanh, o)
        if grad_out is not None:
            grad_out.copy_(g)
            return loss, lse, grad_out
        return loss, lse, g

    def logprob_fwd(self, z, targets, o: RowOptions, want_entropy: bool):
        s = self._read_only_view(z, o)
        valid = targets != o.ignore_index
        y = torch.where(valid, targets, torch.zeros_like(targets)).long().unsqueeze(1)
        logp_all = torch.log_softmax(s, dim=1)  # one fused pass (logsumexp alone costs about twice as much)
        lse = s[:, 0] - logp_all[:, 0]
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        logp = torch.where(valid, logp_all.gather(1, y).squeeze(1), zero)
        lse = torch.where(valid, lse, zero)
        mean_s = None
        if want_entropy:  # E_p[s] = lse - H, H = -sum p log p
            entropy = -(logp_all.exp() * logp_all).sum(dim=1)
            mean_s = torch.where(valid, lse - entropy, zero)
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

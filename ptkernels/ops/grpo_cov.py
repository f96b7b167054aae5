"""verl's entropy-collapse controls Clip-Cov and KL-Cov (``loss_type="clip_cov"`` / ``"kl_cov"`` of the GRPO ops):
the batch-level token selection, and KL-Cov's extra term on the selected tokens.

Both pick tokens by the covariance of advantage and current log-prob over the batch's completion tokens,
``cov = (A - mean A)(logp - mean logp)``: a global mean, a random subset (Clip-Cov) or a top-k (KL-Cov), which no
row kernel can see. So the selection is computed first, from the detached log-probs, and reaches the row pass as a
per-token weight: Clip-Cov's ``corr = 1 - sel`` multiplies the clipped policy term (folded into the policy
weights ``pw``), KL-Cov's ``kl_cov_coef * sel * |logp - old|`` is added to its unclipped ``-A r`` term
(``with_kl_cov``). The selection synchronizes with the host once (verl's ``nonzero`` / ``.item()`` / ``topk``
sizes). Formulas: ``ptkernels.reference.grpo.clip_cov_selection`` / ``kl_cov_selection``.
"""

from __future__ import annotations

import torch

from .backends.base import GRPORows


def clip_cov_selection(lp, old, adv, m, *, lo: float, hi: float, ratio: float, lb: float, ub: float,
                       generator=None) -> torch.Tensor:
    """``[B, T]`` 1 on the tokens whose gradient Clip-Cov cuts: ``max(int(ratio * sum m), 1)`` tokens drawn by
    ``torch.randperm(#candidates, generator=generator)`` from the valid, not already clipped tokens with
    ``lb < cov < ub``, candidates in row-major order (as verl's ``nonzero``)."""
    valid = m != 0
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    a = adv.reshape(-1, 1).expand_as(m)
    lp = torch.where(valid, lp, zero)  # garbage (-inf) under the mask stays out of the means
    n_m = m.sum()
    cov = (a - (a * m).sum() / (n_m + 1e-8)) * (lp - (lp * m).sum() / (n_m + 1e-8))
    r = torch.exp(torch.where(valid, lp - old, zero))
    clipped = -a * r.clamp(lo, hi) > -a * r
    idx = (valid & ~clipped & (cov > lb) & (cov < ub)).reshape(-1).nonzero().squeeze(1)
    sel = torch.zeros(m.numel(), dtype=lp.dtype, device=lp.device)
    if idx.numel():
        clip_num = max(int(ratio * n_m.item()), 1)
        perm = torch.randperm(idx.numel(), generator=generator,
                              device=generator.device if generator is not None else "cpu")
        sel[idx[perm[:clip_num].to(idx.device)]] = 1.0
    return sel.view(m.shape)


def kl_cov_selection(lp, adv, m, *, ratio: float) -> torch.Tensor:
    """``[B, T]`` 1 on the top-``max(1, int(N ratio))`` of the N valid tokens by covariance (plain means over
    them; ``torch.topk``); all 0 when ``ratio`` is 0 or no token is valid (verl)."""
    flat_valid = (m != 0).reshape(-1)
    vidx = flat_valid.nonzero().squeeze(1)
    sel = torch.zeros(m.numel(), dtype=lp.dtype, device=lp.device)
    if ratio == 0 or vidx.numel() == 0:
        return sel.view(m.shape)
    va = adv.reshape(-1, 1).expand_as(m).reshape(-1)[vidx]
    vl = lp.reshape(-1)[vidx]
    cov = (va - va.mean()) * (vl - vl.mean())
    sel[vidx[torch.topk(cov, max(1, int(vidx.numel() * ratio)), largest=True).indices]] = 1.0
    return sel.view(m.shape)


def cov_selection(options: dict, lp, old, adv, m):
    """The selection of ``options["loss_type"]`` (clip_cov, kl_cov; None for the others) from the detached
    current log-probs ``lp``, behaviour log-probs ``old``, advantages ``adv [B]`` and mask ``m`` ``[B, T]``."""
    if options["loss_type"] == "clip_cov":
        eps_low = options["epsilon_low"]
        eps_high = eps_low if options["epsilon_high"] is None else options["epsilon_high"]
        return clip_cov_selection(lp, old, adv, m, lo=1.0 - eps_low, hi=1.0 + eps_high,
                                  ratio=options["clip_cov_ratio"], lb=options["clip_cov_lb"],
                                  ub=options["clip_cov_ub"], generator=options["generator"])
    if options["loss_type"] == "kl_cov":
        return kl_cov_selection(lp, adv, m, ratio=options["kl_cov_ratio"])
    return None


def policy_token_weight(emask, sel, loss_type: str):
    """The 0/1 token weight of the policy term: the top-entropy mask times Clip-Cov's ``corr = 1 - sel``."""
    if loss_type != "clip_cov" or sel is None:
        return emask
    corr = 1.0 - sel
    return corr if emask is None else emask * corr


def selected_fraction(sel, m):
    """Fraction of completion tokens selected (``GRPOOutput.cov_selected_fraction``); None without a selection."""
    return None if sel is None else (sel * m).sum() / m.sum().clamp(min=1.0)


def add_kl_cov(out: GRPORows, logp, old, mask, norm, pw, sel, coef: float, want_grad: bool) -> GRPORows:
    """KL-Cov's ``coef * sel * |logp - old|`` (times the policy weight ``pw`` and the normalizer) added to the row
    pass's loss and gradient (``d|x|/dx = sign(x)``, 0 at 0 as autograd's)."""
    valid = mask != 0
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lr = torch.where(valid, logp - old, zero)
    w = norm * mask * sel * coef
    if pw is not None:
        w = w * pw
    w = torch.where(valid, w, zero)
    out.loss = out.loss + (w * lr.abs()).sum(1)
    if want_grad:
        out.grad = out.grad + w * torch.sign(lr)
    return out


def with_kl_cov(grpo_rows, sel, coef: float):
    """``grpo_rows`` plus KL-Cov's term for rows aligned with ``sel`` (the whole ``[B, T]`` batch)."""
    def rows(logp, old, ref, mask, adv, norm, p, want_grad, pw=None):
        out = grpo_rows(logp, old, ref, mask, adv, norm, p, want_grad, pw=pw)
        return add_kl_cov(out, logp, old, mask, norm, pw, sel, coef, want_grad)
    return rows

"""The backends' interfaces: what every backend module (torch.py, triton.py, native.py) provides, and the
options they take. The non-GEMM half of every op: row math on one chunk of logits, and the elementwise
families (GRPO surrogate, GAE, segment sums).

A fused op multiplies a chunk of hidden states by the head (a GEMM, always PyTorch's), hands the chunk of
logits ``z [c, V]`` to one of these row functions, then multiplies the gradient they return by the head
(two more GEMMs). The row functions are the only part that differs between backends:

    torch.TorchRows    plain PyTorch ops (any device): the spec
    triton.TritonRows  Triton kernels, one program per row, two passes over V (ptkernels/kernels/rows.py)
    native.NativeRows  the csrc/ kernels through the custom ops of native_ops/

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

The compact-memory backward (ops/core/vocab_blocks.py) asks for family ``BLOCK_ROWS`` (the native backend
runs the torch one): the gradient of one block of vocabulary columns from each row's log-sum-exp:

    grad_block(z, labels, lse, coef, col0, o, *, has_b, grad_out=None) -> grad [c, Vb]
        z = the logits of columns [col0, col0 + Vb), overwritten (grad_out None) or not; coef [c, 5] per row
        (A, B, M, C, D):  grad = [p (A + B (s - M)) + C + D onehot(label - col0)] ds/dz,  p = exp(s - lse)
        (has_b False: B and M are 0); rows with label == ignore_index get 0. Cross-entropy and log-probs
        below are both of this form (ops/core/vocab_blocks.py gives their coefficients).

Formulas (p = softmax(s), lse = logsumexp(s), y the label, eps label smoothing, c the z-loss coefficient):
    cross-entropy   loss = (1-eps)(lse - s_y) + eps(lse - mean(s)) + c lse^2
                    dloss/ds = p (1 + 2 c lse) - eps / V - (1-eps) onehot(y)
    log-prob        logp = s_y - lse;   entropy H = lse - E_p[s]
                    d/ds [g_logp logp + g_H H] = g_logp onehot(y) - p (g_logp + g_H (s - E_p[s]))

The other families, by the same name in every backend module (a module without one falls back to torch's,
see ``ptkernels.ops.backends.get``):

    JSD rows        jsd(zs, zt, labels, o: JSDRowOptions, *, want_grad, grad_scale=None, scratch=False)
                    -> (loss [c], grad [c, V] or None); TorchJSDRows is the spec
    GRPO rows       grpo_rows(logp, old, ref, mask, adv, norm, p: GRPOParams, want_grad, pw=None) -> GRPORows
                    (pw: the policy term's per-token weight, broadcast like adv; formulas in kernels/grpo.py)
    advantages      group_advantages(r, group_size, scale, eps) -> [N]   (the torch one on "triton": O(N) work)
    GAE             gae(rewards, values, mask, gamma, lam) -> (advantages, returns)
    segment sums    sequence_fwd(x, mask, cu, seg, n_seq, seq_len, packed, average) -> (out [S], den [S])
                    sequence_bwd(g, den, mask, cu, seg, n_seq, seq_len, packed, average, shape, dtype) -> grad
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


@dataclass(frozen=True)
class JSDRowOptions:
    beta: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100

    @property
    def mode(self) -> int:
        """0: forward KL (beta = 0), 1: reverse KL (beta = 1), 2: the mixture (0 < beta < 1)."""
        return 0 if self.beta == 0.0 else 1 if self.beta == 1.0 else 2


# The GRPO family's per-token policy terms (kernels/grpo.py documents each): loss type -> kernel KIND.
GRPO_KINDS = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "luspo": 0, "cispo": 1, "sapo": 2, "vespo": 3, "gmpo": 4,
              "clip_cov": 0, "kl_cov": 5}


@dataclass(frozen=True)
class GRPOParams:
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    beta: float
    seq_level: bool
    has_ref: bool
    kind: int = 0  # GRPO_KINDS
    bias_kl: bool = False  # k3 * coef_1 (TRL's use_bias_correction_kl)
    cap: float = 0.0  # cispo: the raw upper bound of the detached ratio (TRL's epsilon_high)
    tau_pos: float = 1.0  # sapo temperatures
    tau_neg: float = 1.05

    @property
    def lo(self) -> float:
        """Lower clip bound: of the ratio (1 - eps_low), or of the log-ratio for GMPO (-eps_low)."""
        return -self.epsilon_low if self.kind == 4 else 1.0 - self.epsilon_low

    @property
    def hi(self) -> float:
        return self.epsilon_high if self.kind == 4 else 1.0 + self.epsilon_high


@dataclass
class GRPORows:
    """Per-row partial sums of one call of a row function, and d loss / d logp (or None)."""

    loss: torch.Tensor  # [R] sum_t norm * m * l
    kl: torch.Tensor  # [R] sum_t m * k3
    low: torch.Tensor  # [R] sum_t m * [low] (token level) or [low] (sequence level)
    high: torch.Tensor
    region: torch.Tensor
    grad: torch.Tensor | None  # [R, C]

"""fused_linear_grpo_loss on every fused backend against a float64 reference built from the full logits:
ptkernels.reference.linear_token_logprobs + the TRL-style reference GRPO loss."""

import pytest
import torch

from ptkernels import reference
from ptkernels.ops.fused_grpo import fused_linear_grpo_loss
from ptkernels.reference import rl as ref
from tests.helpers import DEVICE, FUSED_BACKENDS, assert_close_to_truth, bf16_store_slack

B, T, D, V = 4, 5, 7, 37
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
METRICS = ("kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high")


def _problem(dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)  # noqa: E731
    hidden, weight = mk(B, T, D), mk(V, D, scale=0.7)
    b = mk(V, scale=0.3) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[1, 3:] = 0  # right padding
    mask[2, :] = 0  # an empty completion
    mask[3, 1:] = 0  # one token
    ids[1, 3:] = -1  # padding ids may be anything
    ids[3, 4] = V + 3
    with torch.no_grad():
        logp = reference.linear_token_logprobs(hidden, weight, ids.clamp(0, V - 1), bias=b, temperature=0.8)
    old = logp + mk(B, T, scale=0.3) + mk(B, 1, scale=0.3)  # ratios past both clips, per token and sequence
    refp = logp + mk(B, T, scale=0.3)
    adv = mk(B).abs() * torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    to = lambda x: None if x is None else x.to(device=DEVICE, dtype=dtype)  # noqa: E731
    leaves = [to(x).requires_grad_() if x is not None else None for x in (hidden, weight, b)]
    return (*leaves, ids.to(DEVICE), mask.to(DEVICE), to(old), to(refp), to(adv))


def _truth(hidden, weight, bias, ids, mask, adv, *, old_logps=None, temperature=0.8, entropy_coef=0.0, **kw):
    lp, ent = reference.linear_token_logprobs(hidden, weight, ids.clamp(0, V - 1), bias=bias,
                                              temperature=temperature, return_entropy=True)
    return ref.grpo_loss(lp, old_logps, adv, mask, entropies=ent, entropy_coef=entropy_coef, **kw)


def _check(ours, truth, leaves, rtol, what, entropy=True):
    assert_close_to_truth(ours.loss, truth.loss, rtol, f"{what} loss")
    for f in METRICS:
        assert_close_to_truth(getattr(ours, f), getattr(truth, f), rtol, f"{what} {f}")
    if entropy:
        assert_close_to_truth(ours.entropy, truth.entropy, rtol, f"{what} entropy")
    leaves = [x for x in leaves if x is not None]
    g_ours = torch.autograd.grad(ours.loss, leaves)
    g_truth = torch.autograd.grad(truth.loss, leaves)
    for name, a, b in zip(("hidden", "weight", "bias"), g_ours, g_truth):
        assert_close_to_truth(a, b, rtol, f"{what} grad {name}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_grpo_matches_reference(backend, loss_type, level):
    hidden, weight, bias, ids, mask, old, refp, adv = _problem()
    kw = dict(old_logps=old, ref_logps=refp, beta=0.05, epsilon_low=0.15, epsilon_high=0.25, delta=1.4,
              loss_type=loss_type, importance_sampling_level=level, max_completion_length=8, num_items_in_batch=11)
    ours = fused_linear_grpo_loss(hidden, weight, ids, mask, adv, bias=bias, temperature=0.8, entropy_coef=0.02,
                                  chunk_size=4, backend=backend, **kw)
    truth = _truth(hidden, weight, bias, ids, mask, adv, entropy_coef=0.02, **kw)
    _check(ours, truth, (hidden, weight, bias), 1e-9, f"{backend}/{loss_type}/{level}")
    assert float(truth.clip_ratio) > 0  # the clipping branches were exercised


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_grpo_on_policy_no_bias_no_kl(backend, level):
    """old_logps=None (detached current log-probs), beta=0, no entropy: TRL's default GRPO step."""
    hidden, weight, _, ids, mask, _, _, adv = _problem(bias=False)
    ours = fused_linear_grpo_loss(hidden, weight, ids, mask, adv, temperature=0.8, importance_sampling_level=level,
                                  loss_type="grpo", chunk_size=3, backend=backend)
    assert ours.entropy is None
    truth = _truth(hidden, weight, None, ids, mask, adv, importance_sampling_level=level, loss_type="grpo")
    _check(ours, truth, (hidden, weight), 1e-9, "on-policy", entropy=False)
    assert float(ours.clip_ratio) == 0.0 and float(ours.kl) == 0.0


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_grpo_sync_free_and_chunking_agree(backend, level):
    hidden, weight, bias, ids, mask, old, refp, adv = _problem(seed=1)
    kw = dict(bias=bias, old_logps=old, ref_logps=refp, beta=0.1, importance_sampling_level=level,
              temperature=0.8, entropy_coef=0.01, backend=backend)
    base = fused_linear_grpo_loss(hidden, weight, ids, mask, adv, chunk_size=64, **kw)
    g_base = torch.autograd.grad(base.loss, (hidden, weight, bias))
    for chunk, sync_free in ((1, False), (7, True), (64, True)):
        out = fused_linear_grpo_loss(hidden, weight, ids, mask, adv, chunk_size=chunk, sync_free=sync_free, **kw)
        g = torch.autograd.grad(out.loss, (hidden, weight, bias))
        assert_close_to_truth(out.loss, base.loss, 1e-12, f"loss chunk={chunk}")
        for f in (*METRICS, "entropy"):
            assert_close_to_truth(getattr(out, f), getattr(base, f), 1e-12, f"{f} chunk={chunk}")
        for a, b in zip(g, g_base):
            assert_close_to_truth(a, b, 1e-12, f"grad chunk={chunk}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_grpo_float32_return_entropy_and_no_grad(backend):
    hidden, weight, bias, ids, mask, old, refp, adv = _problem()
    h32, w32 = (x.detach().float().requires_grad_() for x in (hidden, weight))
    kw = dict(old_logps=old.float(), ref_logps=refp.float(), beta=0.1, temperature=0.8)
    ours = fused_linear_grpo_loss(h32, w32, ids, mask, adv.float(), return_entropy=True, backend=backend, **kw)
    assert ours.loss.dtype == torch.float32 and ours.entropy is not None
    truth = _truth(hidden, weight, None, ids, mask, adv, old_logps=old, ref_logps=refp, beta=0.1)
    assert_close_to_truth(ours.loss, truth.loss, 1e-5, "fp32 loss")
    assert_close_to_truth(ours.entropy, truth.entropy, 1e-5, "fp32 entropy")
    g32 = torch.autograd.grad(ours.loss, (h32, w32))
    g64 = torch.autograd.grad(truth.loss, (hidden, weight))
    for a, b in zip(g32, g64):
        assert_close_to_truth(a, b, 1e-5, "fp32 grad")
    with torch.no_grad():
        out = fused_linear_grpo_loss(h32, w32, ids, mask, adv.float(), backend=backend, **kw)
    assert_close_to_truth(out.loss, truth.loss, 1e-5, "no-grad loss")


def test_fused_grpo_reference_backend_and_all_masked():
    hidden, weight, bias, ids, mask, old, refp, adv = _problem()
    kw = dict(bias=bias, old_logps=old, ref_logps=refp, beta=0.1, entropy_coef=0.01, temperature=0.8)
    a = fused_linear_grpo_loss(hidden, weight, ids, mask, adv, backend="reference", **kw)
    b = _truth(hidden, weight, bias, ids, mask, adv, old_logps=old, ref_logps=refp, beta=0.1, entropy_coef=0.01)
    assert_close_to_truth(a.loss, b.loss, 1e-12, "reference loss")
    for backend in FUSED_BACKENDS:
        out = fused_linear_grpo_loss(hidden, weight, ids, torch.zeros_like(mask), adv, backend=backend, **kw)
        g = torch.autograd.grad(out.loss, (hidden, weight, bias))
        assert float(out.loss.detach()) == 0.0 and float(out.entropy) == 0.0
        assert all(torch.equal(x, torch.zeros_like(x)) for x in g)


def test_fused_grpo_errors():
    hidden, weight, bias, ids, mask, old, refp, adv = _problem()
    bad = ids.cpu().clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match="completion_ids"):  # on CPU: on CUDA a device-side assert (test_gpu.py)
        fused_linear_grpo_loss(hidden.detach().cpu(), weight.detach().cpu(), bad, mask.cpu(), adv.cpu(),
                               backend="torch")
    with pytest.raises(ValueError, match="completion_mask has shape"):
        fused_linear_grpo_loss(hidden, weight, ids, mask[:, :3], adv, backend="torch")
    with pytest.raises(ValueError, match="hidden must be 3-D"):
        fused_linear_grpo_loss(hidden[0], weight, ids, mask, adv, backend="torch")
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        fused_linear_grpo_loss(hidden, weight, ids, mask, adv, loss_type="ppo", backend="torch")
    with pytest.raises(ValueError, match="needs ref_logps"):
        fused_linear_grpo_loss(hidden, weight, ids, mask, adv, beta=0.1, backend="torch")
    with pytest.raises(ValueError, match="ref_logps has shape"):
        fused_linear_grpo_loss(hidden, weight, ids, mask, adv, ref_logps=refp[:, :2], backend="torch")
    with pytest.raises(ValueError, match="advantages has shape"):
        fused_linear_grpo_loss(hidden, weight, ids, mask, adv[:2], backend="torch")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_grpo_bf16_no_worse_than_eager(backend):
    """bf16 hidden/head: loss and d hidden no further from the float64 truth (on the bf16-rounded inputs) than
    eager bf16 (bf16 logits upcast to fp32, log_softmax + gather, the reference loss)."""
    hidden, weight, _, ids, mask, old, refp, adv = _problem(bias=False, seed=2)
    kw = dict(old_logps=old.float(), ref_logps=refp.float(), beta=0.1)
    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()

    ours_h = h16.clone().requires_grad_()
    ours = fused_linear_grpo_loss(ours_h, w16, ids, mask, adv.float(), backend=backend, temperature=0.8, **kw)
    g_ours, = torch.autograd.grad(ours.loss, ours_h)

    eager_h = h16.clone().requires_grad_()
    logits = torch.nn.functional.linear(eager_h, w16).float() / 0.8
    lp = torch.log_softmax(logits, -1).gather(-1, ids.clamp(0, V - 1)[..., None])[..., 0]
    eager = ref.grpo_loss(lp, kw["old_logps"], adv.float(), mask, ref_logps=kw["ref_logps"], beta=0.1)
    g_eager, = torch.autograd.grad(eager.loss, eager_h)

    truth_h = h16.double().requires_grad_()
    truth = _truth(truth_h, w16.double(), None, ids, mask, adv, old_logps=old, ref_logps=refp, beta=0.1)
    g_truth, = torch.autograd.grad(truth.loss, truth_h)

    err = lambda a, b: float((a.detach().double() - b.detach().double()).abs().max())  # noqa: E731
    slack = bf16_store_slack(backend, torch.bfloat16)
    assert ours.loss.dtype == torch.float32 and g_ours.dtype == torch.bfloat16
    assert err(ours.loss, truth.loss) <= err(eager.loss, truth.loss) + 1e-5
    assert err(g_ours, g_truth) <= slack * err(g_eager, g_truth) + 1e-3 * float(g_truth.abs().max())

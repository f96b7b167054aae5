"""Preference losses on sequence log-probs (dpo/cpo/simpo/orpo/kto) against the TRL-verbatim float64 reference."""

import dataclasses

import pytest
import torch

from ptkernels.ops import preference as ops
from ptkernels.reference import preference as reference
from tests.helpers import DEVICE, assert_close_to_truth

FIELDS = ("loss", "losses", "chosen_rewards", "rejected_rewards", "reward_accuracy", "reward_margin",
          "chosen_logps", "rejected_logps", "nll_loss", "log_odds_ratio", "log_odds_chosen")


def logps(b, *, seed, low=-40.0, high=-5.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    t = low + (high - low) * torch.rand(b, generator=gen, dtype=torch.float64)
    return t.to(device=DEVICE, dtype=dtype).requires_grad_()


def batch(b, dtype=torch.float64, low=-40.0, high=-5.0):
    return [logps(b, seed=s, low=low, high=high, dtype=dtype) for s in range(4)]


def compare(ours, truth, inputs, rtol=1e-12, what=""):
    assert type(ours) is type(truth)
    for f in dataclasses.fields(truth):
        a, b = getattr(ours, f.name), getattr(truth, f.name)
        assert (a is None) == (b is None), f"{what}: field {f.name} is {a} vs {b}"
        if a is not None:
            assert_close_to_truth(a, b, rtol, f"{what} {f.name}")
    inputs = [t for t in inputs if t is not None]
    g_ours = torch.autograd.grad(ours.loss, inputs, allow_unused=True)
    g_truth = torch.autograd.grad(truth.loss, inputs, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_ours, g_truth)):
        assert (a is None) == (b is None), f"{what}: grad {i} presence"
        if a is not None:
            assert_close_to_truth(a, b, rtol, f"{what} grad {i}")


@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("loss_type", reference.DPO_LOSS_TYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_matches_reference(b, loss_type, label_smoothing):
    pc, pr, rc, rr = batch(b)
    lengths = dict(chosen_lengths=torch.arange(3, 3 + b, device=DEVICE),
                   rejected_lengths=torch.arange(7, 7 + b, device=DEVICE).double())
    kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing, **lengths)
    if loss_type == "exo_pair" and label_smoothing == 0:
        with pytest.raises(ValueError, match="exo_pair.*label_smoothing > 0"):
            ops.dpo_loss(pc, pr, rc, rr, **kw)
        return
    nll = None
    if loss_type == "sft":  # sft is nll_loss (required; test_dpo_sft_needs_nll_loss)
        nll = torch.tensor(2.25, dtype=torch.float64, device=DEVICE, requires_grad=True)
        kw["nll_loss"] = nll
    ours = ops.dpo_loss(pc, pr, rc, rr, **kw)
    truth = reference.dpo_loss(pc, pr, rc, rr, **kw)
    compare(ours, truth, (pc, pr, rc, rr, nll), what=loss_type)
    assert ours.loss.dim() == 0 and ours.losses.shape == (b,)
    assert not ours.chosen_rewards.requires_grad and not ours.rejected_rewards.requires_grad


@pytest.mark.parametrize("fn", [ops.dpo_loss, reference.dpo_loss])
def test_dpo_sft_needs_nll_loss(fn):
    """sft is TRL 1.16's -mean(log p) over the chosen completions' tokens, which the (possibly LD-weighted) sums
    and lengths cannot give in general: dpo_loss and its reference refuse to guess it (ValueError)."""
    pc, pr, rc, rr = batch(3)
    lengths = dict(chosen_lengths=torch.full((3,), 4.0, dtype=torch.float64, device=DEVICE),
                   rejected_lengths=torch.full((3,), 5.0, dtype=torch.float64, device=DEVICE))
    for loss_type in ("sft", ["sigmoid", "sft"]):
        with pytest.raises(ValueError, match="loss_type 'sft' needs nll_loss"):
            fn(pc, pr, rc, rr, loss_type=loss_type, **lengths)
    nll = torch.tensor(1.5, dtype=torch.float64, device=DEVICE)
    out = fn(pc, pr, rc, rr, loss_type="sft", nll_loss=nll, **lengths)
    assert out.loss.item() == 1.5 and out.nll_loss.item() == 1.5
    assert torch.equal(out.losses, torch.full((3,), 1.5, dtype=torch.float64, device=DEVICE))


def test_dpo_sigmoid_is_the_dpo_formula():
    pc, pr, rc, rr = batch(7)
    beta = 0.1
    out = ops.dpo_loss(pc, pr, rc, rr, beta=beta)
    u = beta * ((pc - pr) - (rc - rr))
    assert_close_to_truth(out.losses, -torch.log(torch.sigmoid(u)), 1e-12, "losses")
    cw, rw = beta * (pc - rc), beta * (pr - rr)
    assert_close_to_truth(out.chosen_rewards, cw, 1e-14, "chosen rewards")
    assert_close_to_truth(out.reward_accuracy, (cw > rw).double().mean(), 0, "accuracy")
    assert_close_to_truth(out.reward_margin, (cw - rw).mean(), 1e-14, "margin")
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.loss = out.loss * 2


def test_dpo_hinge_active_region_and_rpo_term():
    # small margins: the hinge is active for some pairs, inactive for others
    pc, pr, rc, rr = batch(9, low=-12.0, high=-8.0)
    nll = torch.tensor(1.7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for loss_type in ("hinge", "sigmoid"):
        kw = dict(beta=0.4, loss_type=loss_type, nll_loss=nll, nll_weight=0.3)
        compare(ops.dpo_loss(pc, pr, rc, rr, **kw), reference.dpo_loss(pc, pr, rc, rr, **kw), (pc, pr, rc, rr, nll),
                what=loss_type)
    out = ops.dpo_loss(pc, pr, rc, rr, beta=0.4, loss_type="hinge")
    assert (out.losses > 0).any() and (out.losses == 0).any()


@pytest.mark.parametrize("delta", [None, 0.25])
def test_bco_pair_delta(delta):
    pc, pr, rc, rr = batch(5)
    kw = dict(beta=0.2, loss_type="bco_pair", bco_delta=delta)
    compare(ops.dpo_loss(pc, pr, rc, rr, **kw), reference.dpo_loss(pc, pr, rc, rr, **kw), (pc, pr, rc, rr))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "bco_pair"])
def test_reference_free_equals_cpo(loss_type):
    pc, pr, _, _ = batch(5)
    ones = torch.ones(5, dtype=torch.float64, device=DEVICE)
    a = ops.dpo_loss(pc, pr, None, None, beta=0.3, loss_type=loss_type, reference_free=True, chosen_lengths=ones,
                     rejected_lengths=ones)
    b = reference.dpo_loss(pc, pr, None, None, beta=0.3, loss_type=loss_type, reference_free=True,
                           chosen_lengths=ones, rejected_lengths=ones)
    compare(a, b, (pc, pr))
    if loss_type != "bco_pair":
        c = reference.cpo_loss(pc, pr, beta=0.3, loss_type=loss_type)
        assert_close_to_truth(a.losses, c.losses, 1e-14, "losses")
        assert_close_to_truth(a.chosen_rewards, c.chosen_rewards, 1e-14, "rewards")


@pytest.mark.parametrize("b", [1, 7])
@pytest.mark.parametrize("loss_type", reference.CPO_LOSS_TYPES)
def test_cpo_matches_reference(b, loss_type):
    pc, pr, _, _ = batch(b, low=-3.0, high=-0.2)
    nll = torch.tensor(2.5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for nll_loss in (None, nll):
        kw = dict(beta=0.5, loss_type=loss_type, label_smoothing=0.1, simpo_gamma=0.7, nll_loss=nll_loss,
                  nll_weight=0.8)
        compare(ops.cpo_loss(pc, pr, **kw), reference.cpo_loss(pc, pr, **kw), (pc, pr, nll_loss), what=loss_type)


@pytest.mark.parametrize("b", [1, 5])
def test_simpo_matches_reference(b):
    pc, pr, _, _ = batch(b, low=-3.0, high=-0.2)
    ours = ops.simpo_loss(pc, pr, beta=2.0, gamma=1.2, label_smoothing=0.05)
    truth = reference.simpo_loss(pc, pr, beta=2.0, gamma=1.2, label_smoothing=0.05)
    compare(ours, truth, (pc, pr))
    # gamma_beta_ratio is SimPO's parameterization: gamma = ratio * beta
    ratio = ops.simpo_loss(pc, pr, beta=2.0, gamma_beta_ratio=0.6, label_smoothing=0.05)
    assert_close_to_truth(ratio.loss, truth.loss, 1e-14, "gamma_beta_ratio")
    # the explicit SimPO formula, -log sigma(beta (pi_c - pi_r) - gamma)
    plain = ops.simpo_loss(pc, pr, beta=2.5, gamma=0.5)
    assert_close_to_truth(plain.losses, -torch.log(torch.sigmoid(2.5 * (pc - pr) - 0.5)), 1e-12, "formula")
    # summed log-probs plus lengths are averaged first
    lc = torch.arange(2, 2 + b, device=DEVICE)
    lr = torch.arange(5, 5 + b, device=DEVICE)
    summed = ops.simpo_loss(pc * lc, pr * lr, beta=2.0, gamma=1.2, label_smoothing=0.05, chosen_lengths=lc,
                            rejected_lengths=lr)
    assert_close_to_truth(summed.loss, truth.loss, 1e-12, "lengths")


@pytest.mark.parametrize("b", [1, 5])
def test_orpo_matches_reference(b):
    pc, pr, _, _ = batch(b, low=-3.0, high=-0.05)
    nll = torch.tensor(0.9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for nll_loss in (None, nll):
        compare(ops.orpo_loss(pc, pr, beta=0.25, nll_loss=nll_loss),
                reference.orpo_loss(pc, pr, beta=0.25, nll_loss=nll_loss), (pc, pr, nll_loss), rtol=1e-11)
    out = ops.orpo_loss(pc, pr, beta=0.25, nll_loss=nll)
    # TRL: loss = nll - mean(beta * logsigmoid(log_odds)); our losses are the negated TRL losses
    log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
    trl = nll - (0.25 * torch.nn.functional.logsigmoid(log_odds)).mean()
    assert_close_to_truth(out.loss, trl, 1e-12, "TRL's ORPO loss")


def test_orpo_near_zero_logps_is_stable_in_fp32():
    """log(1 - exp(x)) near x = 0: TRL's log1p(-exp(x)) is -inf in fp32 at x = -1e-8; ours is finite."""
    pc = torch.tensor([-1e-8, -1e-3, -0.7, -5.0], device=DEVICE, requires_grad=True)
    pr = torch.tensor([-2.0, -1e-6, -0.69, -30.0], device=DEVICE, requires_grad=True)
    out = ops.orpo_loss(pc, pr, beta=0.1)
    g = torch.autograd.grad(out.loss, (pc, pr))
    truth = reference.orpo_loss(pc.double(), pr.double(), beta=0.1)
    assert torch.isfinite(out.losses).all() and all(torch.isfinite(t).all() for t in g)
    assert_close_to_truth(out.losses, truth.losses, 1e-5, "losses")
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize("loss_type", reference.KTO_LOSS_TYPES)
@pytest.mark.parametrize("sizes", [(3, 4), (0, 5), (5, 0)])
@pytest.mark.parametrize("kl_source", ["none", "logps", "given"])
def test_kto_matches_reference(loss_type, sizes, kl_source):
    nc, nr = sizes
    pc, rc = logps(nc, seed=1), logps(nc, seed=2)
    pr, rr = logps(nr, seed=3), logps(nr, seed=4)
    kl_kw = {}
    if kl_source == "logps":
        pk, rk = logps(6, seed=5, low=-30, high=-20), logps(6, seed=6, low=-35, high=-25)
        kl_kw = dict(policy_kl_logps=pk, ref_kl_logps=rk)
    elif kl_source == "given":
        kl_kw = dict(kl=torch.tensor(0.4, dtype=torch.float64, device=DEVICE))
    kw = dict(beta=0.3, desirable_weight=1.5, undesirable_weight=0.7, loss_type=loss_type, **kl_kw)
    ours = ops.kto_loss(pc, pr, rc, rr, **kw)
    truth = reference.kto_loss(pc, pr, rc, rr, **kw)
    for f in ("loss", "losses", "chosen_rewards", "rejected_rewards", "kl"):
        assert_close_to_truth(getattr(ours, f), getattr(truth, f), 1e-12, f)
    inputs = [t for t in (pc, pr, rc, rr) if t.numel()]
    for a, b in zip(torch.autograd.grad(ours.loss, inputs), torch.autograd.grad(truth.loss, inputs)):
        assert_close_to_truth(a, b, 1e-12, "grad")
    if kl_source == "logps":  # z0 = clamp(mean(pi_KL - ref_KL), min=0), detached
        assert_close_to_truth(ours.kl, (pk - rk).mean().clamp(min=0), 1e-14, "kl")
        assert not ours.kl.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_give_fp32_outputs(dtype):
    pc, pr, rc, rr = batch(5, dtype=dtype)
    out = ops.dpo_loss(pc, pr, rc, rr)
    assert out.loss.dtype == torch.float32 and out.losses.dtype == torch.float32
    truth = reference.dpo_loss(*(t.double() for t in (pc, pr, rc, rr)))
    assert_close_to_truth(out.losses, truth.losses, 1e-5, "losses")


def test_errors_are_clear():
    pc, pr, rc, rr = batch(4)
    short = logps(3, seed=9)
    with pytest.raises(ValueError, match="policy_rejected_logps has 3 .* policy_chosen_logps has 4"):
        ops.dpo_loss(pc, short, rc, rr)
    with pytest.raises(ValueError, match="ref_rejected_logps has 3"):
        ops.dpo_loss(pc, pr, rc, short)
    with pytest.raises(ValueError, match="policy_rejected_logps has 3"):
        ops.cpo_loss(pc, short)
    with pytest.raises(ValueError, match="ipo.*chosen_lengths"):
        ops.dpo_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_lengths has shape"):
        ops.dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=torch.ones(3, device=DEVICE),
                     rejected_lengths=torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'.*sigmoid, ipo, hinge, robust, exo_pair, bco_pair"):
        ops.dpo_loss(pc, pr, rc, rr, loss_type="dpo")
    with pytest.raises(ValueError, match="unknown loss_type 'orpo'.*sigmoid, hinge, ipo, simpo"):
        ops.cpo_loss(pc, pr, loss_type="orpo")
    with pytest.raises(ValueError, match="unknown loss_type .*kto, apo_zero_unpaired"):
        ops.kto_loss(pc, pr, rc, rr, loss_type="sigmoid")
    with pytest.raises(ValueError, match="1-D"):
        ops.dpo_loss(pc.view(2, 2), pr.view(2, 2), rc.view(2, 2), rr.view(2, 2))
    with pytest.raises(ValueError, match="empty"):
        ops.dpo_loss(*(logps(0, seed=s) for s in range(4)))
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        ops.dpo_loss(torch.zeros(4, dtype=torch.long, device=DEVICE), pr, rc, rr)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        ops.dpo_loss(pc, pr, None, None)
    with pytest.raises(ValueError, match="robust.*label_smoothing"):
        ops.dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        ops.dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="gamma"):
        ops.simpo_loss(pc, pr, gamma=1.0, gamma_beta_ratio=0.5)
    with pytest.raises(ValueError, match="ref_chosen_logps has 3 .* policy_chosen_logps has 4"):
        ops.kto_loss(pc, pr, short, rr)
    with pytest.raises(ValueError, match="policy_kl_logps and ref_kl_logps"):
        ops.kto_loss(pc, pr, rc, rr, policy_kl_logps=pc)
    with pytest.raises(ValueError, match="nll_loss must be a scalar"):
        ops.cpo_loss(pc, pr, nll_loss=pc)

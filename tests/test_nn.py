"""nn.Module wrappers: same numbers as the functions, options checked at construction."""

import pytest
import torch

import ptkernels as ptk
from tests.helpers import assert_close_to_truth, labels_with_mask, rand


def test_linear_cross_entropy_module():
    loss_fn = ptk.nn.LinearCrossEntropyLoss(reduction="sum", label_smoothing=0.1)
    hidden, weight = rand(9, 5), rand(31, 5)
    labels = labels_with_mask((9,), 31)
    truth = ptk.reference.linear_cross_entropy(hidden, weight, labels, reduction="sum", label_smoothing=0.1)
    assert_close_to_truth(loss_fn(hidden, weight, labels), truth, 1e-10, "loss")
    with pytest.raises(ValueError, match="reduction"):
        ptk.nn.LinearCrossEntropyLoss(reduction="avg")
    with pytest.raises(TypeError, match="unknown option"):
        ptk.nn.LinearCrossEntropyLoss(smoothing=0.1)
    assert "label_smoothing=0.1" in repr(loss_fn)


def test_grpo_module_matches_function():
    b, t = 4, 6
    logps, old = rand(b, t, requires_grad=False), rand(b, t, requires_grad=False)
    adv = torch.randn(b, dtype=torch.float64, device=logps.device)
    mask = torch.ones(b, t, device=logps.device)
    out = ptk.nn.GRPOLoss(loss_type="grpo", beta=0.0)(logps, old, adv, mask)
    ref = ptk.grpo_loss(logps, old, adv, mask, loss_type="grpo", beta=0.0)
    assert torch.equal(out.loss, ref.loss)


def test_jsd_module_matches_function():
    h, w, hr, wr = rand(7, 4), rand(13, 4), rand(7, 4), rand(13, 4)
    a = ptk.nn.LinearJSDLoss(beta=0.3)(h, w, hr, wr)
    assert_close_to_truth(a, ptk.linear_jsd(h, w, hr, wr, beta=0.3), 1e-12, "jsd")


def test_dpo_module_and_fused_preference_module():
    pc, pr, rc, rr = (rand(5, requires_grad=False) for _ in range(4))
    out = ptk.nn.DPOLoss(beta=0.2, loss_type="hinge")(pc, pr, rc, rr)
    ref = ptk.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="hinge")
    assert torch.equal(out.loss, ref.loss)
    hidden, weight = rand(4, 6, 5), rand(23, 5)
    labels = labels_with_mask((4, 6), 23, ignore_every=4)
    fused = ptk.nn.FusedLinearPreferenceLoss(beta=0.1, loss_type="simpo")(hidden, weight, labels)
    direct = ptk.fused_linear_preference_loss(hidden, weight, labels, beta=0.1, loss_type="simpo")
    assert_close_to_truth(fused.loss, direct.loss, 1e-12, "loss")

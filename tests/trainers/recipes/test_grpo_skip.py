"""GRPO's --skip-zero-advantage: rows whose advantage is exactly 0 are left out of the training forward, and the
step's loss and every parameter gradient are the same as with them (float64, a tiny random Llama, a real rollout
accumulated over micro-batches as the training loop does)."""

import pytest
import torch

from ptkernels.trainers.data.rows import Row
from ptkernels.trainers.engine.config import GRPOConfig
from ptkernels.trainers.engine.distributed import DistInfo
from ptkernels.trainers.recipes.grpo import GRPOLoss, GRPORollouts
from ptkernels.trainers.rollout.onpolicy import split_parts

from ..conftest import tiny_model

GROUPS, SIZE = 5, 4


def uneven_reward(text: str, row: Row) -> tuple[float, dict]:
    """Rows 0, 2, 4: the same reward for every completion (a group with zero advantages); the others: one that
    depends on the sampled text, so the group's rewards differ."""
    r = 1.0 if row.data["k"] % 2 == 0 else float(len(text) % 3)
    return r, {"test": r}


def rollout(model, tok, loss_type: str, skip: bool, share: bool = False):
    cfg = GRPOConfig(num_generations=SIZE, prompts_per_step=GROUPS, batch_size=6, max_new_tokens=6,
                     loss_type=loss_type, skip_zero_advantage=skip, share_prompt=share, backend="reference", seed=3)
    rows = [Row({"prompt": f"item {k} is", "k": k}, f"x:{k}") for k in range(GROUPS)]
    prompts = [tok(r.data["prompt"])["input_ids"] for r in rows]
    source = GRPORollouts(rows, prompts, model, tok, cfg, DistInfo(), reward=uneven_reward)
    source.order.indices = lambda start, n: list(range(n))  # the prompts in order, so row k is group k
    return cfg, *source.make_rollout(0)


def step(model, cfg, batches):
    """The loss and the gradients of one optimizer step over ``batches``, as loop.train accumulates them."""
    module = GRPOLoss(model, cfg)
    norm = sum(module.count(b) for b in batches)
    model.zero_grad()
    total, sums = 0.0, {}
    for b in batches:
        loss, metrics = module(b, norm)
        loss.backward()
        total += loss.detach()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads, norm, {k: v / norm for k, v in sums.items()}


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model()
    return model.double(), tok


# With --share-prompt the gradients agree only to float32 rounding (Llama's RMSNorm computes in float32 even in a
# float64 model, and the micro-batches group a prompt's rows differently): rollout/test_shared_prompt.py says more.
@pytest.mark.parametrize("loss_type,share,rtol", [("dapo", False, 1e-9), ("grpo", False, 1e-9),
                                                  ("dr_grpo", False, 1e-9), ("dapo", True, 1e-6)])
def test_skipping_zero_advantage_rows_keeps_loss_and_gradients(model_tok, loss_type, share, rtol):
    model, tok = model_tok
    cfg_all, all_rows, metrics_all = rollout(model, tok, loss_type, skip=False, share=share)
    cfg_skip, kept, metrics_skip = rollout(model, tok, loss_type, skip=True, share=share)
    n = sum(b["input_ids"].shape[0] for b in all_rows)
    assert n == GROUPS * SIZE and metrics_all["trained_rows"] == 1.0
    advantages = torch.cat([b["advantages"] for b in all_rows])
    assert (advantages.view(GROUPS, SIZE)[0::2] == 0).all()  # groups 0, 2 and 4
    nonzero = int((advantages != 0).sum())
    assert SIZE <= nonzero <= 2 * SIZE
    assert sum(b["input_ids"].shape[0] for b in kept) == nonzero
    assert metrics_skip["trained_rows"] == pytest.approx(nonzero / n)
    assert all((b["advantages"] != 0).all() for b in kept)
    assert len(kept) == len(all_rows) == -(-n // 6)  # every process keeps its number of micro-batches
    loss_a, grads_a, norm_a, means_a = step(model, cfg_all, all_rows)
    loss_b, grads_b, norm_b, means_b = step(model, cfg_skip, kept)
    assert norm_b == pytest.approx(norm_a, rel=1e-12)  # the left-out rows still count
    assert max(g.abs().max() for g in grads_a.values()) > 1e-6  # (the on-policy loss itself can be 0)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-9 if share else 1e-12, rtol=1e-10)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_a[name].abs().max().item()
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=rtol * scale + 1e-15, rtol=0, msg=name)
    # metrics are means over the trained rows' items (the loop divides by the count with the left-out rows)
    unscaled = [{k: v for k, v in b.items() if k != "item_scale"} for b in kept]
    _, _, _, means_trained = step(model, cfg_skip, unscaled)
    for k in ("entropy", "clip_ratio"):
        torch.testing.assert_close(means_b[k], means_trained[k], atol=1e-12, rtol=1e-10)


def test_a_positive_beta_trains_every_row(model_tok):
    model, tok = model_tok
    cfg = GRPOConfig(skip_zero_advantage=True, beta=0.04)
    source = GRPORollouts.__new__(GRPORollouts)
    source.cfg = cfg
    advantages = torch.tensor([0.0, 0.0, 1.0, -1.0])
    assert source.rows_with_gradient(advantages, parts=1) == [0, 1, 2, 3]  # the KL term has a gradient there
    source.cfg = GRPOConfig(skip_zero_advantage=True, beta=0.0)
    assert source.rows_with_gradient(advantages, parts=1) == [2, 3]
    assert source.rows_with_gradient(torch.zeros(4), parts=2) == [0, 1]  # one row for each micro-batch


def test_split_parts_cuts_nearly_equal_consecutive_parts():
    batch = {"input_ids": torch.arange(7)[:, None], "x": torch.arange(7)}
    parts = split_parts(batch, 3)
    assert [p["x"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5, 6]]

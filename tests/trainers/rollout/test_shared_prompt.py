"""GRPO with each distinct prompt run once (``shared_prompt``): the same per-token positions, loss and gradients as
the whole prompt + completion rows, in float64 on a tiny random Llama; old / reference log-probs land on the same
tokens."""

import sys

import pytest
import torch

from ptkernels.trainers.engine.config import GRPOConfig
from ptkernels.trainers.recipes.grpo import GRPOLoss
from ptkernels.trainers.rollout.scoring import completion_batch, sequence_token_logps
from ptkernels.trainers.rollout.shared_prompt import completion_hidden_states

from ..conftest import tiny_model

# Prompts of three lengths in uneven, interleaved groups; completions of different lengths (one of a single token).
PROMPTS = [[5, 9, 13, 2], [7, 3], [11, 12, 14, 15, 16, 17]]
ROWS = [(0, [20, 21, 22]), (0, [23]), (1, [24, 25, 26, 27, 28]), (0, [29, 30]), (2, [31, 32, 33]),
        (1, [34, 35]), (2, [36, 37, 38, 39, 40, 41]), (1, [42])]


def grpo_batch(pad_id: int) -> dict:
    prompts = [PROMPTS[p] for p, _ in ROWS]
    batch = completion_batch(prompts, [c for _, c in ROWS], pad_id)
    batch["prompt_lengths"] = torch.tensor([len(p) for p in prompts])
    batch["advantages"] = torch.linspace(-1.0, 1.5, len(ROWS), dtype=torch.float64)
    return batch


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model()
    return model.double().eval(), tok


def test_view_holds_each_completion_token_at_its_full_row_column(model_tok):
    model, tok = model_tok
    batch = grpo_batch(tok.pad_token_id)
    view = completion_hidden_states(model, batch)
    full = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    for r, (_, completion) in enumerate(ROWS):
        n = len(completion)
        assert view.targets[r, :n].tolist() == completion and view.mask[r].sum() == n
        cols = view.columns[r, :n]
        assert batch["completion_mask"][r, cols].eq(1).all()  # these are the row's completion positions
        assert torch.equal(batch["input_ids"][r, cols + 1], view.targets[r, :n])
        torch.testing.assert_close(view.hidden[r, :n], full[r, cols], atol=1e-10, rtol=0)
    old = torch.randn_like(batch["completion_mask"], dtype=torch.float64) * batch["completion_mask"]
    torch.testing.assert_close(view.gather(old).sum(1), old.sum(1), atol=1e-12, rtol=0)


def losses_and_grads(model, batch, **options):
    """(loss, metrics, grads) of GRPOLoss on ``batch`` with whole rows, then with shared prompts."""
    results = []
    for share in (False, True):
        cfg = GRPOConfig(share_prompt=share, backend="reference", **options)
        model.zero_grad()
        module = GRPOLoss(model, cfg)
        loss, metrics = module(batch, norm=module.count(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads))
    return results


@pytest.mark.parametrize("loss_type,extra", [("dapo", {}), ("grpo", {"beta": 0.05}),
                                             ("bnpo", {"importance_sampling_level": "sequence"})])
def test_loss_and_gradients_equal_whole_rows(model_tok, loss_type, extra):
    model, tok = model_tok
    batch = grpo_batch(tok.pad_token_id)
    logps = sequence_token_logps(model, batch, backend="reference").double()
    batch["old_logps"] = logps + 0.1 * batch["completion_mask"]  # a ratio away from 1, so the clip acts
    if extra.get("beta"):
        batch["ref_logps"] = logps - 0.2 * batch["completion_mask"]
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = losses_and_grads(
        model, batch, loss_type=loss_type, num_iterations=2, **extra)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-12, rtol=1e-10)
    for k in metrics_a:
        torch.testing.assert_close(metrics_b[k], metrics_a[k], atol=1e-12, rtol=1e-10)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(model.parameters()))
    # Llama's RMSNorm computes in float32 even in a float64 model: a group's gradient reaches its shared prompt
    # summed before that float32 step instead of after it, so the two agree to float32 rounding here (and to
    # float64 rounding when no prompt repeats: the next test).
    for name in grads_a:
        scale = grads_a[name].abs().max()
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=2e-6 * scale, rtol=0, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads_a.items() if "layers.0.self_attn" in n)


def test_distinct_prompts_of_different_lengths_agree_to_float64_rounding(model_tok, monkeypatch):
    model, tok = model_tok
    monkeypatch.setattr(sys.modules[__name__], "ROWS", [(0, [20, 21, 22]), (1, [24, 25, 26, 27, 28]), (2, [31])])
    batch = grpo_batch(tok.pad_token_id)
    (loss_a, _, grads_a), (loss_b, _, grads_b) = losses_and_grads(model, batch)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-13, rtol=1e-12)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-12, rtol=1e-10, msg=name)

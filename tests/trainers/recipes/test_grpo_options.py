"""ptk grpo's TRL 1.16 options (loss types, --entropy-coef, --advantage-estimator, --mask-truncated-completions,
--reward-weights / --multi-objective-aggregation): one rollout and one accumulated optimizer step on a tiny
float64 Llama, as the training loop runs them."""

import pytest
import torch

from ptkernels.trainers.data.rows import Row
from ptkernels.trainers.engine.config import GRPOConfig
from ptkernels.trainers.recipes.grpo import make_rewards, outcome_advantages

from ..conftest import tiny_model
from .test_grpo_skip import GROUPS, SIZE, rollout, step


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_model()
    return model.double(), tok


def _rollout(model, tok, **options):
    cfg, batches, metrics = rollout(model, tok, options.pop("loss_type", "dapo"), skip=False)
    for k, v in options.items():
        setattr(cfg, k, v)
    return cfg, batches


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "sapo", "luspo", "vespo", "gmpo"])
def test_entropy_bonus_is_the_steps_token_mean(model_tok, loss_type):
    """Over the micro-batches of a step the bonus adds -coef x the entropy the step logs (TRL 1.16: a token mean,
    whatever the loss type's normalizer); every new loss type trains (finite loss, non-zero gradients). GMPO has
    no entropy bonus in TRL 1.16: the option is refused before training."""
    model, tok = model_tok
    cfg, batches = _rollout(model, tok, loss_type=loss_type)
    loss0, grads0, _, means = step(model, cfg, batches)
    assert torch.isfinite(loss0) and max(g.abs().max() for g in grads0.values()) > 0
    if loss_type == "gmpo":
        from ptkernels.trainers.engine.validate import ConfigError, validate_config

        for option, value in (("entropy_coef", 0.05), ("off_policy_mask_threshold", 0.5)):
            with pytest.raises(ConfigError, match=f"{option.replace('_', '.')}.*gmpo has no"):
                validate_config(GRPOConfig(**{"loss_type": "gmpo", option: value}))
        return
    cfg.entropy_coef = 0.05
    loss1, _, _, _ = step(model, cfg, batches)
    torch.testing.assert_close(loss1 - loss0, -0.05 * means["entropy"], atol=1e-10, rtol=1e-8)


def test_mask_truncated_completions_leaves_them_out(model_tok):
    model, tok = model_tok
    cfg, batches = _rollout(model, tok)
    for b in batches:  # pretend the first row of every micro-batch was truncated
        b["trained"] = torch.ones(b["input_ids"].shape[0], dtype=torch.float64)
        b["trained"][0] = 0.0
    cfg.mask_truncated_completions = True
    loss_a, _, norm_a, _ = step(model, cfg, batches)
    kept = [{k: v[1:] for k, v in b.items() if k != "trained"} for b in batches]
    loss_b, _, norm_b, _ = step(model, cfg, kept)
    assert norm_a == pytest.approx(norm_b)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-9, rtol=1e-9)


def test_advantage_estimators_and_reward_weights():
    cfg = GRPOConfig(num_generations=4)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 0.0, 1.0])
    lengths = [3, 5, 1, 2, 4, 4, 0, 6]
    g = r.view(2, 4)
    want = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)
    torch.testing.assert_close(outcome_advantages(cfg, r, lengths, None), want, atol=1e-6, rtol=0)
    cfg.advantage_estimator = "rloo"
    want = (g - (g.sum(1, keepdim=True) - g) / 3).reshape(-1)  # the mean of the 3 siblings
    torch.testing.assert_close(outcome_advantages(cfg, r, lengths, None), want, atol=1e-6, rtol=0)
    cfg.advantage_estimator = "reinforce_plus_plus"
    adv = outcome_advantages(cfg, r, lengths, None)
    assert adv[6] == 0 and adv[4] == adv[5] > adv[0] > adv[1]  # empty completion: 0; token-weighted whitening
    rows = [Row({"prompt": "1+1?", "answer": "2"}, "d.jsonl:1")]
    cfg.verifier, cfg.reward_weights = "math,format", "1,0.5"  # the parts of --verifier as weighted functions
    funcs = make_rewards(cfg, rows)
    assert funcs.names() == ["math", "format"] and funcs.weights == [1.0, 0.5]
    cfg.verifier = "math"
    with pytest.raises(ValueError, match="2 weights for 1 reward functions"):
        make_rewards(cfg, rows)
    cfg.verifier, cfg.reward_weights = "math,format", "1,x"
    with pytest.raises(ValueError, match="--reward-weights"):
        make_rewards(cfg, rows)
    cfg.verifier, cfg.reward_weights = "math:0.8,format:0.2", "1,1"
    with pytest.raises(ValueError, match="has its own weights"):
        make_rewards(cfg, rows)
    assert GROUPS * SIZE == 20


def test_remax_baseline_is_the_greedy_completions_reward(model_tok):
    """--advantage-estimator remax (verl's compute_remax_outcome_advantage): A = r - b, b the reward of one greedy
    completion of the same prompt (repeated over its group), no whitening; the greedy generation is one per prompt."""
    from ptkernels.trainers.engine.distributed import DistInfo
    from ptkernels.trainers.recipes.grpo import GRPORollouts

    from .test_grpo_skip import uneven_reward

    model, tok = model_tok
    cfg = GRPOConfig(num_generations=SIZE, prompts_per_step=GROUPS, batch_size=6, max_new_tokens=6,
                     advantage_estimator="remax", skip_zero_advantage=False, backend="reference", seed=3)
    rows = [Row({"prompt": f"item {k} is", "k": k}, f"x:{k}") for k in range(GROUPS)]
    prompts = [tok(r.data["prompt"])["input_ids"] for r in rows]
    source = GRPORollouts(rows, prompts, model, tok, cfg, DistInfo(), reward=uneven_reward)
    source.order.indices = lambda start, n: list(range(n))
    calls = []
    generate = source.engine.generate
    source.engine.generate = lambda p, s, seed: calls.append((len(p), s.do_sample)) or generate(p, s, seed=seed)
    batches, metrics = source.make_rollout(0)
    assert calls == [(GROUPS * SIZE, True), (GROUPS, False)]  # the group's samples, then one greedy per prompt
    greedy = source.greedy_baseline([rows[k] for k in range(GROUPS) for _ in range(SIZE)],
                                    [prompts[k] for k in range(GROUPS) for _ in range(SIZE)])
    assert metrics["greedy_reward"] == pytest.approx(float(greedy[::SIZE].mean()))
    adv = torch.cat([b["advantages"] for b in batches])
    assert adv.shape == (GROUPS * SIZE,)
    # each group's advantages are its rewards minus one shared baseline: equal spreads within the group
    lengths = [3] * SIZE
    r = torch.arange(SIZE, dtype=torch.float32)
    b = torch.full((SIZE,), 0.5)
    cfg.num_generations = SIZE
    torch.testing.assert_close(outcome_advantages(cfg, r, lengths, None, b), r - 0.5)
    with pytest.raises(ValueError, match="remax needs"):
        outcome_advantages(cfg, r, lengths, None)


@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_cov_loss_types_train(model_tok, tmp_path, loss_type):
    """verl's Clip-Cov / KL-Cov: `ptk grpo --loss-type clip_cov|kl_cov` with its options parses (and a bad ratio
    is refused), and a step trains: finite loss, non-zero gradients."""
    from ptkernels.trainers.engine.config import parse_config

    flags = ["--loss-type", loss_type, "--clip-cov-ratio", "0.1", "--clip-cov-lb", "-1000", "--clip-cov-ub", "1000",
             "--kl-cov-ratio", "0.1", "--kl-cov-coef", "0.5", "--model", "tiny", "--data", "rows.jsonl", "--output-dir",
             str(tmp_path / "out")]
    parsed = parse_config(GRPOConfig, flags, prog="ptk grpo", check_output_dir=False)
    assert (parsed.loss_type, parsed.clip_cov_ratio, parsed.kl_cov_coef) == (loss_type, 0.1, 0.5)
    with pytest.raises(ValueError, match="--kl-cov-ratio"):
        parse_config(GRPOConfig, [*flags, "--kl-cov-ratio", "2"], prog="ptk grpo", check_output_dir=False)
    model, tok = model_tok
    cfg, batches = _rollout(model, tok, loss_type=loss_type, **{k: getattr(parsed, k) for k in (
        "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "kl_cov_coef")})
    loss, grads, _, _ = step(model, cfg, batches)
    assert torch.isfinite(loss) and max(g.abs().max() for g in grads.values()) > 0

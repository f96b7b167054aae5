"""``ptk eval --data FILE``: a model on any prompt / gold-answer data, scored by any verifier or reward function.

Each prompt gets ``--num-samples`` completions (k): greedy when k = 1, else sampled at ``--temperature``. The
reward is ``--reward-funcs`` (TRL's signature, with ``--reward-weights``) or ``--verifier`` (``auto``: what the
data supports, as in ``ptk grpo``); every row is checked for the fields its rewards read before any model loads.

    n_prompts, n_completions
    reward              mean reward over the scorable completions; ``reward_<name>`` per function
    unscorable          completions that no reward function could score (all returned None)
    accuracy            completions whose reward is >= 1 (a verifier's "right"), over the scorable ones
    pass@1, pass@k      unbiased estimates (Chen et al. 2021) from the k samples: pass@1 = mean of c / k, pass@k =
                        prompts with at least one right completion
    mean_length         completion tokens (eos included when generated)
    format_rate         completions the ``format`` verifier accepts (a final-answer line)
    kl_to_ref           with ``--ref-model``: mean over completions of sum_t log p_model - log p_ref (a Monte Carlo
                        estimate of KL(model || ref) when the completions are sampled, k > 1 or --temperature
                        with --sample; biased toward the mode with greedy ones)
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..data.rows import EVAL_SPLITS, load_rows, validate_rows
from ..data.tokenization import encode_prompt
from ..rewards.reward_funcs import RewardFuncs, auto_verifier, check_rows
from ..rewards.verifiers import format as format_verifier
from ..rollout.engines import generate
from ..rollout.sampling import SamplingConfig, eval_mode
from ..rollout.scoring import completion_batch, sequence_token_logps

__all__ = ["evaluate_data", "load_eval_data", "make_eval_rewards", "training_evaluator"]


def make_eval_rewards(rows, verifier: str = "auto", reward_funcs: str = "", reward_weights: str = "",
                      trust_remote_code: bool = False) -> RewardFuncs:
    if reward_funcs:
        rewards = RewardFuncs(reward_funcs, reward_weights, trust_remote_code=trust_remote_code)
    else:
        rewards = RewardFuncs.from_verifier(auto_verifier(rows) if verifier == "auto" else verifier)
    check_rows(rows, rewards)
    return rewards


def load_eval_data(path: str):
    rows = load_rows(path, splits=EVAL_SPLITS)  # a DatasetDict's held-out split, never its training one
    validate_rows(rows, ("prompt_only", "prompt_completion"))
    return rows


def _pass_at(c: int, n: int, k: int) -> float:
    """Chen et al.'s unbiased pass@k from n samples of which c are right."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def evaluate_data(model, tokenizer, rows, rewards: RewardFuncs, *, num_samples: int = 1, temperature: float = 1.0,
                  max_new_tokens: int = 64, max_prompt_length: int = 256, batch_size: int = 32, seed: int = 0,
                  ref_model=None, backend: str = "auto", engine=None) -> dict:
    """The metrics of the module docstring; the model's train/eval mode is restored after (a trainer may call it).
    ``engine``: what samples the completions (a ``RolloutEngine``, e.g. vLLM's holding the model's weights; default
    the built-in one on ``model``)."""
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    k = num_samples
    prompts = [encode_prompt(r, tokenizer, max_prompt_length=max_prompt_length) for r in rows]
    expanded = [p for p in prompts for _ in range(k)]
    expanded_rows = [r for r in rows for _ in range(k)]
    sampling = SamplingConfig(do_sample=k > 1, temperature=temperature, max_new_tokens=max_new_tokens,
                              batch_size=batch_size)
    with contextlib.ExitStack() as modes:
        for m in (model, ref_model):
            if m is not None:
                modes.enter_context(eval_mode(m))
        if engine is not None:
            out = engine.generate(expanded, sampling, seed=seed)
        else:
            out = generate(model, tokenizer, expanded, sampling, seed=seed)
        texts = [tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                 for ids in out.completion_ids]
        scored = rewards.score(expanded_rows, texts, out.completion_ids)
        m: dict = {"n_prompts": len(rows), "n_completions": len(texts)}
        values = [r for r, _ in scored if r is not None]
        m["reward"] = sum(values) / len(values) if values else None
        for name in sorted({n for _, parts in scored for n in parts}):
            got = [parts[name] for _, parts in scored if name in parts]
            m[f"reward_{name}"] = sum(got) / len(got)
        m["unscorable"] = 1 - len(values) / len(scored)
        right = [r is not None and r >= 1.0 for r, _ in scored]
        m["accuracy"] = sum(r >= 1.0 for r in values) / len(values) if values else None
        per_prompt = [sum(right[i * k:(i + 1) * k]) for i in range(len(rows))]
        m["pass@1"] = sum(_pass_at(c, k, 1) for c in per_prompt) / len(rows)
        if k > 1:
            m[f"pass@{k}"] = sum(_pass_at(c, k, k) for c in per_prompt) / len(rows)
        m["mean_length"] = sum(len(c) for c in out.completion_ids) / len(texts)
        m["format_rate"] = sum(format_verifier(t, {}) for t in texts) / len(texts)
        if ref_model is not None:
            pad = tokenizer.pad_token_id
            total = 0.0
            for i in range(0, len(expanded), batch_size):
                batch = completion_batch(expanded[i:i + batch_size], out.completion_ids[i:i + batch_size], pad)
                batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
                mine = sequence_token_logps(model, batch, backend=backend).float()
                theirs = sequence_token_logps(ref_model, batch, backend=backend).float()
                total += float(((mine - theirs) * batch["completion_mask"]).sum())
            m["kl_to_ref"] = total / len(texts)
    return m


def training_evaluator(cfg, rewards: RewardFuncs, model, tokenizer, info):
    """For ``engine.loop.train(evaluate=...)``: ``--eval-data`` (read and checked against ``rewards`` now, before
    any training) evaluated greedily with the run's rewards on the main process; None without ``--eval-data``."""
    if not cfg.eval_data:
        return None
    if cfg.eval_steps < 0:
        raise ValueError(f"--eval-steps must be >= 0, got {cfg.eval_steps}")
    rows = load_eval_data(cfg.eval_data)
    check_rows(rows, rewards)

    def evaluate() -> dict:
        if not info.is_main:
            return {}
        return evaluate_data(model, tokenizer, rows, rewards, max_new_tokens=cfg.max_new_tokens,
                             max_prompt_length=cfg.max_prompt_length, batch_size=cfg.generation_batch_size,
                             seed=cfg.seed, backend=cfg.backend)

    return evaluate

"""``ptk ppo``: InstructGPT-style RLHF with PPO (TRL's PPOTrainer).

Models: the policy (``--model``, trained), a frozen reference (``--ref-model``, default the initial policy), the
reward model from ``ptk reward`` (``--reward-model``, frozen) and a critic initialized from it (trained; saved in
``output_dir/value_model``). Each rollout, per process:
    1. sample one completion for each of ``--prompts-per-step`` prompts from the policy;
    2. score = the weighted ``--reward-funcs`` (TRL's signature; a completion none can score is left out of the
       loss), or else the reward model at the last token of prompt + completion rendered as ``ptk reward`` trained it (a
       conversational completion that ended with eos gets the chat template's end-of-turn suffix), minus
       ``--missing-eos-penalty`` when the completion has no eos;
    3. per-token reward = -kl_coef * KL_t (k1 = logp - ref, or k3) plus the score at the last completion token;
    4. GAE (``ptkernels.gae``) on the critic's values, advantages whitened (``ptkernels.masked_whiten``);
    5. ``--ppo-epochs`` passes over the rollout, ``--num-minibatches`` optimizer steps each, of the clipped policy
       loss plus ``--vf-coef`` times the clipped value loss.
Log-probs (old, reference and the policy's own in the loss) all come from hidden states through ptkernels: no
``[tokens, vocab]`` logits anywhere.
"""

from __future__ import annotations

import torch

import ptkernels as ptk

from ..data.rows import load_data
from ..data.tokenization import encode_prompt, end_of_turn_suffix
from ..engine.config import PPOConfig, parse_config
from ..engine.distributed import init_distributed, shutdown
from ..engine.loop import TrainResult, train
from ..lora import is_adapted, load_policy
from ..modeling import (
    TrainingModule,
    head_inputs,
    hidden_states,
    load_reference,
    load_sequence_classifier,
    reference_scope,
)
from ..rewards.reward_funcs import RewardFuncs, check_rows
from ..rollout.mismatch import correction_kwargs, mismatch_metrics, sampler_logps_rows
from ..rollout.onpolicy import OnPolicySource, build_rollout_engine, check_rollout_options, split_rows
from ..rollout.scoring import completion_batch
from .eval_data import training_evaluator
from .grpo import logged_metrics, rollout_state


def token_values(critic, batch: dict) -> torch.Tensor:
    """The critic's value at every position that predicts a next token: ``[B, T-1]``, aligned with the log-probs."""
    critic = critic.get_base_model() if is_adapted(critic) else critic  # LoRA: the adapted model inside PEFT
    body = critic.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return critic.score(body.last_hidden_state).squeeze(-1).float()[:, :-1]


@torch.no_grad()
def sequence_scores(reward_model, batch: dict) -> torch.Tensor:
    """The reward model's score of each prompt + completion row (its last non-padding token)."""
    return reward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).logits.squeeze(-1).float()


def scored_completions(rows, completion_ids: list[list[int]], finished: list[bool],
                       suffix: list[int]) -> list[list[int]]:
    """The completions as the reward model scores them: with the chat template's end-of-turn ``suffix`` after the
    eos of a conversational row (how ``ptk reward`` encoded its pairs; a plain-text answer ends at eos there too)."""
    return [list(c) + suffix if done and isinstance(row.data["prompt"], list) else list(c)
            for row, c, done in zip(rows, completion_ids, finished)]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last 1 in ``mask`` (-1 for a row without any)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, -1).max(dim=1).values



def _whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``masked_whiten`` of this process's rollout, masked; with fewer than two tokens left (every completion here
    unscorable: a reward function that returned None for all of them) there is nothing to whiten: the values
    centred (0) or as they are, instead of an error that would stop every process."""
    if mask.sum() < 2:
        return torch.zeros_like(values) if shift_mean else values * mask
    return ptk.masked_whiten(values, mask, shift_mean=shift_mean) * mask

class PPORollouts(OnPolicySource):
    def __init__(self, *args, critic, reward_model, ref_model, engine=None, reward_funcs=None):
        super().__init__(*args, engine=engine)
        self.critic, self.reward_model, self.ref_model = critic, reward_model, ref_model
        self.reward_funcs = reward_funcs  # --reward-funcs: their weighted sum is the score instead of the model's
        self.steps_per_rollout = self.cfg.ppo_epochs * self.cfg.num_minibatches
        self.turn_suffix = end_of_turn_suffix(self.tokenizer)

    @torch.no_grad()
    def make_rollout(self, index: int):
        cfg, device = self.cfg, self.info.device
        rows, prompts, out = self.sample(index, 1)
        batch = completion_batch(prompts, out.completion_ids, self.tokenizer.pad_token_id)
        mask = batch["completion_mask"]
        old_logps = self.logps(self.policy, batch)
        with reference_scope(self.ref_model):  # with --lora the policy itself, its adapter disabled
            ref_logps = self.logps(self.ref_model, batch)
        on_device = {k: v.to(device) for k, v in batch.items()}
        was_training = self.critic.training
        self.critic.eval()
        old_values = torch.cat([token_values(self.critic, b) for b in split_rows(on_device, cfg.batch_size)]).cpu()
        self.critic.train(was_training)
        if self.reward_funcs is not None:
            # TRL-style functions; a completion none of them can score (all None) is left out of the loss
            self.reward_funcs.pop_logged()  # log_metric values from before this rollout (an evaluation's)
            scored = self.reward_funcs.score(rows, out.texts, out.completion_ids,
                                             trainer_state=rollout_state(self, index))
            scorable = torch.tensor([r is not None for r, _ in scored])
            scores = torch.tensor([0.0 if r is None else r for r, _ in scored], dtype=torch.float32)
            mask = batch["completion_mask"] = batch["completion_mask"] * scorable[:, None].to(mask.dtype)
        else:
            scored = completion_batch(prompts, scored_completions(rows, out.completion_ids, out.finished,
                                                                  self.turn_suffix), self.tokenizer.pad_token_id)
            scored = {k: v.to(device) for k, v in scored.items()}
            with reference_scope(self.reward_model):  # with --lora the critic itself, its adapter disabled
                scores = torch.cat([sequence_scores(self.reward_model, b)
                                    for b in split_rows(scored, cfg.batch_size)])
            scores = scores.cpu()
        scores = scores - cfg.missing_eos_penalty * (~torch.tensor(out.finished)).float()

        kl = ptk.kl_penalty(old_logps, ref_logps, estimator=cfg.kl_estimator) * mask
        rewards = -cfg.kl_coef * kl
        last = last_token_index(mask)
        has = last >= 0
        rewards[has.nonzero().squeeze(1), last[has]] += scores[has]
        if cfg.whiten_rewards:
            rewards = _whiten(rewards, mask, shift_mean=False)
        advantages, returns = ptk.gae(rewards, old_values * mask, mask, gamma=cfg.gamma, lam=cfg.lam)
        advantages = _whiten(advantages, mask)
        batch.update(old_logps=old_logps, old_values=old_values, advantages=advantages, returns=returns)
        sampler = sampler_logps_rows(out, list(range(len(prompts))), mask.shape[1])
        if sampler is not None:  # a vLLM rollout: the sampler's own log-probs, for the correction and the metrics
            batch["sampler_logps"] = sampler
        self.rollout = batch
        metrics = {"score": scores.mean().item(), "reward": rewards.sum(1).mean().item(),
                   "kl_sum": kl.sum(1).mean().item(), "completion_length": mask.sum(1).mean().item(),
                   "eos_rate": sum(out.finished) / len(out.finished)}
        if sampler is not None:
            metrics.update(mismatch_metrics(old_logps, sampler, mask, cfg.vllm_importance_sampling_clip_min,
                                            cfg.vllm_importance_sampling_clip_max))
        if self.reward_funcs is not None:  # the functions' log_metric values
            metrics.update(logged_metrics(self.reward_funcs, self.info, metrics))
        return self.minibatches(batch, index), metrics

    def minibatches(self, batch: dict, index: int) -> list[list[dict]]:
        """For each (epoch, minibatch) step of this rollout: its micro-batches (rows shuffled per epoch)."""
        n, cfg = batch["input_ids"].shape[0], self.cfg
        per = -(-n // cfg.num_minibatches)
        steps = []
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(hash((cfg.seed, index, epoch, self.info.rank)) & 0x7FFFFFFF)
            perm = torch.randperm(n, generator=g)
            for m in range(cfg.num_minibatches):
                rows = perm[m * per:(m + 1) * per]
                steps.append(split_rows({k: v[rows] for k, v in batch.items()}, cfg.batch_size))
        return steps

    def select(self, k: int) -> list[dict]:
        return self.batches[k]


class PPOLoss(TrainingModule):
    def __init__(self, policy, critic, cfg: PPOConfig):
        super().__init__(policy)
        self.critic = critic
        self.cfg = cfg

    def saved_models(self) -> dict[str, str]:
        return {"": "model", "value_model": "critic"}

    def count(self, batch: dict) -> float:
        return float(batch["completion_mask"].sum())

    def forward(self, batch: dict, norm: float):
        c, mask = self.cfg, batch["completion_mask"]
        hidden, weight, head = head_inputs(self.model, hidden_states(self.model, batch))
        head["temperature"] *= c.temperature
        logps, entropy = ptk.linear_token_logprobs(hidden[:, :-1], weight, batch["labels"][:, 1:], return_entropy=True,
                                                   backend=c.backend, **head)
        policy = ptk.ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip_range=c.clip_range,
                                     **correction_kwargs(c, batch.get("sampler_logps")))
        values = token_values(self.critic, batch)
        value = ptk.ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                   clip_range_value=c.clip_range_value)
        items = float(mask.sum())
        loss = (policy.loss + c.vf_coef * value.loss) * (items / norm)
        metrics = {"policy_loss": policy.loss.detach() * items, "value_loss": value.loss.detach() * items,
                   "policy_clip_frac": policy.clip_frac * items, "value_clip_frac": value.clip_frac * items,
                   "approx_kl": policy.approx_kl * items, "entropy": ptk.masked_mean(entropy.detach(), mask) * items}
        return loss, metrics


def run(cfg: PPOConfig, engine=None) -> TrainResult:
    info = init_distributed()
    try:
        if not cfg.reward_model and not cfg.reward_funcs:
            raise ValueError("ptk ppo: --reward-model is required (a folder written by ptk reward), or --reward-funcs")
        if cfg.distributed == "fsdp" and info.enabled:
            raise ValueError("ptk ppo: --distributed fsdp is not supported (generation needs whole weights); use ddp")
        check_rollout_options(cfg)
        rows, _ = load_data(cfg, ("prompt_only", "prompt_completion"), info)
        reward_funcs = None
        if cfg.reward_funcs:  # checked against every row before any model loads
            reward_funcs = RewardFuncs(cfg.reward_funcs, cfg.reward_weights, trust_remote_code=cfg.trust_remote_code,
                                       unsafe_code_sandbox=cfg.unsafe_code_sandbox)
            check_rows(rows, reward_funcs)
            reward_funcs.require_sandbox(rows)
        policy, tokenizer = load_policy(cfg)
        engine = engine or build_rollout_engine(cfg, policy, tokenizer, info)  # vLLM: built before training
        prompts = [encode_prompt(r, tokenizer, max_prompt_length=cfg.max_prompt_length) for r in rows]
        # the critic starts from the reward model, or (scores from --reward-funcs alone) from the policy's weights
        critic, rm_tokenizer = load_policy(cfg, task="SEQ_CLS", name=cfg.reward_model or cfg.model, seed=0)
        if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError("ptk ppo: the reward model's tokenizer differs from the policy's; the reward model "
                             "must score the policy's tokens (train it with ptk reward from the same model)")
        reward_model = None
        if reward_funcs is not None:
            reward_funcs.load_models(info.device)
        elif cfg.lora:  # the critic starts as the reward model: its base, adapter disabled, is the reward model
            reward_model = critic
        else:
            reward_model, _ = load_sequence_classifier(cfg.reward_model, trust_remote_code=cfg.trust_remote_code)
            reward_model = reward_model.requires_grad_(False).to(info.device).eval()
        source = PPORollouts(rows, prompts, policy, tokenizer, cfg, info, critic=critic, reward_model=reward_model,
                             ref_model=load_reference(cfg, info, policy), engine=engine, reward_funcs=reward_funcs)
        evaluate = training_evaluator(cfg, reward_funcs, policy, tokenizer, info) if reward_funcs else None
        return train(cfg, PPOLoss(policy, critic, cfg), source, tokenizer, info, stage="ppo", evaluate=evaluate,
                     eval_steps=cfg.eval_steps or cfg.max_steps)
    finally:
        shutdown(info)


def main(argv: list[str]) -> int:
    run(parse_config(PPOConfig, argv, prog="ptk ppo"))
    return 0

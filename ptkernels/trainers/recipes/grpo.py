"""``ptk grpo``: GRPO with verifiable rewards (DeepSeekMath; TRL's GRPOTrainer).

Every ``--num-iterations`` optimizer steps, each process samples ``--prompts-per-step`` prompts, generates
``--num-generations`` completions of each from the current policy (``--rollout-engine``), scores them
with the verifiers (plain functions of the completion text and the data row; code runs in a sandboxed
subprocess) and normalizes the rewards per group (``ptkernels.group_advantages``). The old-policy log-probs (when
``--num-iterations`` > 1) and the reference log-probs (when ``--beta`` > 0) come from hidden states through
ptkernels, never from generate's scores. The loss is ``ptkernels.fused_linear_grpo_loss`` on the policy's
hidden states: no ``[tokens, vocab]`` logits. With ``--beta`` 0, rows whose advantage is exactly 0 (a group of
equal rewards) are not run at all (``--skip-zero-advantage``): their loss and gradient are 0.

Data rows: ``prompt`` plus the ground truth the verifiers read (the gold answer in ``answer``, ``solution`` or
``ground_truth``, as GSM8K's ``#### n`` or MATH's ``\\boxed{}`` or plain; ``tests``, ``format_pattern``, ...) and,
with ``--verifier row``, the verifier's name in ``verifier``. ``--verifier auto`` (the default) picks what the data
supports; ``--reward-funcs`` takes TRL-style reward functions and reward models (``rewards.reward_funcs``). Every
row is checked for the fields its rewards read before any model loads. A completion that no reward function can
score (all return None) gets advantage 0.
"""

from __future__ import annotations

import dataclasses
import math

import torch

import ptkernels as ptk

from ..data.rows import Row, load_data, load_rows, validate_rows
from ..data.tokenization import encode_all, encode_prompt, encode_sft
from ..engine.config import GRPOConfig, parse_config
from ..engine.distributed import all_reduce_sum, init_distributed, shutdown
from ..engine.loop import TrainResult, steps_for_epochs, train
from ..lora import load_policy
from ..modeling import TrainingModule, head_inputs, hidden_states, load_reference, reference_scope
from ..rewards.reward_funcs import RewardFuncs, auto_verifier, check_rows, make_trainer_state
from ..rollout.kv_cache import cache_rows_selectable
from ..rollout.mismatch import correction_kwargs, mismatch_metrics, sampler_logps_rows
from ..rollout.onpolicy import (
    PTX,
    TIME_METRICS,
    OnPolicySource,
    build_rollout_engine,
    check_rollout_options,
    split_parts,
)
from ..rollout.sampling import RolloutEngine
from ..rollout.scoring import completion_batch
from ..rollout.shared_prompt import completion_hidden_states
from .eval_data import training_evaluator
from .sft import SFT_FORMATS

TOKEN_LEVEL = ("dapo", "bnpo", "cispo", "vespo", "clip_cov", "kl_cov")  # normalized by completion tokens; the
# others by sequences
ITEMS_NORMALIZED = ("dapo", "cispo", "vespo", "clip_cov", "kl_cov")  # divided by num_items_in_batch in the loss
COV_OPTIONS = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "kl_cov_coef")  # verl's, as is


def outcome_advantages(cfg: GRPOConfig, rewards: torch.Tensor, lengths: list[int], weights,
                       greedy_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """One advantage per completion from its reward ([N], or [N, parts]) with --advantage-estimator;
    ``greedy_rewards`` ([N]: the reward of the greedy completion of each completion's prompt) for remax."""
    if cfg.advantage_estimator == "grpo":
        return ptk.group_advantages(rewards, group_size=cfg.num_generations, scale=cfg.scale_rewards,
                                    reward_weights=weights, multi_objective_aggregation=cfg.multi_objective_aggregation)
    if rewards.dim() == 2:  # the other estimators take the weighted sum (TRL's nansum)
        w = weights if weights is not None else torch.ones(rewards.shape[1])
        rewards = (rewards * w).nansum(dim=1)
    rewards = rewards.nan_to_num(0.0)  # an unscorable completion: reward 0, as TRL's nansum over no function
    if cfg.advantage_estimator == "rloo":
        return ptk.rloo_advantages(rewards, group_size=cfg.num_generations)
    # REINFORCE++ / ReMax with an outcome reward on the last token and gamma 1: every token of a completion gets the
    # same advantage (REINFORCE++: the whitened return; ReMax: return - greedy baseline), so column 0 is the
    # completion's advantage (an empty completion gets 0)
    width = max(max(lengths), 1)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()
    token_rewards = torch.zeros(len(lengths), width)
    last = (torch.tensor(lengths) - 1).clamp(min=0)
    token_rewards[torch.arange(len(lengths)), last] = rewards.float() * (torch.tensor(lengths) > 0)
    if cfg.advantage_estimator == "remax":
        if greedy_rewards is None:
            raise ValueError("--advantage-estimator remax needs the greedy rollout's rewards")
        adv, _ = ptk.remax_advantages(token_rewards, mask, greedy_rewards.float().nan_to_num(0.0))
    else:
        adv, _ = ptk.reinforce_plus_plus_advantages(token_rewards, mask, gamma=1.0)
    return adv[:, 0]


def make_rewards(cfg: GRPOConfig, rows: list[Row]) -> RewardFuncs:
    """The rollout's reward: ``--reward-funcs`` when given, else ``--verifier`` (``auto``: what the data supports;
    with ``--reward-weights``, each part of ``--verifier math,format`` is one weighted function, as in TRL). Every
    row is checked for the fields the rewards read, and a code reward for its sandbox, before any model loads."""
    unsafe = cfg.unsafe_code_sandbox
    if cfg.reward_funcs:
        rewards = RewardFuncs(cfg.reward_funcs, cfg.reward_weights, trust_remote_code=cfg.trust_remote_code,
                              unsafe_code_sandbox=unsafe)
    else:
        spec = auto_verifier(rows) if cfg.verifier == "auto" else cfg.verifier
        if cfg.reward_weights:
            if ":" in spec or spec == "row":
                raise ValueError(f"--reward-weights weighs --reward-funcs or the parts of --verifier a,b; "
                                 f"--verifier {spec!r} has its own weights or none to weigh")
            rewards = RewardFuncs(spec, cfg.reward_weights, unsafe_code_sandbox=unsafe)
        else:
            rewards = RewardFuncs.from_verifier(spec, unsafe_code_sandbox=unsafe)
    check_rows(rows, rewards)
    rewards.require_sandbox(rows)
    return rewards


def reward_tensor(reward: RewardFuncs, scored) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rewards ``group_advantages`` takes, NaN where unscorable: ``[N]``, or with several reward functions the
    ``[N, functions]`` matrix and their weights (TRL: --multi-objective-aggregation acts on it). Column k is
    function k's rewards (``Scored.per_func``, by position: two functions of one name are two columns)."""
    names = reward.names() if hasattr(reward, "names") else []
    if len(names) <= 1:
        return torch.tensor([float("nan") if r is None else r for r, _ in scored], dtype=torch.float32), None
    nan = float("nan")
    matrix = [[nan if v is None else v for v in s.per_func] if hasattr(s, "per_func") else
              [s[1].get(n, nan) for n in names] for s in scored]
    return torch.tensor(matrix, dtype=torch.float32), torch.tensor(reward.weights, dtype=torch.float32)


def rollout_state(source: OnPolicySource, index: int):
    """TRL's ``trainer_state`` for the reward functions of rollout ``index``: ``global_step`` (the optimizer
    steps done before it), ``max_steps``, ``epoch`` (the passes over the prompts so far) and the run's step
    options."""
    cfg, info = source.cfg, source.info
    per = cfg.prompts_per_step * info.world_size * (2 if getattr(cfg, "dynamic_sampling", False) else 1)
    max_steps = steps_for_epochs(cfg, source, info) if getattr(cfg, "num_epochs", 0) > 0 else cfg.max_steps
    rows = max(len(source.rows), 1)
    return make_trainer_state(
        global_step=index * source.steps_per_rollout, max_steps=max_steps, epoch=index * per / rows,
        num_train_epochs=math.ceil(max_steps / source.steps_per_rollout * per / rows),
        logging_steps=cfg.log_steps, save_steps=cfg.save_steps, eval_steps=getattr(cfg, "eval_steps", 0),
        train_batch_size=cfg.batch_size, is_local_process_zero=info.local_rank == 0,
        is_world_process_zero=info.is_main)


# the names of a logged row that are not a rollout's: the loop's, the losses' (GRPO's, PPO's) and the timings
STEP_METRICS = ("step", "loss", "lr", "grad_norm", "items", "step_s", "tokens_per_s", "kl", "clip_ratio",
                "entropy", "ptx_nll", "policy_loss", "value_loss", "policy_clip_frac", "value_clip_frac", "approx_kl",
                *TIME_METRICS)


def names_on_every_process(names, info) -> list[str]:
    """The sorted union of every process's ``names`` (a collective under torchrun): metric names that one process
    lacks must still get a slot in the step's one packed reduction on all of them."""
    names = sorted(names)
    if not info.enabled:
        return names
    import torch.distributed as dist

    every = [None] * info.world_size
    dist.all_gather_object(every, names)
    return sorted({n for ns in every for n in ns})


def logged_metrics(reward, info, taken) -> dict[str, float]:
    """The reward functions' ``log_metric`` values of this rollout, each name's mean over every process's values
    (TRL 1.16); a collective under torchrun. A name the row already has (``taken``, or a step metric) is an
    error: it would replace that metric."""
    logged = reward.pop_logged() if hasattr(reward, "pop_logged") else {}
    names = names_on_every_process(logged, info)
    if not names:
        return {}
    clash = [n for n in names if n in taken or n in STEP_METRICS or n.startswith("eval_")]
    if clash:
        raise ValueError(f"log_metric: a reward function logged {clash[0]!r}, the name of one of the run's own "
                         "metrics; give it another name")
    total = all_reduce_sum(torch.tensor(_sums_and_counts(logged, names), dtype=torch.float64), info).tolist()
    return _means(total, names)


def _sums_and_counts(values_by_name: dict, names: list[str]) -> list[float]:
    """``[sum, count]`` of each name's values in order (``[0, 0]`` for a name with none here), flattened: one
    slot pair per name on every process, for one reduction."""
    return [x for n in names for x in (sum(values_by_name.get(n, [])), len(values_by_name.get(n, [])))]


def _means(flat: list[float], names: list[str]) -> dict[str, float]:
    """Each name's mean from the reduced ``_sums_and_counts`` (0 where no process had a value)."""
    return {n: flat[2 * i] / max(flat[2 * i + 1], 1) for i, n in enumerate(names)}


def group_mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def reward_metrics(scored, info) -> dict[str, float]:
    """``reward``, ``accuracy``, ``reward_std``, ``unscorable`` and ``reward_<function>`` of a rollout over every
    process's completions (one collective under torchrun): the same names and values on every process, so the
    step's one reduction adds like to like. Per process, a function that scored nothing there (it returned None
    for another task's rows) would be missing from one process's metrics: the reduction would then mix up or
    fail on them. ``reward_std`` with Bessel's correction, as torch.std."""
    names = names_on_every_process({n for _, parts in scored for n in parts}, info)
    values = [r for r, _ in scored if r is not None]
    by_name = {n: [parts[n] for _, parts in scored if n in parts] for n in names}
    sums = [len(scored), len(values), sum(values), sum(v * v for v in values), sum(float(v >= 1.0) for v in values)]
    total = all_reduce_sum(torch.tensor(sums + _sums_and_counts(by_name, names), dtype=torch.float64), info).tolist()
    n_all, n, s, ss, hits = total[:5]
    return {"unscorable": 1 - n / max(n_all, 1), "reward": s / max(n, 1), "accuracy": hits / max(n, 1),
            "reward_std": math.sqrt(max(ss - s * s / n, 0.0) / (n - 1)) if n > 1 else 0.0,
            **{f"reward_{k}": v for k, v in _means(total[5:], names).items()}}


class GRPORollouts(OnPolicySource):
    def __init__(self, *args, reward: RewardFuncs, ref_model=None, engine=None):
        super().__init__(*args, engine=engine)
        self.reward, self.ref_model = reward, ref_model
        self.steps_per_rollout = self.cfg.num_iterations

    @torch.no_grad()
    def make_rollout(self, index: int):
        cfg = self.cfg
        rows, prompts, out = self.sample(index, cfg.num_generations, 2 if cfg.dynamic_sampling else 1)
        if hasattr(self.reward, "score"):  # RewardFuncs: TRL-style functions called once on the whole rollout
            self.reward.pop_logged()  # log_metric values from before this rollout (an evaluation's): not its own
            scored = self.reward.score(rows, out.texts, out.completion_ids,  # None: unscorable
                                       trainer_state=rollout_state(self, index))
        else:  # a plain (text, row) -> (reward, parts) function
            scored = [self.reward(text, row) for text, row in zip(out.texts, rows)]
        sampled = scored, [len(c) for c in out.completion_ids], out.finished  # all of them, for the metrics
        if cfg.dynamic_sampling:
            rows, prompts, out, scored = self.informative_groups(rows, prompts, out, scored)
        rewards, weights = reward_tensor(self.reward, scored)
        greedy = self.greedy_baseline(rows, prompts) if cfg.advantage_estimator == "remax" else None
        parts = -(-len(prompts) // cfg.batch_size)  # micro-batches per step: the same on every process
        lengths = [len(c) for c in out.completion_ids]
        advantages = outcome_advantages(cfg, rewards, lengths, weights, greedy)
        if cfg.mask_truncated_completions:  # out of the loss and the item count; still in the reward statistics
            lengths = [n if f else 0 for n, f in zip(lengths, out.finished)]
        keep = self.rows_with_gradient(advantages, parts)
        batch = completion_batch([prompts[i] for i in keep], [out.completion_ids[i] for i in keep],
                                 self.tokenizer.pad_token_id)
        batch["advantages"] = advantages[keep]
        batch["prompt_lengths"] = torch.tensor([len(prompts[i]) for i in keep])
        if cfg.mask_truncated_completions:
            batch["trained"] = torch.tensor([float(out.finished[i]) for i in keep])
        if len(keep) < len(prompts):  # the step's item count still counts the rows left out
            items = (lambda idx: sum(lengths[i] for i in idx)) if cfg.loss_type in TOKEN_LEVEL else len
            batch["item_scale"] = torch.full((len(keep),), items(range(len(prompts))) / max(items(keep), 1),
                                             dtype=torch.float64)
        if cfg.num_iterations > 1:  # else the ratio is 1: the current log-probs, detached, stand in
            batch["old_logps"] = self.logps(self.policy, batch)
        sampler = sampler_logps_rows(out, keep, batch["completion_mask"].shape[1])
        if sampler is not None:  # a vLLM rollout: the sampler's own log-probs, for the correction and the metrics
            batch["sampler_logps"] = sampler
            trainer = batch["old_logps"] if "old_logps" in batch else self.logps(self.policy, batch)
            mismatch = mismatch_metrics(trainer, sampler, batch["completion_mask"],
                                        cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max)
        if self.ref_model is not None:
            with reference_scope(self.ref_model):  # with --lora the policy itself, its adapter disabled
                batch["ref_logps"] = self.logps(self.ref_model, batch)
        scored, lengths, finished = sampled
        metrics = {**reward_metrics(scored, self.info),
                   "completion_length": group_mean(lengths), "eos_rate": group_mean([float(f) for f in finished])}
        if cfg.dynamic_sampling:
            metrics["informative_groups"] = self.informative
        if greedy is not None:
            metrics["greedy_reward"] = float(greedy[::cfg.num_generations].nan_to_num(0.0).mean())
        metrics["trained_rows"] = len(keep) / len(prompts)
        if sampler is not None:
            metrics.update(mismatch)
        metrics.update(logged_metrics(self.reward, self.info, metrics))
        return split_parts(batch, parts), metrics

    def greedy_baseline(self, rows, prompts) -> torch.Tensor:
        """ReMax's baseline: the reward of one greedy (do_sample=False) completion of each prompt, repeated over
        the prompt's group ([N]; NaN where unscorable, which counts as 0)."""
        g = self.cfg.num_generations
        firsts = list(range(0, len(prompts), g))
        greedy = dataclasses.replace(self.sampling, do_sample=False)
        out = self.engine.generate([prompts[i] for i in firsts], greedy, seed=0)
        group_rows = [rows[i] for i in firsts]
        if hasattr(self.reward, "score"):
            scored = self.reward.score(group_rows, out.texts, out.completion_ids)
        else:
            scored = [self.reward(text, row) for text, row in zip(out.texts, group_rows)]
        baseline = torch.tensor([float("nan") if r is None else r for r, _ in scored], dtype=torch.float32)
        return baseline.repeat_interleave(g)

    def rows_with_gradient(self, advantages: torch.Tensor, parts: int) -> list[int]:
        """The rows to train: with ``--beta`` 0 a row whose advantage is exactly 0 has a zero loss and gradient
        (the clipped ratio times 0), so with ``--skip-zero-advantage`` it is left out; at least ``parts`` rows stay
        so that every process runs its micro-batches."""
        if not self.cfg.skip_zero_advantage or self.cfg.beta != 0 or self.cfg.entropy_coef != 0:
            return list(range(len(advantages)))
        has_gradient = (advantages != 0).tolist()
        nonzero = [i for i, g in enumerate(has_gradient) if g]
        zero = [i for i, g in enumerate(has_gradient) if not g]
        return sorted(nonzero + zero[:max(parts - len(nonzero), 0)])

    def informative_groups(self, rows, prompts, out, scored):
        """``prompts_per_step`` groups out of twice as many: those whose rewards differ first (in sampling order),
        then the others, so every process keeps the same number of micro-batches."""
        g = self.cfg.num_generations
        groups = range(len(rows) // g)
        spread = [len({r for r, _ in scored[k * g:(k + 1) * g]}) > 1 for k in groups]
        keep = sorted(sorted(groups, key=lambda k: not spread[k])[:self.cfg.prompts_per_step])
        self.informative = sum(spread[k] for k in keep) / len(keep)
        take = lambda xs: [xs[k * g + j] for k in keep for j in range(g)]
        out = dataclasses.replace(out, **{f.name: take(getattr(out, f.name)) for f in dataclasses.fields(out)})
        return take(rows), take(prompts), out, take(scored)


class GRPOLoss(TrainingModule):
    def __init__(self, model, cfg: GRPOConfig):
        super().__init__(model)
        self.cfg = cfg
        self._prompt_shared: bool | None = None  # --share-prompt works on this model's cache (decided once)

    def _shares_prompt(self) -> bool:
        if self._prompt_shared is None:
            self._prompt_shared = cache_rows_selectable(self.model)
            if not self._prompt_shared:
                print(f"ptk grpo: {type(self.model).__name__}'s cache cannot repeat rows (linear-attention or "
                      "state-space layers): training on whole rows (--no-share-prompt), same loss")
        return self._prompt_shared

    def count(self, batch: dict) -> float:
        """The micro-batch's items (completion tokens, or rows), scaled up by the rows its rollout left out."""
        return self.items(batch) * (float(batch["item_scale"][0]) if "item_scale" in batch else 1.0)

    def items(self, batch: dict) -> float:
        if self.cfg.loss_type in TOKEN_LEVEL:
            if "trained" in batch:
                return float((batch["completion_mask"] * batch["trained"][:, None]).sum())
            return float(batch["completion_mask"].sum())
        return batch["input_ids"].shape[0]

    def completions(self, batch: dict):
        """(hidden, targets, mask, old_logps, ref_logps, sampler_logps): per completion token, the hidden state
        that predicts it. With --share-prompt each distinct prompt runs once for its group (``shared_prompt``),
        else whole rows."""
        if self.cfg.share_prompt and "prompt_lengths" in batch and self._shares_prompt():
            view = completion_hidden_states(self.model, batch)
            return (view.hidden, view.targets, view.mask, view.gather(batch.get("old_logps")),
                    view.gather(batch.get("ref_logps")), view.gather(batch.get("sampler_logps")))
        hidden = hidden_states(self.model, batch)[:, :-1]
        return (hidden, batch["input_ids"][:, 1:], batch["completion_mask"], batch.get("old_logps"),
                batch.get("ref_logps"), batch.get("sampler_logps"))

    def forward(self, batch: dict, norm: float):
        c = self.cfg
        hidden, targets, mask, old_logps, ref_logps, sampler_logps = self.completions(batch)
        if "trained" in batch:  # --mask-truncated-completions
            mask = mask * batch["trained"].to(mask.device, mask.dtype)[:, None]
        items = self.items(batch)
        # the items-normalized types are sums over norm already, so their (token-mean) entropy bonus is weighted
        # by the micro-batch's share of the step; the others are scaled as a whole below
        share = items / norm if c.loss_type in ITEMS_NORMALIZED else 1.0
        hidden, weight, head = head_inputs(self.model, hidden)
        if head["softcap"] is not None:
            raise ValueError("ptk grpo: models with a final-logit softcap are not supported by the fused GRPO loss")
        out = ptk.fused_linear_grpo_loss(
            hidden, weight, targets, mask, batch["advantages"], bias=head["bias"],
            old_logps=old_logps, ref_logps=ref_logps, beta=c.beta,
            epsilon_low=c.epsilon_low, epsilon_high=c.epsilon_high, loss_type=c.loss_type,
            importance_sampling_level=c.importance_sampling_level, temperature=head["temperature"] * c.temperature,
            max_completion_length=c.max_new_tokens,
            num_items_in_batch=norm if c.loss_type in ITEMS_NORMALIZED else None, return_entropy=True,
            entropy_coef=c.entropy_coef * share, top_entropy_quantile=c.top_entropy_quantile,
            off_policy_mask_threshold=c.off_policy_mask_threshold, backend=c.backend,
            **correction_kwargs(c, sampler_logps), **{k: getattr(c, k) for k in COV_OPTIONS})
        # dapo/cispo/vespo are already divided by norm; the others are means over this micro-batch: back to sums
        # over norm.
        loss = out.loss if c.loss_type in ITEMS_NORMALIZED else out.loss * (items / norm)
        # metrics: means over the trained items, as the loop divides by all of them (the scale stays a tensor: no
        # host sync on the device batch)
        weight = items * batch["item_scale"][0] if "item_scale" in batch else items
        metrics = {"kl": out.kl * weight, "clip_ratio": out.clip_ratio * weight, "entropy": out.entropy * weight}
        if PTX + "input_ids" in batch:
            ptx_nll = self.ptx_loss({k[len(PTX):]: v for k, v in batch.items() if k.startswith(PTX)})
            loss = loss + c.ptx_coef * ptx_nll
            metrics["ptx_nll"] = ptx_nll.detach() * norm  # logged per item like the others: the step's mean
        return loss, metrics

    def ptx_loss(self, batch: dict) -> torch.Tensor:
        """The mean next-token loss of the step's SFT rows (each process's mean; DDP averages them)."""
        hidden, weight, head = head_inputs(self.model, hidden_states(self.model, batch))
        return ptk.linear_cross_entropy(hidden, weight, batch["labels"], shift=True, backend=self.cfg.backend,
                                        **head)


def load_ptx_rows(cfg: GRPOConfig) -> tuple[list[Row], str | None]:
    """The --ptx-data rows, read and checked before any model is loaded (none when --ptx-coef is 0)."""
    if cfg.ptx_coef < 0:
        raise ValueError(f"--ptx-coef must be >= 0, got {cfg.ptx_coef}")
    if cfg.ptx_coef == 0:
        return [], None
    if not cfg.ptx_data:
        raise ValueError("--ptx-coef > 0 needs --ptx-data (the SFT rows whose loss it weighs)")
    if cfg.ptx_batch_size < 1:
        raise ValueError(f"--ptx-batch-size must be >= 1, got {cfg.ptx_batch_size}")
    rows = load_rows(cfg.ptx_data)
    return rows, validate_rows(rows, SFT_FORMATS)


def run(cfg: GRPOConfig, engine: RolloutEngine | None = None) -> TrainResult:
    info = init_distributed()
    try:
        check_rollout_options(cfg)
        rows, _ = load_data(cfg, ("prompt_only",), info)
        # an unknown verifier, a row missing a field a reward reads, or a code reward without a sandbox: all fail
        # before any model is loaded
        reward = make_rewards(cfg, rows)
        ptx_rows, ptx_fmt = load_ptx_rows(cfg)
        if cfg.distributed == "fsdp" and info.enabled:
            raise ValueError("ptk grpo: --distributed fsdp is not supported (generation needs whole weights); "
                             "use ddp")
        model, tokenizer = load_policy(cfg)
        evaluate = training_evaluator(cfg, reward, model, tokenizer, info)  # --eval-data: checked here too
        reward.load_models(info.device)
        prompts = [encode_prompt(r, tokenizer, max_prompt_length=cfg.max_prompt_length) for r in rows]
        engine = engine or build_rollout_engine(cfg, model, tokenizer, info)  # vLLM: built before training
        ref = load_reference(cfg, info, policy=model) if cfg.beta > 0 else None  # --lora: the policy
        source = GRPORollouts(rows, prompts, model, tokenizer, cfg, info, reward=reward, ref_model=ref, engine=engine)
        if ptx_rows:
            # the answers of conversations only: the policy keeps its SFT behaviour, not the users' turns
            examples = encode_all(ptx_rows, lambda r: encode_sft(r, tokenizer, max_length=cfg.max_length, fmt=ptx_fmt,
                                                                  assistant_only_loss=True),
                                  "--ptx-data examples", info)
            source.add_ptx(examples, tokenizer.pad_token_id, cfg.ptx_batch_size)
        return train(cfg, GRPOLoss(model, cfg), source, tokenizer, info, stage="grpo", evaluate=evaluate,
                     eval_steps=cfg.eval_steps or cfg.max_steps)
    finally:
        shutdown(info)


def main(argv: list[str]) -> int:
    run(parse_config(GRPOConfig, argv, prog="ptk grpo"))
    return 0

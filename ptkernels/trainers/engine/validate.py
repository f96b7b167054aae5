"""Every option checked before anything heavy runs: ranges, finiteness, list lengths.

A bad value fails in ``parse_config``, before data or a model is loaded and before anything is written, with an
error that names the flag (``--lr``), or the YAML key and its file when the value came from ``--config``, and
says what is allowed::

    --lr must be finite and > 0 (got inf)
    run.yaml: option 'adam_betas' must be a list of 2 numbers in [0, 1) (got [0.9])

Options are checked by name, so a stage's own options (and options other modules add) are covered as soon as
they appear in ``RULES``; an option not listed here is left to argparse's type check.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass


class ConfigError(ValueError):
    """An option value outside its allowed range; the message names the option and the range."""


@dataclass(frozen=True)
class Range:
    """``lo``/``hi`` bounds (None: unbounded), each inclusive or not; ints or floats (floats must be finite)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    optional: bool = False  # None allowed (the option is off)

    def ok(self, v) -> bool:
        if v is None:
            return self.optional
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.integer and not isinstance(v, int):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        hi = None if self.hi is None else f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        if lo and hi:
            text = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        else:
            text = lo or hi or "any value"
        text = text if self.integer else "finite and " + text
        return text + (" (or unset)" if self.optional else "")


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


INT_POS, INT_NONNEG = Range(1, integer=True), Range(0, integer=True)
POS, NONNEG = Range(0, lo_open=True), Range(0)
UNIT, UNIT_OPEN_HI = Range(0, 1), Range(0, 1, hi_open=True)

# name -> allowed range, for every numeric option of every stage (options a stage lacks are skipped)
RULES: dict[str, Range] = {
    # every stage
    "max_steps": INT_POS, "batch_size": INT_POS, "grad_accum": INT_POS, "lr": POS, "weight_decay": NONNEG,
    "warmup_steps": INT_NONNEG, "min_lr_ratio": UNIT, "max_grad_norm": NONNEG, "max_length": Range(2, integer=True),
    "seed": Range(0, 2**63 - 1, integer=True), "save_steps": INT_NONNEG, "save_total_limit": INT_NONNEG,
    "log_steps": INT_POS,
    # reward model
    "center_rewards_coefficient": NONNEG,
    # preference stages and KTO
    "beta": POS, "label_smoothing": Range(0, 0.5), "nll_weight": NONNEG, "simpo_gamma": Range(),
    "desirable_weight": NONNEG, "undesirable_weight": NONNEG,
    # on-policy stages
    "prompts_per_step": INT_POS, "max_prompt_length": INT_POS, "max_new_tokens": INT_POS, "temperature": POS,
    "top_p": Range(0, 1, lo_open=True), "generation_batch_size": INT_POS,
    "num_generations": INT_POS, "num_iterations": INT_POS, "epsilon_low": UNIT_OPEN_HI, "epsilon_high": NONNEG,
    "ptx_coef": NONNEG, "ptx_batch_size": INT_POS,
    "kl_coef": NONNEG, "missing_eos_penalty": NONNEG, "gamma": UNIT, "lam": UNIT, "ppo_epochs": INT_POS,
    "num_minibatches": INT_POS, "clip_range": POS, "clip_range_value": POS, "vf_coef": NONNEG,
    # DPO family options of TRL 1.16 (ld_alpha: LD-DPO's weight of the verbose tail, in [0, 1])
    "alpha": Range(), "discopop_tau": POS, "f_alpha_divergence_coef": Range(), "ld_alpha": Range(0, 1, optional=True),
    # GRPO options of TRL 1.16
    "entropy_coef": Range(), "top_entropy_quantile": Range(0, 1, lo_open=True),
    "off_policy_mask_threshold": Range(0, optional=True),
    # verl's Clip-Cov / KL-Cov (ptk grpo --loss-type clip_cov / kl_cov)
    "clip_cov_ratio": UNIT, "clip_cov_lb": Range(), "clip_cov_ub": Range(), "kl_cov_ratio": UNIT,
    "kl_cov_coef": NONNEG,
    # vLLM engine (docs/vllm.md) and TRL 1.16's importance-sampling correction of its sampler log-probs
    "vllm_gpu_memory_utilization": Range(0, 1, lo_open=True), "vllm_importance_sampling_clip_min": NONNEG,
    "vllm_importance_sampling_clip_max": POS,
    # LoRA
    "lora_r": INT_POS, "lora_alpha": POS, "lora_dropout": UNIT_OPEN_HI,
    # safety
    "dpo_steps": INT_POS, "dpo_lr": POS, "eval_fraction": UNIT_OPEN_HI,
    # epochs and periodic evaluation
    "num_epochs": NONNEG, "eval_steps": INT_NONNEG,
}
# ranges that depend on the stage: GRPO's beta is a KL weight (0 = no reference model)
STAGE_RULES: dict[str, dict[str, Range]] = {"GRPOConfig": {"beta": NONNEG}}

LISTS = {"adam_betas": (2, UNIT_OPEN_HI)}  # name -> (length, range of each element)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def where(name: str, sources: dict | None) -> str:
    """How to name an option in an error: its flag, or ``FILE: option 'key'`` when it came from a YAML file."""
    src = (sources or {}).get(name)
    return f"{src[0]}: option {src[1]!r}" if src else flag(name)


def validate_config(cfg, sources: dict | None = None) -> None:
    """Raises ``ConfigError`` for the first option outside its range; warns about settings that learn nothing.
    ``sources`` maps an option's name to ``(yaml_file, key)`` for values read from a file."""
    names = set(vars(cfg))
    rules = {**RULES, **STAGE_RULES.get(type(cfg).__name__, {})}
    for name in sorted(names & set(rules)):
        value, rule = getattr(cfg, name), rules[name]
        if not rule.ok(value):
            raise ConfigError(f"{where(name, sources)} must be {rule.describe()} (got {value!r})")
    for name, (length, rule) in LISTS.items():
        if name not in names:
            continue
        value = getattr(cfg, name)
        if not isinstance(value, (list, tuple)) or len(value) != length or not all(rule.ok(v) for v in value):
            shown = list(value) if isinstance(value, (list, tuple)) else value
            raise ConfigError(f"{where(name, sources)} must be a list of {length} numbers "
                              f"{rule.describe().replace('finite and ', '')} (got {shown!r})")
    _cross_checks(cfg, names, sources)
    _warnings(cfg, names)


def _cross_checks(cfg, names: set, sources) -> None:
    # --resume PATH --overwrite is meaningful: continue a checkpoint from elsewhere, moving the run there aside
    if getattr(cfg, "resume", "") == "latest" and getattr(cfg, "overwrite", False):
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in "
                          "--output-dir, --overwrite starts a new one there")
    if getattr(cfg, "loss_type", None) == "gmpo":  # TRL 1.16's GMPOTrainer has neither term (grpo_checks.py)
        if getattr(cfg, "entropy_coef", 0.0):
            raise ConfigError(f"{where('entropy_coef', sources)}: --loss-type gmpo has no entropy bonus (TRL 1.16's "
                              "GMPOTrainer); leave it 0")
        if getattr(cfg, "off_policy_mask_threshold", None) is not None:
            raise ConfigError(f"{where('off_policy_mask_threshold', sources)}: --loss-type gmpo has no off-policy "
                              "mask (TRL 1.16's GMPOTrainer); leave it unset")


def _warnings(cfg, names: set) -> None:
    if "num_generations" in names and cfg.num_generations == 1:
        warn("--num-generations 1: every group has one completion, so every advantage is 0 and GRPO learns "
             "nothing (use 2 or more)")


def warn(message: str) -> None:
    print(f"ptk: warning: {message}", file=sys.stderr)

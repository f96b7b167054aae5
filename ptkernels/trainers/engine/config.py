"""Trainer configuration: one dataclass per stage, loaded from YAML with command-line overrides.

    cfg = parse_config(SFTConfig, ["--config", "sft.yaml", "--lr", "3e-4", "--packing"])

Precedence: the dataclass defaults < the YAML file < the command line. Every field is an option
(``max_steps`` -> ``--max-steps``) whose ``--help`` line shows its default; booleans take ``--x`` / ``--no-x``.
An unknown key in the YAML file or a value of the wrong type is an error naming the key and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_config(name: str) -> str:
    """The path of a YAML config shipped with the package (``configs/NAME``), e.g. ``pipeline/quick.yaml``."""
    path = os.path.join(CONFIG_DIR, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no shipped config {name!r} in {CONFIG_DIR}")
    return path


def option(default, help: str, **kw):
    """A config field with its help text (shown by ``ptk STAGE --help``)."""
    return field(default=default, metadata={"help": help, **kw})


OUTPUT_HELP = "where the model, metrics.jsonl and checkpoints/ go"


@dataclass
class TrainConfig:
    """Options every stage shares."""

    model: str = option("", "required: a local Hugging Face model folder, a Hub id (e.g. Qwen/Qwen2.5-0.5B, downloaded "
                        "by transformers when online) or a built-in random preset: tiny, small, base")
    data: str = option("", "training data: a JSONL file or a folder saved with datasets' save_to_disk")
    output_dir: str = option("runs/out", OUTPUT_HELP)
    max_steps: int = option(100, "optimizer steps to run")
    batch_size: int = option(8, "examples per micro-batch on each process")
    grad_accum: int = option(1, "micro-batches per optimizer step (the loss is normalized over all of them)")
    lr: float = option(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_betas: tuple = option((0.9, 0.999), "AdamW betas")
    warmup_steps: int = option(0, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = option(0.1, "the cosine schedule ends at lr * min_lr_ratio")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)")
    max_length: int = option(512, "tokens per sequence (prompt + completion)")
    truncation: str = option("left", "too-long examples: 'left' drops tokens from the start, 'drop' skips them",
                             choices=("left", "drop"))
    seed: int = option(0, "seed for the model init (tiny), data order and sampling")
    precision: str = option("auto", "'auto' (bf16 autocast on GPU, fp32 on CPU), 'fp32' or 'bf16'",
                            choices=("auto", "fp32", "bf16"))
    save_steps: int = option(0, "write a checkpoint every N steps (0: only at the end and on Ctrl-C)")
    save_total_limit: int = option(2, "checkpoints kept (the oldest are deleted)")
    log_steps: int = option(1, "log metrics every N steps")
    resume: str = option("", "continue from a checkpoint: 'latest' (in output_dir/checkpoints) or a folder")
    overwrite: bool = option(False, "start over in an output_dir that holds an earlier run")
    distributed: str = option("ddp", "under torchrun: 'ddp' or 'fsdp' (FSDP2 fully_shard)", choices=("ddp", "fsdp"))
    backend: str = option("auto", "ptkernels backend for the fused losses",
                          choices=("auto", "torch", "triton", "native", "reference"))
    trust_remote_code: bool = option(False, "allow model code from the model folder (off: only built-in classes)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    tensorboard: bool = option(False, "also log to TensorBoard (output_dir/tensorboard) when it is installed")
    progress: bool = option(True, "show a tqdm progress bar")
    # -- issue 25: epochs as users count them
    num_epochs: float = option(0.0, "passes over --data (> 0 sets --max-steps from the data size; on-policy stages: "
                               "passes over the prompts)")


@dataclass
class PretrainConfig(TrainConfig):
    """Stage 0: next-token pretraining on raw text."""

    output_dir: str = option("runs/pretrain", OUTPUT_HELP)
    lr: float = option(1e-3, "peak learning rate (AdamW)")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: the next-token loss on the completion / assistant tokens."""

    output_dir: str = option("runs/sft", OUTPUT_HELP)
    packing: bool = option(False, "pack several examples per row (attention and positions restart per example)")
    lr: float = option(3e-4, "peak learning rate (AdamW)")


@dataclass
class RewardConfig(TrainConfig):
    """A Bradley-Terry reward model on preference pairs."""

    output_dir: str = option("runs/reward", OUTPUT_HELP)
    lr: float = option(1e-4, "peak learning rate (AdamW)")
    center_rewards_coefficient: float = option(0.0, "adds coef * (r_chosen + r_rejected)^2 (Eisenstein et al.)")
    margin_field: str = option("margin", "data field with a per-pair margin subtracted inside the sigmoid, if present")


@dataclass
class PreferenceConfig(TrainConfig):
    """What the preference stages share (DPO, ORPO, SimPO; CPO through --loss-type with --reference-free)."""

    lr: float = option(5e-5, "peak learning rate (AdamW)")
    beta: float = option(0.1, "inverse temperature of the implicit reward")
    loss_type: str = option("sigmoid", "DPO family: sigmoid, ipo, hinge, robust, exo_pair, bco_pair, apo_zero, "
                            "apo_down (ORPO / SimPO have their own commands)")
    label_smoothing: float = option(0.0, "cDPO / robust DPO label noise")
    nll_weight: float = option(0.0, "adds nll_weight * NLL of the chosen completions (RPO's alpha)")
    simpo_gamma: float = option(0.5, "SimPO's target margin gamma (simpo only)")


@dataclass
class DPOConfig(PreferenceConfig):
    """DPO family: the policy against a frozen reference model."""

    output_dir: str = option("runs/dpo", OUTPUT_HELP)
    ref_model: str = option("", "reference model folder (default: the initial policy)")
    ref_mode: str = option("precompute", "'precompute': reference log-probs in one pass before training, no "
                           "reference model held; 'live': a frozen reference model scores each batch",
                           choices=("precompute", "live"))


@dataclass
class ORPOConfig(PreferenceConfig):
    """ORPO: odds-ratio preference optimization, no reference model."""

    output_dir: str = option("runs/orpo", OUTPUT_HELP)
    loss_type: str = option("orpo", "fixed: orpo", choices=("orpo",))
    lr: float = option(1e-4, "peak learning rate (AdamW)")


@dataclass
class SimPOConfig(PreferenceConfig):
    """SimPO: length-normalized rewards with a target margin, no reference model."""

    output_dir: str = option("runs/simpo", OUTPUT_HELP)
    loss_type: str = option("simpo", "fixed: simpo", choices=("simpo",))
    beta: float = option(2.0, "SimPO's beta (reward scale on length-averaged log-probs)")


@dataclass
class KTOConfig(TrainConfig):
    """KTO on unpaired desirable / undesirable completions, against a frozen reference model."""

    output_dir: str = option("runs/kto", OUTPUT_HELP)
    lr: float = option(5e-5, "peak learning rate (AdamW)")
    beta: float = option(0.1, "inverse temperature of the implicit reward")
    desirable_weight: float = option(1.0, "weight of desirable (label=true) examples")
    undesirable_weight: float = option(1.0, "weight of undesirable (label=false) examples")
    ref_model: str = option("", "reference model folder (default: the initial policy)")
    ref_mode: str = option("precompute", "'precompute' or 'live' (see dpo)", choices=("precompute", "live"))


@dataclass
class OnPolicyConfig(TrainConfig):
    """What the on-policy stages (GRPO, PPO) share: sampling rollouts from the current policy."""

    prompts_per_step: int = option(8, "prompts sampled per rollout on each process")
    max_prompt_length: int = option(256, "prompt tokens kept (from the right)")
    max_new_tokens: int = option(64, "tokens generated per completion at most")
    temperature: float = option(1.0, "sampling temperature (log-probs are of the tempered distribution)")
    top_p: float = option(1.0, "nucleus sampling")
    ref_model: str = option("", "reference model for the KL term (default: the initial policy)")
    batch_size: int = option(16, "sequences per forward/backward micro-batch")
    generation_batch_size: int = option(64, "sequences sampled per batch (a GRPO group counts num_generations)")
    # -- user rewards (issue 25): TRL-style reward functions and reward models, weighted
    reward_funcs: str = option("", "comma-separated reward functions: built-in verifiers (math, format, exact, fact, "
                               "code, row), module:function or file.py:function (TRL's signature: completions, "
                               "**row_fields -> list[float | None]) and reward model folders; GRPO: replaces "
                               "--verifier; PPO: replaces --reward-model's score")
    reward_weights: str = option("", "comma-separated weights of --reward-funcs (default 1 each)")
    eval_data: str = option("", "held-out prompts (with gold answers) evaluated during training with the run's "
                            "rewards (greedy): eval_reward, eval_accuracy, ... in metrics.jsonl")
    eval_steps: int = option(0, "evaluate --eval-data every N steps and at the end (0: only at the end)")
    rollout_engine: str = option("kv_cache", "sampler: 'kv_cache' (the model's forward and a KV cache, each distinct "
                                 "prompt prefilled once) or 'hf' (Hugging Face generate); same distribution",
                                 choices=("kv_cache", "hf"))


@dataclass
class GRPOConfig(OnPolicyConfig):
    """GRPO: group sampling, verifiable rewards, group-normalized advantages."""

    output_dir: str = option("runs/grpo", OUTPUT_HELP)
    lr: float = option(1e-5, "peak learning rate (AdamW)")
    verifier: str = option("auto", "reward: 'auto' (what the data supports: 'row' when rows name their verifier, "
                           "'code' with 'tests', 'math' for numeric gold answers, else 'fact'), 'row' (each row's "
                           "'verifier' field), a name (math, format, exact, fact, code), 'math,format' (equal "
                           "weights) or 'math:0.8,format:0.2'; gold answers are read from 'answer', 'solution' or "
                           "'ground_truth'")
    num_generations: int = option(8, "completions sampled per prompt (the group)")
    num_iterations: int = option(1, "optimizer steps per rollout (old log-probs kept from sampling time)")
    beta: float = option(0.0, "KL coefficient to the reference (k3); 0 holds no reference model")
    loss_type: str = option("dapo", "grpo, bnpo, dr_grpo or dapo (ptkernels.grpo_loss)",
                            choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    epsilon_low: float = option(0.2, "lower clip of the importance ratio (the clips act only with num_iterations "
                                "> 1: with one step per rollout the ratio is 1)")
    epsilon_high: float = option(0.2, "upper clip (DAPO's clip-higher: e.g. 0.28)")
    scale_rewards: str = option("group", "advantage scale: group std, batch std or none (Dr. GRPO)",
                                choices=("group", "batch", "none"))
    importance_sampling_level: str = option("token", "token (GRPO) or sequence (GSPO)", choices=("token", "sequence"))
    dynamic_sampling: bool = option(False, "DAPO's dynamic sampling: sample twice the prompts and train on the "
                                    "groups whose rewards differ first (a group of equal rewards has no gradient)")
    ptx_data: str = option("", "PPO-ptx (InstructGPT): SFT rows (text, messages or prompt/completion JSONL) whose "
                           "next-token loss is added to GRPO's, against regressions where the rewards are flat")
    ptx_coef: float = option(0.0, "weight of the --ptx-data loss (mean over its tokens); 0 turns it off")
    ptx_batch_size: int = option(16, "--ptx-data rows per optimizer step on each process")
    share_prompt: bool = option(True, "train with each distinct prompt of a micro-batch run through the model once, "
                                "its keys and values shared by its completions (the same loss and gradients as "
                                "whole rows, with fewer tokens)")
    skip_zero_advantage: bool = option(True, "with --beta 0, leave out of the training forward the rows whose "
                                       "advantage is exactly 0 (their loss and gradient are 0; the step's item "
                                       "count keeps them, so the loss is unchanged); entropy and clip metrics are "
                                       "then over the trained rows")


@dataclass
class PPOConfig(OnPolicyConfig):
    """RLHF with PPO: a reward model, a critic, a KL penalty to the reference, GAE."""

    output_dir: str = option("runs/ppo", OUTPUT_HELP)
    lr: float = option(1e-5, "peak learning rate (AdamW), policy and value model")
    reward_model: str = option("", "reward model folder (from ptk reward); the critic starts from it")
    kl_coef: float = option(0.05, "per-token KL penalty coefficient in the reward")
    kl_estimator: str = option("k1", "per-token KL estimate in the reward: k1 or k3", choices=("k1", "k3"))
    missing_eos_penalty: float = option(1.0, "subtracted from the score of a completion without eos (0: off)")
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    ppo_epochs: int = option(4, "passes over each rollout")
    num_minibatches: int = option(1, "optimizer steps per pass over a rollout")
    clip_range: float = option(0.2, "policy ratio clip")
    clip_range_value: float = option(0.2, "value clip")
    vf_coef: float = option(0.1, "value loss coefficient")
    whiten_rewards: bool = option(False, "whiten the per-token rewards before GAE")


@dataclass
class SafetyConfig(TrainConfig):
    """Constitutional AI: SL-CAI (critique and revise, then SFT) and RLAIF (AI-judged pairs, then DPO)."""

    output_dir: str = option("runs/safety", OUTPUT_HELP)
    constitution: str = option("", "a YAML list of principles")
    judge: str = option("self", "who critiques, revises and picks the better answer: 'self' (the model), a local "
                        "model folder, or 'rule' (the rule judge of rows with category/answer fields)")
    max_steps: int = option(100, "SFT steps of stage one (SL-CAI)")
    lr: float = option(3e-4, "SFT learning rate of stage one")
    dpo_steps: int = option(100, "DPO steps of stage two (RLAIF)")
    dpo_lr: float = option(5e-5, "DPO learning rate of stage two")
    beta: float = option(0.1, "DPO beta of stage two")
    max_new_tokens: int = option(48, "tokens per generated answer, critique or revision")
    max_prompt_length: int = option(256, "prompt tokens kept (from the right)")
    eval_fraction: float = option(0.2, "red-team prompts held out for the refusal report")


# ----------------------------------------------------------------------------------------------- parsing


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(cls, f: dataclasses.Field):
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _coerce(value, kind, key: str, where: str):
    """A YAML value checked against the field's type (ints are accepted for floats)."""
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str),
          tuple: isinstance(value, (list, tuple))}[kind]
    if not ok and kind is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 3e-4 as a string (it wants 3.0e-4); accept what float() accepts
        try:
            return float(value)
        except ValueError:
            pass
    if not ok:
        raise ValueError(f"{where}: option {key!r} must be {kind.__name__}, got {value!r}")
    return float(value) if kind is float else tuple(value) if kind is tuple else value


def build_parser(cls, prog: str) -> argparse.ArgumentParser:
    doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="a YAML file of options (the command line overrides it)")
    for f in dataclasses.fields(cls):
        kind, meta = _field_type(cls, f), f.metadata
        kw = {"help": meta.get("help", ""), "default": f.default, "dest": f.name}
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif kind is tuple:
            parser.add_argument(_flag(f.name), nargs=len(f.default), type=float, metavar="X", **kw)
        elif f.name == "resume":  # --resume alone means the latest checkpoint
            parser.add_argument(_flag(f.name), nargs="?", const="latest", **kw)
        else:
            parser.add_argument(_flag(f.name), type=kind, choices=meta.get("choices"), **kw)
    return parser


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of option: value, got {type(data).__name__}")
    return data


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` for a command with a hand-written parser (``ptk pipeline``, ``ptk eval``), with
    ``--config FILE.yaml`` supplying option values (keys as the options' names, ``-`` or ``_``) that the command
    line overrides. An unknown key is an error naming the key and the file."""
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", default=None, help="a YAML file of options (the command line overrides it)")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(argv)[0].config
    if path:
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        values = {}
        for key, value in load_yaml(path).items():
            name = str(key).replace("-", "_")
            if name not in actions:
                raise ValueError(f"{path}: unknown option {key!r} for {parser.prog} (see {parser.prog} --help)")
            action = actions[name]
            if action.type is not None and value is not None and not isinstance(value, bool):
                value = action.type(value)
            if action.choices and value not in action.choices:
                raise ValueError(f"{path}: option {key!r} must be one of {list(action.choices)}, got {value!r}")
            values[name] = value
            action.required = False  # given by the file
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def parse_config(cls, argv: list[str], prog: str = "ptk"):
    """The config of ``cls`` from defaults, an optional ``--config FILE.yaml`` and command-line overrides."""
    parser = build_parser(cls, prog)
    args = parser.parse_args(argv)
    # Which options the command line set explicitly: parse again with every default suppressed.
    given = vars(build_parser_suppressed(cls, prog).parse_args(argv))
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    if args.config:
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in load_yaml(args.config).items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise ValueError(f"{args.config}: unknown option {key!r} for {prog} (see {prog} --help)")
            kind = _field_type(cls, names[name])
            value = _coerce(value, kind, key, args.config)
            choices = names[name].metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{args.config}: option {key!r} must be one of {list(choices)}, got {value!r}")
            values[name] = value
    for name, value in given.items():
        if name != "config":
            values[name] = tuple(value) if isinstance(value, list) else value
    cfg = cls(**values)
    validate(cfg)
    return cfg


def build_parser_suppressed(cls, prog: str) -> argparse.ArgumentParser:
    parser = build_parser(cls, prog)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser


def validate(cfg: TrainConfig) -> None:
    """Values that argparse's types cannot check, each error naming its option."""
    positive = ("max_steps", "batch_size", "grad_accum", "max_length")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "weight_decay", "max_grad_norm", "warmup_steps", "save_steps", "min_lr_ratio", "num_epochs"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.data:
        raise ValueError("--data is required: a JSONL file or a saved datasets folder")
    if not cfg.model:
        raise ValueError("--model is required: a local model folder, a Hugging Face Hub id, or a built-in random "
                         "preset (tiny, small, base)")


def to_dict(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}

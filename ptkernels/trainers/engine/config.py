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


DROPOUT_HELP = ("every dropout probability set to 0 after loading (TRL 1.16's disable_dropout; its default, on for "
                "DPO, KTO, CPO/ORPO and reward models, where dropout would make the policy differ from its reference "
                "at step 1, off for SFT, GRPO and PPO)")


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
    truncation: str = option("left", "too-long examples: 'left' (or TRL's name 'keep_end') drops tokens from the "
                             "start, keeping the answer; 'keep_start' (TRL 1.16's default) drops the end; 'drop' "
                             "skips them", choices=("left", "keep_end", "keep_start", "drop"))
    seed: int = option(0, "seed for the model init (tiny), data order and sampling")
    precision: str = option("auto", "'auto' (bf16 autocast on GPU, fp32 on CPU), 'fp32' or 'bf16'",
                            choices=("auto", "fp32", "bf16"))
    save_steps: int = option(500, "write a checkpoint every N steps (500 as Hugging Face's Trainer; 0: only at "
                                    "the end and on Ctrl-C / SIGTERM)")
    save_total_limit: int = option(2, "checkpoints kept (the oldest are deleted)")
    log_steps: int = option(1, "log metrics every N steps")
    resume: str = option("", "continue from a checkpoint: 'latest' (in output_dir/checkpoints) or a folder")
    overwrite: bool = option(False, "start over in an output_dir that holds an earlier run")
    allow_config_change: bool = option(False, "with --resume: continue even though the number of processes, the "
                                       "global batch, the seed or the data changed since the checkpoint")
    distributed: str = option("ddp", "under torchrun: 'ddp' or 'fsdp' (FSDP2 fully_shard)", choices=("ddp", "fsdp"))
    backend: str = option("auto", "ptkernels backend for the fused losses",
                          choices=("auto", "torch", "triton", "native", "reference"))
    trust_remote_code: bool = option(False, "allow model code from the model folder (off: only built-in classes)")
    disable_dropout: bool = option(False, DROPOUT_HELP)
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    tensorboard: bool = option(False, "also log to TensorBoard (output_dir/tensorboard) when it is installed")
    progress: bool = option(True, "show a tqdm progress bar")
    # LoRA / QLoRA through PEFT (trainers/lora.py)
    lora: bool = option(False, "train a LoRA adapter (PEFT) instead of all weights; the reference of dpo/kto/ppo/"
                        "grpo is then the same model with its adapter disabled (no second copy)")
    lora_r: int = option(16, "LoRA rank (with --lora)")
    lora_alpha: float = option(32.0, "LoRA alpha: the update is scaled by alpha / r (with --lora)")
    lora_dropout: float = option(0.05, "dropout on the LoRA branch's input (with --lora)")
    lora_target_modules: str = option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                      "comma-separated module names to adapt (default: the attention and MLP "
                                      "projections), or 'all-linear' (every linear layer but the output head)")
    lora_modules_to_save: str = option("", "comma-separated modules trained in full beside the adapter, e.g. "
                                       "'lm_head' (the fused losses then read its trained copy) or 'score'; "
                                       "default: none for causal LMs (head frozen), 'score' for reward / critic")
    load_in_4bit: bool = option(False, "QLoRA: the frozen base in 4-bit NF4 (bitsandbytes; on CPU its CPU backend, "
                                "bitsandbytes >= 0.50, computing in fp32; without bitsandbytes an error, never a "
                                "silent full-precision run); needs --lora and a model folder")
    load_in_8bit: bool = option(False, "the frozen base in 8-bit (bitsandbytes' LLM.int8, inputs cast to fp16 in "
                                "its matmuls; on CPU as --load-in-4bit); needs --lora and a model folder")
    merge_adapter: bool = option(False, "with --lora, also write the merged full model to output_dir/merged "
                                 "(loads with AutoModelForCausalLM.from_pretrained); same as ptk merge")
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
    completion_only_loss: bool = option(True, "prompt/completion rows: train the completion only (TRL's default); "
                                        "false trains the prompt too")
    assistant_only_loss: bool = option(False, "conversational rows: train the assistant tokens only (off: every "
                                       "token of 'messages' rows, as TRL 1.16's default)")


@dataclass
class RewardConfig(TrainConfig):
    """A Bradley-Terry reward model on preference pairs."""

    output_dir: str = option("runs/reward", OUTPUT_HELP)
    lr: float = option(1e-4, "peak learning rate (AdamW)")
    center_rewards_coefficient: float = option(0.0, "adds coef * (r_chosen + r_rejected)^2 (Eisenstein et al.)")
    margin_field: str = option("margin", "data field with a per-pair margin subtracted inside the sigmoid, if present")
    disable_dropout: bool = option(True, DROPOUT_HELP)


@dataclass
class PreferenceConfig(TrainConfig):
    """What the preference stages share (DPO, ORPO, SimPO; CPO through --loss-type with --reference-free)."""

    lr: float = option(5e-5, "peak learning rate (AdamW)")
    disable_dropout: bool = option(True, DROPOUT_HELP)
    beta: float = option(0.1, "inverse temperature of the implicit reward")
    loss_type: str = option("sigmoid", "DPO family, TRL 1.16's types: sigmoid, hinge, ipo, exo_pair, nca_pair, "
                            "robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, "
                            "sigmoid_norm, sft, and cdpo (conservative DPO); a comma-separated list with "
                            "--loss-weights is TRL's MPO, e.g. sigmoid,sft for RPO (ORPO / SimPO have their own "
                            "commands)")
    label_smoothing: float = option(0.0, "label noise of robust, exo_pair, aot, aot_unpaired and cdpo (sigmoid "
                                    "ignores it, as in TRL 1.16)")
    nll_weight: float = option(0.0, "adds nll_weight * NLL of the chosen completions (CPO's cpo_alpha)")
    simpo_gamma: float = option(0.5, "SimPO's target margin gamma (simpo only)")
    # TRL 1.16 DPOConfig / CPOConfig names (ptkernels.fused_linear_preference_loss documents each)
    loss_weights: str = option("", "comma-separated weight per --loss-type entry (TRL's loss_weights; default 1s)")
    f_divergence_type: str = option("reverse_kl", "reverse_kl, forward_kl, js_divergence or alpha_divergence",
                                    choices=("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"))
    f_alpha_divergence_coef: float = option(0.5, "alpha of alpha_divergence")
    discopop_tau: float = option(0.05, "discopop's temperature")
    ld_alpha: float | None = option(None, "LD-DPO: weight of the longer completion's tokens past the shorter's "
                                    "length, in [0, 1] (default: off)")
    use_weighting: bool = option(False, "WPO: weight each pair's loss by its completions' policy probability")
    alpha: float = option(0.0, "AlphaPO's alpha (simpo, or cpo via --loss-type cpo --reference-free)")


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
    beta: float = option(0.1, "SimPO's beta (reward scale on length-averaged log-probs); 0.1 as TRL 1.16's "
                         "CPOConfig and Liger, the SimPO paper uses 2.0")


@dataclass
class KTOConfig(TrainConfig):
    """KTO on unpaired desirable / undesirable completions, against a frozen reference model."""

    output_dir: str = option("runs/kto", OUTPUT_HELP)
    lr: float = option(5e-5, "peak learning rate (AdamW)")
    disable_dropout: bool = option(True, DROPOUT_HELP)
    beta: float = option(0.1, "inverse temperature of the implicit reward")
    desirable_weight: float = option(1.0, "weight of desirable (label=true) examples")
    undesirable_weight: float = option(1.0, "weight of undesirable (label=false) examples")
    average_log_prob: bool = option(False, "length-average the sequence log-probs (Liger's option; TRL 1.16's KTO "
                                    "sums them)")
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
    reward_weights: str = option("", "comma-separated weights of --reward-funcs (default 1 each); GRPO: or of the "
                                 "parts of --verifier a,b. With several functions GRPO's advantages take the "
                                 "[N, functions] reward matrix (--multi-objective-aggregation)")
    unsafe_code_sandbox: bool = option(False, "run the code verifier's model-written code even without bubblewrap "
                                       "(weaker, escapable isolation; prints a warning). Off: it refuses")
    eval_data: str = option("", "held-out prompts (with gold answers) evaluated during training with the run's "
                            "rewards (greedy): eval_reward, eval_accuracy, ... in metrics.jsonl")
    eval_steps: int = option(0, "evaluate --eval-data every N steps and at the end (0: only at the end)")
    rollout_engine: str = option("kv_cache", "sampler: 'kv_cache' (the model's forward and a KV cache, each distinct "
                                 "prompt prefilled once) or 'hf' (Hugging Face generate); same distribution; 'vllm' "
                                 "(vLLM in this process or --vllm-server, weights synced after each rollout's "
                                 "steps; docs/vllm.md)", choices=("kv_cache", "hf", "vllm"))
    # --rollout-engine vllm (docs/vllm.md): where the engine runs, its memory, the sampler/trainer mismatch correction
    vllm_server: str = option("", "with --rollout-engine vllm: HOST:PORT of a running `ptk vllm-serve` (under "
                              "torchrun one per process, comma-separated); empty: the engine runs in this process")
    vllm_gpu_memory_utilization: float = option(0.3, "CUDA: fraction of the device the in-process vLLM engine takes "
                                                "for its weights and KV cache (the trainer needs the rest)")
    vllm_importance_sampling_correction: bool = option(True, "with --rollout-engine vllm: correct the loss for the "
                                                       "sampler/trainer log-prob mismatch with vLLM's own "
                                                       "log-probs (TRL's TIS/MIS); no effect on built-in engines")
    vllm_importance_sampling_mode: str = option("sequence_mask", "token_truncate (TIS), token_mask (MIS), "
                                                "sequence_truncate or sequence_mask (TRL's names)",
                                                choices=("token_truncate", "token_mask", "sequence_truncate",
                                                         "sequence_mask"))
    vllm_importance_sampling_clip_min: float = option(0.0, "lower bound of the sampler IS ratio (0: none)")
    vllm_importance_sampling_clip_max: float = option(3.0, "upper bound of the sampler IS ratio (truncate: the cap "
                                                      "C of min(ratio, C); mask: ratios above are dropped)")


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
    loss_type: str = option("dapo", "ptkernels.grpo_loss loss type (TRL 1.16's, plus gmpo, and verl's clip_cov / "
                            "kl_cov entropy-collapse controls)",
                            choices=("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo", "gmpo",
                                     "clip_cov", "kl_cov"))
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
    # TRL 1.16 GRPOConfig options (same names; ptkernels.grpo_loss / group_advantages document each)
    advantage_estimator: str = option("grpo", "grpo (group_advantages), rloo (leave-one-out baseline, TRL's RLOO), "
                                      "reinforce_plus_plus (global whitening, verl; outcome reward, gamma 1) or "
                                      "remax (baseline: the reward of one greedy completion per prompt, verl; "
                                      "one extra greedy generation per prompt and rollout)",
                                      choices=("grpo", "rloo", "reinforce_plus_plus", "remax"))
    entropy_coef: float = option(0.0, "entropy bonus: loss -= coef * token-mean entropy (TRL 1.16)")
    top_entropy_quantile: float = option(1.0, "train only on the tokens of the top quantile of entropy (1: all)")
    mask_truncated_completions: bool = option(False, "leave completions that hit --max-new-tokens out of the loss "
                                              "(they still count in the reward statistics)")
    off_policy_mask_threshold: float | None = option(None, "drop negative-advantage sequences whose mean "
                                                     "KL(old || current) exceeds this (TRL's OPSM); unset: off")
    multi_objective_aggregation: str = option("sum_then_normalize", "sum_then_normalize or normalize_then_sum "
                                              "of several reward functions (TRL 1.16)", choices=("sum_then_normalize",
                                                                                  "normalize_then_sum"))
    # verl's entropy-collapse controls (--loss-type clip_cov / kl_cov; verl's names and defaults in the help)
    clip_cov_ratio: float = option(2e-4, "clip_cov: fraction of completion tokens whose gradient is cut (verl's "
                                   "clip_cov_ratio)")
    clip_cov_lb: float = option(1.0, "clip_cov: lower bound of the advantage/log-prob covariance of the tokens it "
                                "may cut (verl's clip_cov_lb)")
    clip_cov_ub: float = option(5.0, "clip_cov: upper bound of that covariance (verl's clip_cov_ub)")
    kl_cov_ratio: float = option(2e-4, "kl_cov: fraction of completion tokens, the largest covariances, that get "
                                 "the |logp - old| penalty (verl's kl_cov_ratio)")
    kl_cov_coef: float = option(0.1, "kl_cov: weight of that penalty (verl's ppo_kl_coef)")


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
    vllm_importance_sampling_mode: str = option("token_truncate", "token_truncate (TIS), token_mask (MIS), "
                                                "sequence_truncate or sequence_mask (TRL's names)",
                                                choices=("token_truncate", "token_mask", "sequence_truncate",
                                                         "sequence_mask"))


@dataclass
class SafetyConfig(TrainConfig):
    """Constitutional AI: SL-CAI (critique and revise, then SFT) and RLAIF (AI-judged pairs, then DPO)."""

    owns_output_dir: typing.ClassVar[bool] = False  # its two stages check their own folders

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
    rollout_engine: str = option("kv_cache", "what samples the model's answers (not the judge's): 'kv_cache' or "
                                 "'hf' (built-in), or 'vllm' (each stage's model folder loaded by vLLM)",
                                 choices=("kv_cache", "hf", "vllm"))


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


# The options that are comma-separated lists: in a --config file each may be a YAML list (TRL's GRPOConfig writes
# reward_funcs and reward_weights so), joined here into the comma-separated string the option holds.
COMMA_LISTS = ("lora_target_modules", "lora_modules_to_save", "loss_type", "loss_weights", "reward_funcs",
               "reward_weights", "verifier", "vllm_server")


def _joined(value, key: str, where: str):
    """A YAML list given for a comma-list option, as its comma-separated string (other values as they are)."""
    if str(key).replace("-", "_") not in COMMA_LISTS or not isinstance(value, (list, tuple)):
        return value
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"{where}: option {key!r} takes a list of names or numbers (or one comma-separated "
                             f"string), got the item {v!r}")
    return ",".join(str(v).strip() for v in value)


def _first_line(doc: str | None) -> str:
    return doc.strip().splitlines()[0] if doc and doc.strip() else ""


def _declaring_class(cls, name: str):
    """The most general class of ``cls``'s hierarchy that declares option ``name`` (its help group)."""
    for base in reversed(cls.__mro__):
        if name in getattr(base, "__annotations__", {}) and dataclasses.is_dataclass(base):
            return base
    return cls


def build_parser(cls, prog: str) -> argparse.ArgumentParser:
    """``--help`` lists the options in groups (the options every stage shares, then the stage family's and the
    stage's own), each with its help and default."""
    parser = argparse.ArgumentParser(prog=prog, description=_first_line(cls.__doc__) or None,
                                     usage=f"{prog} [--config FILE.yaml] [--option value ...]",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     epilog="Options also come from --config FILE.yaml (keys as the option names; a "
                                            "run's run_config.yaml works); the command line overrides the file.")
    parser.add_argument("--config", default=None, help="a YAML file of options (the command line overrides it)")
    groups = {}
    for f in dataclasses.fields(cls):
        owner = _declaring_class(cls, f.name)
        if owner not in groups:
            title = "options of every stage" if owner.__name__ == "TrainConfig" else \
                f"{owner.__name__.removesuffix('Config')} options"
            groups[owner] = parser.add_argument_group(title, _first_line(owner.__doc__) or None)
        group = groups[owner]
        kind, meta = _field_type(cls, f), f.metadata
        kw = {"help": meta.get("help", ""), "default": f.default, "dest": f.name}
        if kind is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif kind is tuple:
            group.add_argument(_flag(f.name), nargs=len(f.default), type=float, metavar="X", **kw)
        elif f.name == "resume":  # --resume alone means the latest checkpoint
            group.add_argument(_flag(f.name), nargs="?", const="latest", **kw)
        else:
            group.add_argument(_flag(f.name), type=kind, choices=meta.get("choices"), **kw)
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
            value = _joined(value, key, path)
            if action.type is not None and value is not None and not isinstance(value, bool):
                value = action.type(value)
            if action.choices and value not in action.choices:
                raise ValueError(f"{path}: option {key!r} must be one of {list(action.choices)}, got {value!r}")
            values[name] = value
            action.required = False  # given by the file
        parser.set_defaults(**values)
    return parser.parse_args(argv)


INVOCATION_OPTIONS = ("resume", "overwrite", "allow_config_change")  # how to start, not what the run is


def _stage_of(prog: str) -> str:
    return prog.split()[-1]


def parse_config(cls, argv: list[str], prog: str = "ptk", check_output_dir: bool | None = None):
    """The config of ``cls`` from defaults, an optional ``--config FILE.yaml`` and command-line overrides, every
    value checked (``validate.validate_config``) before the caller loads anything. For a command (``prog`` 'ptk
    STAGE', or ``check_output_dir``) the output folder is checked too (``checkpoint.preflight``: an earlier run
    without --resume / --overwrite, --resume with nothing to resume). A ``run_config.yaml`` a run wrote is a valid
    ``--config`` file."""
    from . import checkpoint, validate

    parser = build_parser(cls, prog)
    args = parser.parse_args(argv)
    # Which options the command line set explicitly: parse again with every default suppressed.
    given = vars(build_parser_suppressed(cls, prog).parse_args(argv))
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    sources = {}
    if args.config:
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in load_yaml(args.config).items():
            name = str(key).replace("-", "_")
            if name == "stage":  # written into run_config.yaml: must be this command's stage
                if value not in (_stage_of(prog), prog):
                    raise ValueError(f"{args.config}: this config is for 'ptk {value}', not {prog!r}")
                continue
            if name not in names:
                raise ValueError(f"{args.config}: unknown option {key!r} for {prog} (see {prog} --help)")
            # null: an optional option (``float | None``) left unset, as run_config.yaml writes it
            optional = type(None) in typing.get_args(typing.get_type_hints(cls)[name])
            value = _joined(value, key, args.config)
            if value is not None or not optional:
                value = _coerce(value, _field_type(cls, names[name]), key, args.config)
            choices = names[name].metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{args.config}: option {key!r} must be one of {list(choices)}, got {value!r}")
            values[name] = value
            sources[name] = (args.config, key)
    for name, value in given.items():
        if name != "config":
            values[name] = tuple(value) if isinstance(value, list) else value
            sources.pop(name, None)
    cfg = cls(**values)
    validate.validate_config(cfg, sources)
    validate_required(cfg)
    if check_output_dir is None:
        check_output_dir = prog != "ptk"
    if check_output_dir and getattr(cls, "owns_output_dir", True):
        checkpoint.preflight(cfg.output_dir, cfg.resume, cfg.overwrite)
    return cfg


def run_config_dict(cfg, stage: str) -> dict:
    """What ``run_config.yaml`` holds: the stage and every option that defines the run (not how it was started:
    no --resume / --overwrite), so that ``ptk STAGE --config run_config.yaml`` runs it again."""
    return {"stage": stage, **{k: v for k, v in to_dict(cfg).items() if k not in INVOCATION_OPTIONS}}


def build_parser_suppressed(cls, prog: str) -> argparse.ArgumentParser:
    parser = build_parser(cls, prog)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser


def validate_required(cfg: TrainConfig) -> None:
    """The options a run cannot start without (the ranges are checked in ``validate.validate_config``)."""
    if not cfg.data:
        raise ValueError("--data is required: a JSONL file or a saved datasets folder")
    if not cfg.model:
        raise ValueError("--model is required: a local model folder, a Hugging Face Hub id, or a built-in random "
                         "preset (tiny, small, base)")
    validate_lora(cfg)


def validate_lora(cfg: TrainConfig) -> None:
    """The LoRA block's options (see trainers/lora.py)."""
    if cfg.lora_r < 1:
        raise ValueError(f"--lora-r must be >= 1, got {cfg.lora_r}")
    if cfg.lora_alpha <= 0:
        raise ValueError(f"--lora-alpha must be > 0, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not cfg.lora_target_modules.strip():
        raise ValueError("--lora-target-modules must name at least one module (or 'all-linear')")
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ValueError("--load-in-4bit and --load-in-8bit exclude each other")
    if not cfg.lora:
        for name in ("load_in_4bit", "load_in_8bit", "merge_adapter"):
            if getattr(cfg, name):
                raise ValueError(f"{_flag(name)} needs --lora (a quantized or merged base only makes sense with "
                                 f"an adapter)")


def to_dict(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}

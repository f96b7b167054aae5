"""``ptk pipeline``: the whole post-training stack in one command, on the embedded task world, on a laptop CPU.

    ptk pipeline --preset quick --output-dir runs/pipeline

1. data      the task world (``taskworld.write_world``): corpus, SFT, preference, RL, red-team and eval sets
2. base      stage 0: pretrain a small random Llama on the raw corpus (no chat format)
3. sft       prompt-masked SFT on conversations: the assistant format and refusals (few demonstrations of the
             ``SCARCE`` task families, which GRPO then learns from the verifiers' rewards)
4. reward    a Bradley-Terry reward model on the preference pairs, from the SFT model
5. ppo       RLHF from the SFT model against that reward model
6. dpo       DPO from the same SFT model on the same pairs (so PPO and DPO can be compared)
7. grpo      GRPO from the SFT model with the verifiers (math, exact) on the RL prompts, plus the SFT loss on
             the SFT demonstrations (PPO-ptx) so what the rewards do not train does not drift
8. safety    constitutional training (rule judge) from the GRPO model
9. eval      every stage on the held-out sets (``evaluate``), then report.json, report.md and plots/

Each stage leaves a Hugging Face folder in ``output_dir/<stage>``. A stage whose folder already holds a model
is skipped with ``--resume`` (so a stopped pipeline picks up where it was). ``--preset full`` trains longer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass, field

from .config import (
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    PretrainConfig,
    RewardConfig,
    SafetyConfig,
    SFTConfig,
)

# Task families with verifiable answers but few SFT demonstrations (a factor on their share of the SFT mix), as
# demonstrations cost and verifiable prompts do not: GRPO teaches them from the verifiers' reward (its prompts
# cover every family).
SCARCE = {"first": 0.05, "last": 0.05, "length": 0.05, "count": 0.05}
# Rate of SFT demonstrations that hedge ("Let me think. Answer: 42") per task group: above one half on arithmetic,
# so the SFT model's greedy answer hedges there and the preference stages have something measurable to fix.
HEDGING = {"arithmetic": 0.7, "string": 0.2, "benign": 0.2}

# Per preset: the model size, the world's sizes and each stage's options (on top of the shared ones).
PRESETS = {
    "quick": {
        "model": "small", "eval": {"n_task": 200, "n_safety": 50}, "sft_verbose": HEDGING, "sft_scarce": SCARCE,
        # Fresh data over repeated data: ~1.2 epochs of pretraining corpus and ~3 of SFT rows, so the model has to
        # learn the tasks' rules rather than memorise answers (10+ epochs over a small set did the latter).
        "world": {"pretrain": 40000, "sft": 16000, "preference": 1000, "kto": 200, "rl": 4000, "redteam": 256},
        "pretrain": {"max_steps": 2000, "batch_size": 16, "max_length": 128, "lr": 3e-3, "warmup_steps": 50},
        "sft": {"max_steps": 1500, "batch_size": 32, "lr": 1e-3, "warmup_steps": 50},
        "reward": {"max_steps": 150, "batch_size": 16, "lr": 5e-4},
        # PPO learns to drop the hedge within ~50 steps (score -0.3 -> 2.5) and plateaus by ~100. lr 3e-5 keeps SFT's
        # accuracy (1e-4 won as often but lost 3-6 points of it, KL to SFT 1.1-2.9): 150 steps won 65-67% from the
        # seed-0 and seed-1 SFT models at sampling seeds 0, 1, 2.
        "ppo": {"max_steps": 150, "prompts_per_step": 32, "lr": 3e-5, "max_new_tokens": 24, "ppo_epochs": 2,
                "kl_coef": 0.1, "whiten_rewards": True},
        "dpo": {"max_steps": 150, "batch_size": 16, "lr": 3e-5, "beta": 0.1, "nll_weight": 1.0},
        # 16 samples of 8 prompts (not 8 of 16): more of the rare right answers of a weak family are found per
        # step, in 3-10% less time. GRPO's gain is step-limited here: from seed 0's SFT model +6.5 points at 600
        # steps, +9.5 at 1,200, +10 to +11.5 at 1,500 (with dynamic sampling). Without dynamic sampling a step
        # samples half as many rows and --skip-zero-advantage leaves the groups of equal rewards (~60% of them)
        # out of the training forward, so a step takes 0.18 s instead of 0.25 s: 2,100 steps without it (388 s)
        # reached 33.5% where 1,600 with it (405 s) reached 32.25% (2,800: 36.7%), from the same SFT model at
        # 22.5%. A constant lr (29.7%) and two optimizer steps per rollout (32.8% in 474 s) did worse.
        # PPO-ptx: the SFT loss on 16 demonstrations a step keeps what the rewards do not train (groups all right
        # or all wrong carry no gradient) from drifting: +11.5 points instead of +7 from seed 1's SFT model, about
        # the same (+6.7 / +6.5) from seed 0's; refusals and KL to SFT stay near the SFT model's in both.
        "grpo": {"max_steps": 2200, "prompts_per_step": 8, "num_generations": 16, "lr": 3e-4, "max_new_tokens": 24,
                 "dynamic_sampling": False, "scale_rewards": "batch", "batch_size": 32, "ptx_coef": 0.5,
                 "ptx_batch_size": 16, "generation_batch_size": 256},
        "safety": {"max_steps": 60, "dpo_steps": 40, "lr": 5e-4, "dpo_lr": 3e-5, "batch_size": 16},
    },
    "full": {
        "model": "base", "eval": {"n_task": 200, "n_safety": 64}, "sft_verbose": HEDGING, "sft_scarce": SCARCE,
        "world": {"pretrain": 80000, "sft": 32000, "preference": 3000, "kto": 500, "rl": 8000, "redteam": 512},
        "pretrain": {"max_steps": 2000, "batch_size": 32, "max_length": 128, "lr": 2e-3, "warmup_steps": 100},
        "sft": {"max_steps": 1200, "batch_size": 32, "lr": 1e-3, "warmup_steps": 50},
        "reward": {"max_steps": 400, "batch_size": 32, "lr": 3e-4},
        "ppo": {"max_steps": 200, "prompts_per_step": 32, "lr": 2e-5, "max_new_tokens": 24, "ppo_epochs": 2},
        "dpo": {"max_steps": 400, "batch_size": 32, "lr": 5e-5, "beta": 0.1},
        "grpo": {"max_steps": 200, "prompts_per_step": 16, "num_generations": 8, "lr": 3e-5,
                 "max_new_tokens": 16},
        "safety": {"max_steps": 150, "dpo_steps": 100, "lr": 3e-4, "dpo_lr": 3e-5, "batch_size": 32},
    },
}
EVAL_STAGES = ("base", "sft", "dpo", "ppo", "grpo", "safety")


@dataclass
class PipelineOptions:
    preset: str = "quick"
    output_dir: str = "runs/pipeline"
    seed: int = 0
    resume: bool = False
    backend: str = "auto"
    progress: bool = True
    overrides: dict = field(default_factory=dict)  # merged into the preset: {"model": "tiny", "sft": {...}, ...}


def _shared(opts: PipelineOptions) -> dict:
    return {"seed": opts.seed, "backend": opts.backend, "progress": opts.progress, "overwrite": True,
            "log_steps": 5}


class Pipeline:
    def __init__(self, opts: PipelineOptions):
        if opts.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {list(PRESETS)}, got {opts.preset!r}")
        self.opts, self.preset = opts, _merge(PRESETS[opts.preset], opts.overrides)
        self.out = opts.output_dir
        self.times: dict[str, float] = {}
        self.curves: dict[str, str] = {}

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def options(self, stage: str) -> dict:
        return {**_shared(self.opts), **self.preset[stage]}

    def done(self, stage_dir: str) -> bool:
        return os.path.exists(os.path.join(stage_dir, "model.safetensors"))

    def stage(self, name: str, run, cfg, folder: str | None = None) -> None:
        """Runs one training stage (skipped when resuming and its model exists), timing it."""
        folder = folder or cfg.output_dir
        self.curves[name] = os.path.join(folder, "metrics.jsonl")
        if self.opts.resume and self.done(folder):
            print(f"ptk pipeline: {name}: kept {folder}")
            return
        print(f"ptk pipeline: {name} -> {folder}")
        t0 = time.perf_counter()
        run(cfg)
        self.times[name] = round(time.perf_counter() - t0, 1)

    def run(self) -> dict:
        from . import dpo, grpo, ppo, pretrain, reward, safety, sft
        from .taskworld import write_world

        t_start = time.perf_counter()
        os.makedirs(self.out, exist_ok=True)
        world = write_world(self.path("data"), seed=self.opts.seed, sizes=self.preset["world"],
                            sft_verbose=self.preset["sft_verbose"], sft_scarce=self.preset["sft_scarce"])
        p, d = self.path, world
        self.stage("pretrain", pretrain.run, PretrainConfig(model=self.preset["model"], data=d["pretrain"],
                                                            output_dir=p("base"), **self.options("pretrain")))
        self.stage("sft", sft.run, SFTConfig(model=p("base"), data=d["sft"], output_dir=p("sft"),
                                             **self.options("sft")))
        self.stage("reward", reward.run, RewardConfig(model=p("sft"), data=d["preference"], output_dir=p("reward"),
                                                      **self.options("reward")))
        self.stage("ppo", ppo.run, PPOConfig(model=p("sft"), reward_model=p("reward"), data=d["rl"],
                                             output_dir=p("ppo"), **self.options("ppo")))
        self.stage("dpo", lambda c: dpo.run(c, "dpo"), DPOConfig(model=p("sft"), data=d["preference"],
                                                                 output_dir=p("dpo"), **self.options("dpo")))
        self.stage("grpo", grpo.run, GRPOConfig(model=p("sft"), data=d["rl"], output_dir=p("grpo"), verifier="row",
                                                ptx_data=d["sft"], **self.options("grpo")))
        self.stage("safety", safety.run, SafetyConfig(model=p("grpo"), data=d["redteam"], output_dir=p("safety"),
                                                      constitution=d["constitution"], judge="rule",
                                                      **self.options("safety")))
        self.curves["safety_sft"] = p("safety", "sl_cai", "metrics.jsonl")
        self.curves["safety_dpo"] = self.curves.pop("safety")

        t0 = time.perf_counter()
        evals = self.evaluate()
        self.times["eval"] = round(time.perf_counter() - t0, 1)
        return self.report(evals, time.perf_counter() - t_start)

    def evaluate(self) -> dict:
        """Every stage's model on the held-out sets, against the SFT model (rule judge and reward model)."""
        from .evaluate import evaluate
        from .modeling import load_causal_lm, load_sequence_classifier
        from .rollout import SamplingConfig
        from .taskworld import eval_sets

        sets = eval_sets(self.opts.seed, **self.preset["eval"])
        sft_model, _ = load_causal_lm(self.path("sft"))
        rm, rm_tok = load_sequence_classifier(self.path("reward"))
        sampling = SamplingConfig(do_sample=False, max_new_tokens=48, batch_size=64)
        evals = {}
        for stage in EVAL_STAGES:
            model, tok = load_causal_lm(self.path(stage))
            print(f"ptk pipeline: eval {stage}")
            evals[stage] = evaluate(model, tok, sets, sft_model=sft_model, reward_model=rm, reward_tokenizer=rm_tok,
                                    sampling=sampling, backend=self.opts.backend)
        with open(self.path("evals.json"), "w", encoding="utf-8") as f:
            json.dump(evals, f, indent=2)
        return evals

    def report(self, evals: dict, seconds: float) -> dict:
        import torch
        import transformers

        from .report import write_report

        meta = {"preset": self.opts.preset, "seed": self.opts.seed, "machine": _machine(),
                "total_seconds": round(seconds, 1), "stage_seconds": self.times,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "python": platform.python_version()}}
        paths = write_report(self.out, evals, self.curves, meta=meta)
        print(f"ptk pipeline: done in {seconds / 60:.1f} min; report: {paths['md']}")
        return {"evals": evals, "meta": meta, "paths": paths}


def _merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, one level of nested dicts deep."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptk pipeline", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="quick", choices=list(PRESETS), help="how long each stage trains")
    parser.add_argument("--output-dir", default="runs/pipeline", help="where every stage, the data and the "
                        "report go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task world, the models and sampling")
    parser.add_argument("--resume", action="store_true", help="keep the stages whose model already exists")
    parser.add_argument("--backend", default="auto", help="ptkernels backend for the fused losses")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    Pipeline(PipelineOptions(preset=args.preset, output_dir=args.output_dir, seed=args.seed, resume=args.resume,
                             backend=args.backend, progress=args.progress)).run()
    return 0

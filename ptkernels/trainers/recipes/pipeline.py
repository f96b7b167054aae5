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
is skipped with ``--resume``, and a stage that stopped part way continues from its latest checkpoint (so a stopped
pipeline picks up where it was). ``--preset full`` trains longer.

The presets are ``ptkernels/trainers/configs/pipeline/{quick,full}.yaml``; ``--config FILE.yaml`` merges a file of
the same shape over the chosen preset (each stage's options one level deep), plus any of this command's own options
(``output_dir``, ``seed``, ``resume``, ``backend``, ``progress``), which the command line overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field

from ..engine.checkpoint import list_checkpoints
from ..engine.config import (
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    PretrainConfig,
    RewardConfig,
    SafetyConfig,
    SFTConfig,
    load_yaml,
    shipped_config,
)

# The presets are YAML files a user can copy and edit (configs/pipeline/NAME.yaml): the model size, the world's
# sizes and each stage's options (on top of the shared ones).
PRESETS = {name: load_yaml(shipped_config(f"pipeline/{name}.yaml")) for name in ("quick", "full")}
# keys of a --config file that are not preset
RUN_OPTIONS = ("output_dir", "seed", "resume", "backend", "progress", "lora", "rollout_engine")
EVAL_STAGES = ("base", "sft", "dpo", "ppo", "grpo", "safety")


@dataclass
class PipelineOptions:
    preset: str = "quick"
    output_dir: str = "runs/pipeline"
    seed: int = 0
    resume: bool = False
    backend: str = "auto"
    progress: bool = True
    rollout_engine: str = "kv_cache"  # what samples in ppo, grpo, safety and the evaluation ("vllm": vLLM)
    overrides: dict = field(default_factory=dict)  # merged into the preset: {"model": "tiny", "sft": {...}, ...}
    lora: bool = False  # every post-training stage trains a LoRA adapter (pretraining, which makes the base, does not)


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
        # --lora: an adapter per post-training stage, merged (output_dir/merged) so the next stage and the evaluation
        # load a plain model; the stage's own options (e.g. lora_r) still win
        lora = {"lora": True, "merge_adapter": True} if self.opts.lora and stage != "pretrain" else {}
        sampling = {"rollout_engine": self.opts.rollout_engine} if stage in ("ppo", "grpo", "safety") else {}
        return {**_shared(self.opts), **lora, **sampling, **self.preset[stage]}

    def done(self, stage_dir: str) -> bool:
        return any(os.path.exists(os.path.join(stage_dir, f)) for f in ("model.safetensors",
                                                                        "adapter_model.safetensors"))

    def continued(self, name: str, cfg, folder: str):
        """``cfg`` set to continue a stage that stopped part way (its latest checkpoint), so --resume loses no
        finished steps. Safety resumes each of its two training stages from its own checkpoints."""
        if name != "safety":
            found = list_checkpoints(folder)
            if not found:
                return cfg
            print(f"ptk pipeline: {name}: continuing from {found[-1]}")
        return dataclasses.replace(cfg, resume="latest")

    def stage(self, name: str, run, cfg, folder: str | None = None) -> None:
        """Runs one training stage (skipped when resuming and its model exists), timing it."""
        folder = folder or cfg.output_dir
        self.curves[name] = os.path.join(folder, "metrics.jsonl")
        if self.opts.resume and self.done(folder):
            print(f"ptk pipeline: {name}: kept {folder}")
            return
        if self.opts.resume:
            cfg = self.continued(name, cfg, folder)
        print(f"ptk pipeline: {name} -> {folder}")
        t0 = time.perf_counter()
        run(cfg)
        self.times[name] = round(time.perf_counter() - t0, 1)

    def run(self) -> dict:
        from ..taskworld import write_world
        from . import dpo, grpo, ppo, pretrain, reward, safety, sft

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
        from ..modeling import load_causal_lm, load_sequence_classifier
        from ..rollout.engines import make_engine
        from ..rollout.sampling import SamplingConfig
        from ..taskworld import eval_sets
        from .evaluate import evaluate

        sets = eval_sets(self.opts.seed, **self.preset["eval"])
        sft_model, _ = load_causal_lm(self.path("sft"))
        rm, rm_tok = load_sequence_classifier(self.path("reward"))
        sampling = SamplingConfig(do_sample=False, max_new_tokens=48, batch_size=64)
        evals = {}
        for stage in EVAL_STAGES:
            model, tok = load_causal_lm(self.path(stage))
            print(f"ptk pipeline: eval {stage}")
            engine = make_engine(self.opts.rollout_engine, model, tok, model_dir=self.path(stage),
                                 max_model_len=256 + sampling.max_new_tokens, seed=self.opts.seed)
            evals[stage] = evaluate(model, tok, sets, sft_model=sft_model, reward_model=rm, reward_tokenizer=rm_tok,
                                    sampling=sampling, backend=self.opts.backend, engine=engine)
            del engine  # a vLLM engine's memory back before the next stage's
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
    parser.add_argument("--config", default=None, help="a YAML file merged over the preset (the shape of "
                        "configs/pipeline/quick.yaml; it may hold only what it changes) and holding any of this "
                        "command's options; the command line overrides it")
    parser.add_argument("--output-dir", default="runs/pipeline", help="where every stage, the data and the "
                        "report go")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task world, the models and sampling")
    parser.add_argument("--resume", action="store_true", help="keep the stages whose model already exists and "
                        "continue a stage that stopped part way from its latest checkpoint")
    parser.add_argument("--backend", default="auto", help="ptkernels backend for the fused losses")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    parser.add_argument("--lora", action="store_true", help="every post-training stage trains a LoRA adapter (PEFT; "
                        "the stages' default --lora-* options, merged into output_dir/STAGE/merged for the next "
                        "stage); pretraining, which makes the base model, trains all weights")
    parser.add_argument("--rollout-engine", default="kv_cache", choices=("kv_cache", "hf", "vllm"),
                        help="what samples in ppo, grpo, safety and the evaluation (vllm: docs/vllm.md)")
    return parser


def options_from_args(argv: list[str]) -> PipelineOptions:
    """The run's options: the command line over ``--config``'s own options; the rest of the file overrides the
    preset's stages."""
    parser = build_parser()
    pre = parser.parse_args(argv)  # which file, if any
    overrides = {}
    if pre.config:
        data = load_yaml(pre.config)
        run = {k.replace("-", "_"): v for k, v in data.items() if k.replace("-", "_") in RUN_OPTIONS}
        overrides = {k: v for k, v in data.items() if k.replace("-", "_") not in RUN_OPTIONS}
        unknown = sorted(set(overrides) - set(PRESETS[pre.preset]))
        if unknown:
            raise ValueError(f"{pre.config}: unknown key(s) {unknown} for ptk pipeline (a preset's keys: "
                             f"{', '.join(PRESETS[pre.preset])}; or one of {', '.join(RUN_OPTIONS)})")
        parser.set_defaults(**run)
    args = parser.parse_args(argv)
    return PipelineOptions(preset=args.preset, output_dir=args.output_dir, seed=args.seed, resume=args.resume,
                           backend=args.backend, progress=args.progress, overrides=overrides, lora=args.lora,
                           rollout_engine=args.rollout_engine)


def main(argv: list[str]) -> int:
    Pipeline(options_from_args(argv)).run()
    return 0

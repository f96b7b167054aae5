"""The `ptk` command. Each sub-command lives in its own module; this file only dispatches.

    ptk check        a quick tour: fused vs eager linear cross-entropy on this machine
    ptk pretrain / sft / reward / dpo / orpo / simpo / kto / grpo / ppo / safety / pipeline / eval
                     the trainers (ptkernels/trainers/recipes/)
    ptk vllm-serve   a vLLM rollout server for --rollout-engine vllm --vllm-server HOST:PORT
"""

from __future__ import annotations

import sys

COMMANDS = {
    "pipeline": ("ptkernels.trainers.recipes.pipeline", "the whole stack on the embedded task world, with a report"),
    "check": ("ptkernels.check", "fused vs eager linear cross-entropy on this machine (time, memory, loss)"),
    "pretrain": ("ptkernels.trainers.recipes.pretrain", "stage 0: next-token pretraining on raw text"),
    "sft": ("ptkernels.trainers.recipes.sft", "supervised fine-tuning, prompt-masked"),
    "reward": ("ptkernels.trainers.recipes.reward", "Bradley-Terry reward model on preference pairs"),
    "dpo": ("ptkernels.trainers.recipes.dpo", "DPO family (--loss-type) on preference pairs"),
    "orpo": ("ptkernels.trainers.recipes.dpo:main_orpo", "ORPO on preference pairs (no reference model)"),
    "simpo": ("ptkernels.trainers.recipes.dpo:main_simpo", "SimPO on preference pairs (no reference model)"),
    "kto": ("ptkernels.trainers.recipes.kto", "KTO on unpaired desirable / undesirable completions"),
    "grpo": ("ptkernels.trainers.recipes.grpo", "GRPO: group sampling, verifiable rewards, group advantages"),
    "ppo": ("ptkernels.trainers.recipes.ppo", "RLHF with PPO: reward model, critic, KL penalty, GAE"),
    "safety": ("ptkernels.trainers.recipes.safety", "constitutional AI: critique-and-revise SFT, then AI-judged DPO"),
    "eval": ("ptkernels.trainers.recipes.evaluate", "held-out evaluation of a model on the task world"),
    "check-sandbox": ("ptkernels.trainers.rewards.sandbox:main", "which isolation the code reward's sandbox has here"),
    "merge": ("ptkernels.trainers.lora:main_merge", "merge a LoRA adapter (ptk STAGE --lora) into its base model"),
    "vllm-serve": ("ptkernels.trainers.rollout.vllm_server", "serve rollouts from a vLLM engine (--vllm-server)"),
}


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, OSError)


def main(argv=None) -> int:
    """``ptk COMMAND [options]``. From the console (``argv`` None) a user error is one line
    (``ptk: error: --lr must be finite and > 0 (got inf)``) and the traceback shows only with ``--debug``; called
    with an ``argv`` list (from Python) errors are raised as they are."""
    console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"ptk (ptkernels) {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ptk COMMAND [options]   (ptk COMMAND --help for its options; --debug shows tracebacks)\n\n"
              "commands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<12}{doc}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ptk: error: unknown command {name!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    module, _, func = COMMANDS[name][0].partition(":")
    try:
        return int(getattr(importlib.import_module(module), func or "main")(rest) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from .trainers.engine.loop import Interrupted

        if isinstance(exc, Interrupted):
            print(exc, file=sys.stderr)
            return 128 + exc.signum
        if not console or debug or not isinstance(exc, USER_ERRORS):
            raise
        print(f"ptk: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

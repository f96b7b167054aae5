"""``ptk sft``: supervised fine-tuning with prompt masking.

Rows in TRL's formats, trained as TRL 1.16's SFTTrainer trains them: ``text`` and ``messages`` (every token;
``--assistant-only-loss``: the assistant turns) or ``prompt``/``completion`` (the completion; all of it with
``--no-completion-only-loss``), conversational or plain. ``--packing`` packs several
examples per row with position ids restarting per example (Transformers then masks attention per example for
every attention implementation, see tokenization.collate). The loss is ptkernels' fused linear cross-entropy.
"""

from __future__ import annotations

from ..data.rows import load_data
from ..data.tokenization import collate, encode_all, encode_sft, pack
from ..engine.config import SFTConfig, parse_config
from ..engine.distributed import init_distributed, shutdown
from ..engine.loop import Dataset, TrainResult, train
from ..lora import load_policy
from ..modeling import CausalLMLoss, packing_keeps_documents_apart

SFT_FORMATS = ("text", "messages", "prompt_completion")


def run(cfg: SFTConfig) -> TrainResult:
    info = init_distributed()
    try:
        rows, fmt = load_data(cfg, SFT_FORMATS, info)
        model, tokenizer = load_policy(cfg)
        examples = encode_all(rows, lambda r: encode_sft(r, tokenizer, max_length=cfg.max_length,
                                                          truncation=cfg.truncation, fmt=fmt,
                                                          assistant_only_loss=cfg.assistant_only_loss,
                                                          completion_only_loss=cfg.completion_only_loss),
                              "examples", info)
        if cfg.packing:
            apart, moved = packing_keeps_documents_apart(model)
            if not apart:
                raise ValueError(f"--packing: {type(model).__name__} does not keep packed examples apart (it ignores "
                                 f"the restarting position ids; a packed example's log-probs moved by {moved:.2g}): "
                                 "run without --packing")
            examples = pack(examples, cfg.max_length)
        data = Dataset(examples, lambda ex: collate(ex, tokenizer.pad_token_id), cfg.seed)
        return train(cfg, CausalLMLoss(model, cfg.backend), data, tokenizer, info, stage="sft")
    finally:
        shutdown(info)


def main(argv: list[str]) -> int:
    run(parse_config(SFTConfig, argv, prog="ptk sft"))
    return 0

"""``ptk pretrain``: stage 0, plain next-token prediction on raw text (``{"text": ...}`` rows).

The texts are joined (each followed by eos) and cut into ``--max-length`` blocks, nanoGPT-style; every token is
trained. The loss is ptkernels' fused linear cross-entropy: no ``[tokens, vocab]`` logits.
"""

from __future__ import annotations

from ..data.rows import load_data
from ..data.tokenization import collate, encode_pretrain_stream
from ..engine.config import PretrainConfig, parse_config
from ..engine.distributed import init_distributed, shutdown
from ..engine.loop import Dataset, TrainResult, train
from ..lora import load_policy
from ..modeling import CausalLMLoss


def run(cfg: PretrainConfig) -> TrainResult:
    info = init_distributed()
    try:
        rows, _ = load_data(cfg, ("text",), info)
        model, tokenizer = load_policy(cfg)
        blocks = encode_pretrain_stream(rows, tokenizer, block_size=cfg.max_length)
        data = Dataset(blocks, lambda ex: collate(ex, tokenizer.pad_token_id), cfg.seed)
        return train(cfg, CausalLMLoss(model, cfg.backend), data, tokenizer, info, stage="pretrain")
    finally:
        shutdown(info)


def main(argv: list[str]) -> int:
    run(parse_config(PretrainConfig, argv, prog="ptk pretrain"))
    return 0

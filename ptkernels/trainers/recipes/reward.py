"""``ptk reward``: a Bradley-Terry reward model on preference pairs (``prompt``/``chosen``/``rejected``).

The model is ``AutoModelForSequenceClassification`` with one output (a new score head on the ``--model``
causal LM), its reward the score at the last non-padding token. Per pair:
    loss = -log sigmoid(r_chosen - r_rejected - margin) + center_rewards_coefficient * (r_chosen + r_rejected)^2
with ``margin`` from the row's ``--margin-field`` when present (Llama 2's margin loss), else 0 — TRL's
RewardTrainer. The output folder loads with ``AutoModelForSequenceClassification.from_pretrained``. No
vocabulary-sized logits exist here: the score head is [D, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.rows import load_data
from ..data.tokenization import collate_pairs, encode_all, encode_preference, pairs_in
from ..engine.config import RewardConfig, parse_config
from ..engine.distributed import init_distributed, shutdown
from ..engine.loop import Dataset, TrainResult, train
from ..lora import load_policy
from ..modeling import TrainingModule


class RewardLoss(TrainingModule):
    def __init__(self, model, center_rewards_coefficient: float = 0.0):
        super().__init__(model)
        self.center = center_rewards_coefficient

    def count(self, batch: dict) -> float:
        return pairs_in(batch)

    def forward(self, batch: dict, norm: float):
        rewards = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).logits.squeeze(-1).float()
        chosen, rejected = rewards.chunk(2)
        margin = batch.get("margin")
        diff = chosen - rejected - (0.0 if margin is None else margin.to(chosen))
        losses = -F.logsigmoid(diff)
        if self.center:
            losses = losses + self.center * (chosen + rejected) ** 2
        d = (chosen - rejected).detach()
        metrics = {"accuracy": (d > 0).float().sum(), "margin": d.sum(),
                   "chosen_reward": chosen.detach().sum(), "rejected_reward": rejected.detach().sum()}
        return losses.sum() / norm, metrics


def _collate(examples, pad_id: int) -> dict:
    batch = collate_pairs([pair for pair, _ in examples], pad_id)
    if any(m is not None for _, m in examples):
        batch["margin"] = torch.tensor([m or 0.0 for _, m in examples], dtype=torch.float32)
    return batch


def run(cfg: RewardConfig) -> TrainResult:
    info = init_distributed()
    try:
        rows, _ = load_data(cfg, ("preference",), info)
        model, tokenizer = load_policy(cfg, task="SEQ_CLS")  # --lora: the new score head trains in full

        def encode(row):
            pair = encode_preference(row, tokenizer, max_length=cfg.max_length, truncation=cfg.truncation)
            margin = row.data.get(cfg.margin_field)
            if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
                raise ValueError(f"{row.source}: field {cfg.margin_field!r} must be a number, got {margin!r}")
            return None if pair is None else (pair, None if margin is None else float(margin))

        examples = encode_all(rows, encode, "pairs", info)
        data = Dataset(examples, lambda ex: _collate(ex, tokenizer.pad_token_id), cfg.seed)
        return train(cfg, RewardLoss(model, cfg.center_rewards_coefficient), data, tokenizer, info, stage="reward")
    finally:
        shutdown(info)


def main(argv: list[str]) -> int:
    run(parse_config(RewardConfig, argv, prog="ptk reward"))
    return 0

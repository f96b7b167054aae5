"""``ptk kto``: KTO (Ethayarajh et al.; TRL's KTOTrainer) on unpaired ``prompt``/``completion``/``label`` rows.

Per micro-batch: one forward of the policy over the examples up to the final hidden states, one no-grad forward
over their KL partners (each prompt with another example's completion, fixed when the data is encoded: example
i borrows the completion of example i + 1), then ``ptkernels.fused_linear_kto_loss``, which turns both into the
loss and its gradient without the ``[tokens, vocab]`` logits. The reference point z0 = clamp(mean over the
micro-batch of (pi - ref) on the partners, 0), as TRL computes it per batch.

Reference log-probs (``--ref-model``, default the initial policy) are precomputed for the examples and their
partners before training (``--ref-mode precompute``) or scored live by a frozen copy (``--ref-mode live``).
"""

from __future__ import annotations

import torch

import ptkernels as ptk

from ..data.rows import load_data
from ..data.tokenization import IGNORE_INDEX, Encoded, collate, encode_all, encode_unpaired
from ..engine.config import KTOConfig, parse_config
from ..engine.distributed import DistInfo, init_distributed, shutdown
from ..engine.loop import Dataset, TrainResult, autocast, train
from ..lora import load_policy
from ..modeling import ReferenceModel, TrainingModule, head_inputs, hidden_states


def _split(e: Encoded) -> int:
    """Where the completion starts: the first trained token."""
    return next(i for i, label in enumerate(e.labels) if label != IGNORE_INDEX)


def kl_partner(prompt_of: Encoded, completion_of: Encoded, max_length: int) -> Encoded:
    """``prompt_of``'s prompt followed by ``completion_of``'s completion, cut from the left to ``max_length``."""
    p, c = _split(prompt_of), _split(completion_of)
    ids = prompt_of.input_ids[:p] + completion_of.input_ids[c:]
    labels = [IGNORE_INDEX] * p + completion_of.labels[c:]
    return Encoded(ids[-max_length:], labels[-max_length:])


class KTOLoss(TrainingModule):
    def __init__(self, model, cfg: KTOConfig, ref: ReferenceModel | None = None):
        super().__init__(model)
        self.cfg = cfg
        self.ref = ref  # scores each micro-batch live (--ref-mode live); None: precomputed

    def count(self, batch: dict) -> float:
        return batch["input_ids"].shape[0]

    def forward(self, batch: dict, norm: float):
        c = self.cfg
        kl_batch = {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"]}
        hidden, weight, head = head_inputs(self.model, hidden_states(self.model, batch))
        with torch.no_grad():
            kl_hidden, _, _ = head_inputs(self.model, hidden_states(self.model, kl_batch))
        ref = {}
        if "ref_logps" in batch:
            ref = {"ref_logps": batch["ref_logps"], "ref_kl_logps": batch["ref_kl_logps"]}
            if c.average_log_prob:  # the precomputed sums, averaged over the (shifted) completion tokens
                for key, labels in (("ref_logps", batch["labels"]), ("ref_kl_logps", batch["kl_labels"])):
                    ref[key] = ref[key] / (labels[:, 1:] != -100).sum(1).clamp(min=1).to(ref[key].dtype)
        elif self.ref is not None:
            ref = self.ref.fused_inputs(batch)
            ref["ref_kl_hidden"] = self.ref.head_inputs(kl_batch)[0]
        out = ptk.fused_linear_kto_loss(hidden, weight, batch["labels"], batch["desirable"], kl_hidden=kl_hidden,
                                        kl_labels=batch["kl_labels"], beta=c.beta, desirable_weight=c.desirable_weight,
                                        undesirable_weight=c.undesirable_weight, shift=True, backend=c.backend,
                                        average_log_prob=c.average_log_prob,
                                        **head, **ref)
        n = batch["input_ids"].shape[0]
        metrics = {"chosen_reward": out.chosen_rewards.sum(), "rejected_reward": out.rejected_rewards.sum(),
                   "kl": out.kl.detach() * n, "desirable": batch["desirable"].float().sum()}
        return out.loss * (n / norm), metrics


def _collate(examples: list, pad_id: int) -> dict:
    batch = collate([e["example"] for e in examples], pad_id)
    kl = collate([e["kl"] for e in examples], pad_id)
    batch.update(kl_input_ids=kl["input_ids"], kl_attention_mask=kl["attention_mask"], kl_labels=kl["labels"],
                 desirable=torch.tensor([e["desirable"] for e in examples]))
    if "ref" in examples[0]:
        batch["ref_logps"] = torch.tensor([e["ref"] for e in examples], dtype=torch.float32)
        batch["ref_kl_logps"] = torch.tensor([e["ref_kl"] for e in examples], dtype=torch.float32)
    return batch


@torch.no_grad()
def reference_logps(ref: ReferenceModel, examples: list, cfg: KTOConfig, pad_id: int, info: DistInfo) -> None:
    """Adds each example's and its partner's summed reference log-probs."""
    ref.model.to(info.device).eval()
    for key, out in (("example", "ref"), ("kl", "ref_kl")):
        for i in range(0, len(examples), cfg.batch_size):
            chunk = examples[i:i + cfg.batch_size]
            batch = {k: v.to(info.device) for k, v in collate([e[key] for e in chunk], pad_id).items()}
            with autocast(cfg, info.device):
                logps = ref.summed_logps(batch, cfg.backend).float().cpu().tolist()
            for e, v in zip(chunk, logps):
                e[out] = v


def run(cfg: KTOConfig) -> TrainResult:
    info = init_distributed()
    try:
        rows, _ = load_data(cfg, ("unpaired_preference",), info)
        model, tokenizer = load_policy(cfg)
        encoded = encode_all(rows, lambda r: encode_unpaired(r, tokenizer, max_length=cfg.max_length,
                                                             truncation=cfg.truncation), "examples", info)
        n = len(encoded)
        examples = [{"example": e, "desirable": d, "kl": kl_partner(e, encoded[(i + 1) % n][0], cfg.max_length)}
                    for i, (e, d) in enumerate(encoded)]
        ref = ReferenceModel.load(cfg, info, policy=model)  # with --lora: the policy, adapter off
        if cfg.ref_mode == "precompute":
            reference_logps(ref, examples, cfg, tokenizer.pad_token_id, info)
            ref = None  # not held during training
        data = Dataset(examples, lambda ex: _collate(ex, tokenizer.pad_token_id), cfg.seed)
        return train(cfg, KTOLoss(model, cfg, ref), data, tokenizer, info, stage="kto")
    finally:
        shutdown(info)


def main(argv: list[str]) -> int:
    run(parse_config(KTOConfig, argv, prog="ptk kto"))
    return 0

"""``ptk dpo`` (and ``ptk orpo``, ``ptk simpo``): preference optimization on ``prompt``/``chosen``/``rejected``.

Each micro-batch is one forward of the policy over ``[chosen; rejected]`` up to its final hidden states, then
``ptkernels.fused_linear_preference_loss``: the sequence log-probs, the loss and its gradient, chunk by chunk,
without the ``[tokens, vocab]`` logits. ``--loss-type`` picks the DPO family member (sigmoid = DPO, ipo, hinge,
robust, exo_pair, bco_pair, apo_zero, apo_down); ``ptk orpo`` and ``ptk simpo`` are reference-free.

The reference model (``--ref-model``, default: the initial policy):
    --ref-mode precompute  (default) scores every pair once before training and keeps only the numbers, so no
                           reference model is held during training;
    --ref-mode live        keeps a frozen copy and scores each micro-batch inside the same fused chunk loop.
"""

from __future__ import annotations

import torch

from ..ops.fused_preference import fused_linear_preference_loss
from .common import encode_all, head_inputs, hidden_states, load_data, load_reference, pairs_in
from .config import DPOConfig, ORPOConfig, PreferenceConfig, SimPOConfig, parse_config
from .distributed import DistInfo, init_distributed, shutdown
from .loop import Dataset, TrainingModule, TrainResult, autocast, train
from .modeling import load_causal_lm
from .tokenization import collate_pairs, encode_preference

REFERENCE_FREE = ("orpo", "simpo")


class PreferenceLoss(TrainingModule):
    def __init__(self, model, cfg: PreferenceConfig, ref_model=None):
        super().__init__(model)
        self.cfg = cfg
        # A frozen reference is not a submodule: it is neither trained, nor wrapped, nor saved.
        self._ref = [ref_model] if ref_model is not None else []

    def count(self, batch: dict) -> float:
        return pairs_in(batch)

    def loss_options(self) -> dict:
        c = self.cfg
        return dict(loss_type=c.loss_type, beta=c.beta, label_smoothing=c.label_smoothing,
                    simpo_gamma=c.simpo_gamma, nll_weight=c.nll_weight or None, shift=True, backend=c.backend)

    def forward(self, batch: dict, norm: float):
        hidden, weight, head = head_inputs(self.model, hidden_states(self.model, batch))
        ref = {}
        if "ref_chosen_logps" in batch:
            ref = {"ref_chosen_logps": batch["ref_chosen_logps"], "ref_rejected_logps": batch["ref_rejected_logps"]}
        elif self._ref:
            ref_model = self._ref[0]
            with torch.no_grad():
                ref_hidden, ref_weight, ref_head = head_inputs(ref_model, hidden_states(ref_model, batch))
            ref = {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_head["bias"]}
        out = fused_linear_preference_loss(hidden, weight, batch["labels"], **head, **ref, **self.loss_options())
        pairs = pairs_in(batch)
        metrics = {"accuracy": out.reward_accuracy * pairs, "margin": out.reward_margin * pairs,
                   "chosen_reward": out.chosen_rewards.sum(), "rejected_reward": out.rejected_rewards.sum(),
                   "chosen_logp": out.chosen_logps.sum(), "rejected_logp": out.rejected_logps.sum()}
        if out.nll_loss is not None:
            metrics["nll"] = out.nll_loss.detach() * pairs
        # The fused loss is the mean over this micro-batch's pairs: back to a sum, over the step's pairs.
        return out.loss * (pairs / norm), metrics


@torch.no_grad()
def reference_logps(model, examples: list, cfg: PreferenceConfig, pad_id: int, info: DistInfo) -> list:
    """(chosen, rejected) log-probs of every pair under ``model``, in the loss's units (summed, or averaged for
    the length-normalized losses): the same fused op run reference-free, its policy log-probs read back."""
    model = model.to(info.device).eval()
    module = PreferenceLoss(model, cfg)
    options = {**module.loss_options(), "loss_type": "sigmoid" if cfg.loss_type == "bco_pair" else cfg.loss_type}
    if options["loss_type"] not in REFERENCE_FREE:
        options["reference_free"] = True
    out = []
    for i in range(0, len(examples), cfg.batch_size):
        batch = {k: v.to(info.device) for k, v in collate_pairs(examples[i:i + cfg.batch_size], pad_id).items()}
        with autocast(cfg, info.device):
            hidden, weight, head = head_inputs(model, hidden_states(model, batch))
            res = fused_linear_preference_loss(hidden, weight, batch["labels"], **head, **options)
        out += list(zip(res.chosen_logps.float().cpu().tolist(), res.rejected_logps.float().cpu().tolist()))
    return out


def _collate(examples: list, pad_id: int) -> dict:
    pairs = [e[0] if isinstance(e, tuple) else e for e in examples]
    batch = collate_pairs(pairs, pad_id)
    if isinstance(examples[0], tuple):
        ref = torch.tensor([e[1] for e in examples], dtype=torch.float32)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
    return batch


def run(cfg: PreferenceConfig, stage: str = "dpo") -> TrainResult:
    info = init_distributed()
    try:
        rows, _ = load_data(cfg, ("preference",), info)
        model, tokenizer = load_causal_lm(cfg.model, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code,
                                          max_length=cfg.max_length)
        examples = encode_all(rows, lambda r: encode_preference(r, tokenizer, max_length=cfg.max_length,
                                                                truncation=cfg.truncation), "pairs", info)
        ref_model = None
        if cfg.loss_type not in REFERENCE_FREE:
            ref_model = load_reference(cfg, info)
            if cfg.ref_mode == "precompute":
                ref = reference_logps(ref_model, examples, cfg, tokenizer.pad_token_id, info)
                examples = [(pair, logps) for pair, logps in zip(examples, ref)]
                ref_model = None  # not held during training
        data = Dataset(examples, lambda ex: _collate(ex, tokenizer.pad_token_id), cfg.seed)
        return train(cfg, PreferenceLoss(model, cfg, ref_model), data, tokenizer, info, stage=stage)
    finally:
        shutdown(info)


def main(argv: list[str]) -> int:
    run(parse_config(DPOConfig, argv, prog="ptk dpo"), "dpo")
    return 0


def main_orpo(argv: list[str]) -> int:
    run(parse_config(ORPOConfig, argv, prog="ptk orpo"), "orpo")
    return 0


def main_simpo(argv: list[str]) -> int:
    run(parse_config(SimPOConfig, argv, prog="ptk simpo"), "simpo")
    return 0

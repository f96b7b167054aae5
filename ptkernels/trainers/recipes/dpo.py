"""``ptk dpo`` (and ``ptk orpo``, ``ptk simpo``): preference optimization on ``prompt``/``chosen``/``rejected``.

Each micro-batch is one forward of the policy over ``[chosen; rejected]`` up to its final hidden states, then
``ptkernels.fused_linear_preference_loss``: the sequence log-probs, the loss and its gradient, chunk by chunk,
without the ``[tokens, vocab]`` logits. ``--loss-type`` picks the DPO family member (TRL 1.16's 15 types and
cdpo; a comma-separated list with ``--loss-weights`` is MPO), with TRL's ``--f-divergence-type``, ``--ld-alpha``,
``--use-weighting``; ``ptk orpo`` (NLL over prompt + completion, as TRL) and ``ptk simpo`` are reference-free.

The reference model (``--ref-model``, default: the initial policy):
    --ref-mode precompute  (default) scores every pair once before training and keeps only the numbers, so no
                           reference model is held during training;
    --ref-mode live        keeps a frozen copy and scores each micro-batch inside the same fused chunk loop.
"""

from __future__ import annotations

import torch

import ptkernels as ptk

from ..data.rows import load_data
from ..data.tokenization import collate_pairs, encode_all, encode_preference, pairs_in
from ..engine.config import DPOConfig, ORPOConfig, PreferenceConfig, SimPOConfig, parse_config
from ..engine.distributed import DistInfo, init_distributed, shutdown
from ..engine.loop import Dataset, TrainResult, autocast, train
from ..lora import load_policy
from ..modeling import ReferenceModel, TrainingModule, head_inputs, hidden_states

REFERENCE_FREE = ("orpo", "simpo")


class PreferenceLoss(TrainingModule):
    def __init__(self, model, cfg: PreferenceConfig, ref: ReferenceModel | None = None):
        super().__init__(model)
        self.cfg = cfg
        self.ref = ref  # scores each micro-batch live (--ref-mode live); None: precomputed or reference-free

    def count(self, batch: dict) -> float:
        return pairs_in(batch)

    def loss_options(self) -> dict:
        c = self.cfg
        types = [t.strip() for t in c.loss_type.split(",") if t.strip()]
        options = dict(loss_type=types[0] if len(types) == 1 else types, beta=c.beta,
                       label_smoothing=c.label_smoothing, simpo_gamma=c.simpo_gamma, nll_weight=c.nll_weight or None,
                       shift=True, backend=c.backend)
        if c.loss_weights:
            options["loss_weights"] = [float(w) for w in c.loss_weights.split(",")]
        if c.loss_type in ("simpo", "cpo"):
            options["alpha"] = c.alpha
        elif c.loss_type != "orpo":
            options.update(f_divergence_type=c.f_divergence_type, f_alpha_divergence_coef=c.f_alpha_divergence_coef,
                           discopop_tau=c.discopop_tau, ld_alpha=c.ld_alpha, use_weighting=c.use_weighting)
        return options

    def forward(self, batch: dict, norm: float):
        hidden, weight, head = head_inputs(self.model, hidden_states(self.model, batch))
        ref = {}
        if "ref_chosen_logps" in batch:
            ref = {"ref_chosen_logps": batch["ref_chosen_logps"], "ref_rejected_logps": batch["ref_rejected_logps"]}
        elif self.ref is not None:
            ref = self.ref.fused_inputs(batch)
        options = self.loss_options()
        if self.cfg.loss_type == "orpo":  # TRL 1.16's ORPO: the NLL over prompt + completion (every non-pad token)
            options["nll_target"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = ptk.fused_linear_preference_loss(hidden, weight, batch["labels"], **head, **ref, **options)
        pairs = pairs_in(batch)
        metrics = {"accuracy": out.reward_accuracy * pairs, "margin": out.reward_margin * pairs,
                   "chosen_reward": out.chosen_rewards.sum(), "rejected_reward": out.rejected_rewards.sum(),
                   "chosen_logp": out.chosen_logps.sum(), "rejected_logp": out.rejected_logps.sum()}
        if out.nll_loss is not None:
            metrics["nll"] = out.nll_loss.detach() * pairs
        # The fused loss is the mean over this micro-batch's pairs: back to a sum, over the step's pairs.
        return out.loss * (pairs / norm), metrics


@torch.no_grad()
def reference_logps(ref: ReferenceModel, examples: list, cfg: PreferenceConfig, pad_id: int, info: DistInfo) -> list:
    """(chosen, rejected) log-probs of every pair under the reference, in the loss's units (summed; LD-weighted
    under --ld-alpha): the same fused op run reference-free, its policy log-probs read back."""
    ref.model.to(info.device).eval()
    module = PreferenceLoss(ref.model, cfg)
    # plain sigmoid, reference-free: only the sequence log-probs are read (summed, LD-weighted under ld_alpha)
    options = {**module.loss_options(), "loss_type": "sigmoid", "reference_free": True, "label_smoothing": 0.0,
               "loss_weights": None, "f_divergence_type": "reverse_kl", "use_weighting": False}
    out = []
    for i in range(0, len(examples), cfg.batch_size):
        batch = {k: v.to(info.device) for k, v in collate_pairs(examples[i:i + cfg.batch_size], pad_id).items()}
        with autocast(cfg, info.device):
            hidden, weight, head = ref.head_inputs(batch)
            res = ptk.fused_linear_preference_loss(hidden, weight, batch["labels"], **head, **options)
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
        model, tokenizer = load_policy(cfg)
        examples = encode_all(rows, lambda r: encode_preference(r, tokenizer, max_length=cfg.max_length,
                                                                truncation=cfg.truncation), "pairs", info)
        ref = None
        if cfg.loss_type not in REFERENCE_FREE:
            ref = ReferenceModel.load(cfg, info, policy=model)  # with --lora: the policy, adapter off
            if cfg.ref_mode == "precompute":
                logps = reference_logps(ref, examples, cfg, tokenizer.pad_token_id, info)
                examples = [(pair, pair_logps) for pair, pair_logps in zip(examples, logps)]
                ref = None  # not held during training
        data = Dataset(examples, lambda ex: _collate(ex, tokenizer.pad_token_id), cfg.seed)
        return train(cfg, PreferenceLoss(model, cfg, ref), data, tokenizer, info, stage=stage)
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

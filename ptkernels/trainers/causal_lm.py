"""The next-token loss of pretraining and SFT: ``linear_cross_entropy`` on the final hidden states, summed over
the label tokens of the micro-batch and divided by the accumulated step's token count (see loop.py)."""

from __future__ import annotations

from ..ops.linear_cross_entropy import linear_cross_entropy
from .common import head_inputs, hidden_states
from .loop import TrainingModule
from .tokenization import token_count


class CausalLMLoss(TrainingModule):
    def __init__(self, model, backend: str = "auto"):
        super().__init__(model)
        self.backend = backend

    def count(self, batch: dict) -> float:
        return token_count(batch)

    def forward(self, batch: dict, norm: float):
        hidden, weight, head = head_inputs(self.model, hidden_states(self.model, batch))
        nll = linear_cross_entropy(hidden, weight, batch["labels"], shift=True, reduction="sum",
                                   backend=self.backend, **head)
        return nll / norm, {"nll": nll.detach()}

"""The final hidden states of a batch of completions whose prompts repeat (a GRPO group), each prompt run once.

A GRPO group is ``num_generations`` completions of one prompt, and on the quick preset the prompt is 3/4 of a
row's tokens: the full forward and backward over ``prompt + completion`` rows spend most of their time on copies
of the same prompt. Here each distinct prompt of the micro-batch goes through the model once, with a KV cache
(``transformers.DynamicCache``) that keeps its keys and values in the autograd graph; the cache rows are repeated
for the group (``batch_select_indices``), and the completions run against them. The loss and every gradient are
those of the full rows (``tests/trainers/rollout/test_shared_prompt.py`` checks it in float64): the gradient that the
completions send into the shared keys and values reaches the prompt's forward once, summed over the group.

    view = completion_hidden_states(model, batch)  # batch: completion_batch(...) + "prompt_lengths"
    fused_linear_grpo_loss(view.hidden, weight, view.targets, view.mask, advantages,
                           old_logps=view.gather(batch["old_logps"]), ...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modeling import cache_argument, hidden_states
from .sampling import distinct_left_padded


@dataclass
class CompletionView:
    """``hidden[r, j]``: the final hidden state that predicts ``targets[r, j]``, the j-th completion token of row r
    (``mask`` 1 where it is one). ``columns[r, j]``: where that token's prediction sits in the full batch's
    ``[B, T-1]`` per-token layout (of ``sequence_token_logps``, ``completion_mask``)."""

    hidden: torch.Tensor  # [R, C, D]
    targets: torch.Tensor  # [R, C]
    mask: torch.Tensor  # [R, C] float
    columns: torch.Tensor  # [R, C] long

    def gather(self, per_token: torch.Tensor | None) -> torch.Tensor | None:
        """A ``[B, T-1]`` per-token tensor of the full batch (old or reference log-probs) in this view's layout."""
        if per_token is None:
            return None
        return per_token.gather(1, self.columns.to(per_token.device)) * self.mask.to(per_token.dtype)


def completion_hidden_states(model, batch: dict) -> CompletionView:
    """The completions' hidden states of a ``completion_batch`` (right-padded prompt + completion rows) with
    ``prompt_lengths`` ``[B]``, each distinct prompt through the model once (see the module docstring)."""
    input_ids, attention = batch["input_ids"], batch["attention_mask"]
    device = input_ids.device
    prompt_lengths = batch["prompt_lengths"].tolist()
    lengths = attention.sum(1).tolist()
    rows = range(input_ids.shape[0])
    index, prompt_ids, prompt_mask, positions = distinct_left_padded(
        [input_ids[r, :prompt_lengths[r]].tolist() for r in rows], 0, device)
    completions = [input_ids[r, prompt_lengths[r]:lengths[r]] for r in rows]
    width = max(max(len(c) for c in completions), 1)

    targets = torch.zeros((len(completions), width), dtype=input_ids.dtype, device=device)
    mask = torch.zeros((len(completions), width), dtype=attention.dtype, device=device)
    for r, c in enumerate(completions):
        targets[r, :len(c)] = c
        mask[r, :len(c)] = 1

    cache = _new_cache()
    cache_kwargs = {cache_argument(model): cache, "use_cache": True}
    prompt_hidden = hidden_states(model, {"input_ids": prompt_ids, "attention_mask": prompt_mask,
                                          "position_ids": positions}, **cache_kwargs)
    cache.batch_select_indices(index)
    start = torch.tensor(prompt_lengths, device=device)[:, None]
    completion_hidden = hidden_states(model, {
        "input_ids": targets, "attention_mask": torch.cat([prompt_mask[index], mask], dim=1),
        "position_ids": start + torch.arange(width, device=device)}, **cache_kwargs)
    # Completion token 0 is predicted at the prompt's last position (left-padded: the last column), token j > 0 at
    # completion position j - 1.
    hidden = torch.cat([prompt_hidden[index, -1:], completion_hidden[:, :-1]], dim=1)
    columns = (start - 1 + torch.arange(width, device=device)).clamp(max=input_ids.shape[1] - 2)
    return CompletionView(hidden=hidden, targets=targets, mask=mask.float(), columns=columns)


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()

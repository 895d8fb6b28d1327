"""Simple Ensemble: no merge. Every fine-tuned body runs on each batch; their outputs are averaged.

The reference point for merging (the cost merging avoids): n forward passes per example.

For task t: h̄ = (1/n) Σ_i body_i(x), the mean of the last hidden states, then task t's own head
at the last non-pad token. The head is linear, so this equals the mean over i of the logits of
(body i + head t). It is not an average of probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mergelit.gpt2 import build_body, build_head
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool


class SimpleEnsemble(MergeMethod):
    """Simple Ensemble: every fine-tuned body runs on each batch (all n kept in memory); mean of logits.

    The n bodies' last hidden states are averaged and the evaluated task's own head is applied,
    which equals the mean of the n models' logits. Keeps every fine-tuned body in memory (n
    bodies, ~0.5 GB each for GPT-2 in float32) and costs n forward passes per batch. There is no
    merged body, so ``--merged_model_save_path`` does not apply.
    """

    display_name = "Simple Ensemble"
    kind = "ensemble"

    def __init__(self, pool: ModelPool):
        super().__init__(pool)
        self.bodies: nn.ModuleList | None = None

    def setup(self, stage: str | None = None) -> None:
        # Like MergeMethod.setup, with n bodies in place of one merged body; only once.
        if self.bodies is not None:
            return
        self.pool.check()
        config = self.pool.body_config()
        self.bodies = nn.ModuleList([build_body(config, self.pool.finetuned_body(task), fused_gelu=self.fused_gelu) for task in self.tasks])
        self.heads = nn.ModuleDict({task: build_head(self.pool.head(task)) for task in self.tasks})
        self.pad_token_ids = {task: self.pool.task_config(task).pad_token_id for task in self.tasks}

    def merge(self) -> dict[str, Tensor]:
        raise NotImplementedError("SimpleEnsemble does not merge: it runs every fine-tuned body on each batch.")

    def merged_state_dict(self) -> dict[str, Tensor]:
        raise NotImplementedError(
            "SimpleEnsemble has no merged body to export; drop --merged_model_save_path, or export a merging method."
        )

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(1/n) Σ_i body_i(x): the mean of the fine-tuned bodies' last hidden states."""
        total = None
        for body in self.bodies:  # summed in task order, divided once
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            total = hidden if total is None else total + hidden
        return total / len(self.bodies)

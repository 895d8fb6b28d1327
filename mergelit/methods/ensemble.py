"""Simple Ensemble: no merge. Every fine-tuned body runs on each batch; their outputs are averaged.

The reference point for merging (the cost merging avoids): n forward passes per example. For task t,
h̄ = (1/n) Σ_i body_i(x), then task t's own head at the last non-pad token; the head is linear, so
this is the mean over i of the logits of (body i + head t), not an average of probabilities.
"""

from __future__ import annotations

from types import SimpleNamespace

from torch import Tensor, nn

from mergelit import costs
from mergelit.gpt2 import build_body
from mergelit.methods.base import MergeMethod


class EnsembleBody(nn.Module):
    """Runs every body on the batch and returns the mean of their last hidden states."""

    def __init__(self, bodies: list[nn.Module]):
        super().__init__()
        self.bodies = nn.ModuleList(bodies)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, use_cache: bool = False) -> SimpleNamespace:
        total = None
        for body in self.bodies:  # summed in task order, divided once
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            total = hidden if total is None else total + hidden
        return SimpleNamespace(last_hidden_state=total / len(self.bodies))


class SimpleEnsemble(MergeMethod):
    """Simple Ensemble: the n fine-tuned bodies' last hidden states averaged under the evaluated task's
    head (= the mean of their logits). Keeps all n bodies in memory (~0.5 GB each for GPT-2 in float32)
    and costs n forward passes per batch; there is no merged body for ``--merged_model_save_path``."""

    display_name = "Simple Ensemble"
    kind = "ensemble"
    exportable = False

    def body_for(self, task: str) -> nn.Module:
        """The same ensemble of the n fine-tuned bodies for every task (built once)."""
        if self._body is None:
            with costs.phase("merge"):
                config = self.pool.body_config()
                bodies = [build_body(config, self.pool.finetuned_body(t), fused_gelu=self.fused_gelu) for t in self.tasks]
                self._body = EnsembleBody(bodies).to(self.device)
        return self._body

    def bodies_at_inference(self) -> float:
        return float(len(self.tasks))

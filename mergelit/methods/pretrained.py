"""Pretrained: no merge, θ* = θ0 under each task's own head: the λ = 0 row of Task Arithmetic and
TIES, the floor that merging must beat."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mergelit.methods.base import MergeMethod


class Pretrained(MergeMethod):
    """Pretrained: θ* = θ0, the pretrained body, scored under each task's fine-tuned head."""

    display_name = "Pretrained"

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        return theta0

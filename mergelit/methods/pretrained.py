"""Pretrained: no merge. The pretrained body θ0 under each task's own head.

This is the λ = 0 row of Task Arithmetic and TIES: the floor that merging must beat.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool


class Pretrained(MergeMethod):
    """Pretrained: θ* = θ0, the pretrained body, scored under each task's fine-tuned head."""

    display_name = "Pretrained"

    def __init__(self, pool: ModelPool):
        super().__init__(pool)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        return theta0

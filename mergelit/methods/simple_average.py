"""Simple Average: the element-wise mean of the fine-tuned bodies.

Also known as model soups (uniform): Wortsman et al. 2022, "Model soups: averaging weights
of multiple fine-tuned models improves accuracy without increasing inference time",
https://arxiv.org/abs/2203.05482.

θ* = (1/n) Σ θi over every body tensor; the pretrained body θ0 is not part of the mean.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_same_keys_and_shapes


def simple_average_tensor(thetas: Sequence[Tensor]) -> Tensor:
    """(1/n) Σ θi for one tensor: summed in task order, then divided by n, as FusionBench does
    (float32 rounding follows the order)."""
    values = iter(thetas)
    merged = next(values).clone()
    for theta in values:
        merged += theta
    return merged.div_(len(thetas))


def simple_average_merge(finetuned: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """θ* = (1/n) Σ θi over the n fine-tuned bodies (task -> state dict), every tensor."""
    if not finetuned:
        raise ValueError("No fine-tuned bodies to average: give at least one task.")
    (first_task, first), *rest = finetuned.items()
    for task, body in rest:
        check_same_keys_and_shapes(first, body, f"fine-tuned body {task!r} (compared with {first_task!r})")
    return {key: simple_average_tensor([body[key] for body in finetuned.values()]) for key in first}


class SimpleAverage(MergeMethod):
    """Simple Average: θ* = (1/n) Σ θi, the mean of the fine-tuned bodies (θ0 not included)."""

    display_name = "Simple Average"

    def __init__(self, pool: ModelPool):
        super().__init__(pool)

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        return simple_average_tensor(thetas)

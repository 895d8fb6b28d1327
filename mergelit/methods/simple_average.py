"""Simple Average: the element-wise mean of the fine-tuned bodies, θ* = (1/n) Σ θi (θ0 not included).

Also known as model soups (uniform): Wortsman et al. 2022, "Model soups: averaging weights
of multiple fine-tuned models improves accuracy without increasing inference time",
https://arxiv.org/abs/2203.05482.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mergelit.linalg import ordered_sum
from mergelit.methods.base import MergeMethod
from mergelit.state_dict import check_same_keys_and_shapes


def simple_average_tensor(thetas: Sequence[Tensor]) -> Tensor:
    """(1/n) Σ θi for one tensor: summed in task order, then divided by n, as FusionBench (its rounding)."""
    return ordered_sum(thetas).div_(len(thetas))


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

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        return simple_average_tensor(thetas)

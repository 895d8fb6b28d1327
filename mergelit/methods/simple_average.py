"""Simple Average: the element-wise mean of the fine-tuned bodies.

Also known as model soups (uniform): Wortsman et al. 2022, "Model soups: averaging weights
of multiple fine-tuned models improves accuracy without increasing inference time",
https://arxiv.org/abs/2203.05482.

θ* = (1/n) Σ θi over every body tensor; the pretrained body θ0 is not part of the mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool, can_stream, row_chunks
from mergelit.state_dict import check_same_keys_and_shapes


def simple_average_merge(finetuned: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """θ* = (1/n) Σ θi, tensor by tensor, over the n fine-tuned bodies (task -> state dict)."""
    if not finetuned:
        raise ValueError("No fine-tuned bodies to average: give at least one task.")
    (first_task, first), *rest = finetuned.items()
    for task, body in rest:
        check_same_keys_and_shapes(first, body, f"fine-tuned body {task!r} (compared with {first_task!r})")
    # Sum in task order, then divide by n, as FusionBench does (float32 rounding follows the order).
    merged = {key: tensor.clone() for key, tensor in first.items()}
    for _, body in rest:
        for key, tensor in merged.items():
            tensor += body[key]
    for tensor in merged.values():
        tensor /= len(finetuned)
    return merged


def simple_average_streamed(pool: ModelPool) -> dict[str, Tensor]:
    """``simple_average_merge(pool.finetuned_bodies())`` read tensor by tensor (piece by piece) from the
    pool's memory-mapped checkpoints: it holds the merged body and one piece per model, whatever n.
    Same operations in the same order, so the result is bit-identical."""
    if not pool.tasks:
        raise ValueError("No fine-tuned bodies to average: give at least one task.")
    pool.check()  # keys and shapes of every body, from the checkpoint headers
    first, *rest = pool.tasks
    merged = {}
    for key, shape in pool.body_shapes().items():
        tensor = torch.empty(shape)
        for rows in row_chunks(shape):
            piece = tensor if rows is None else tensor[rows]
            piece.copy_(pool.finetuned_tensor(first, key, rows))
            for task in rest:
                piece += pool.finetuned_tensor(task, key, rows)
            piece /= len(pool.tasks)
        merged[key] = tensor
    return merged


class SimpleAverage(MergeMethod):
    """Simple Average: θ* = (1/n) Σ θi, the mean of the fine-tuned bodies (θ0 not included)."""

    display_name = "Simple Average"

    def __init__(self, pool: ModelPool):
        super().__init__(pool)

    def merge(self) -> dict[str, Tensor]:
        # Streamed from the checkpoints (bit-identical to simple_average_merge of the whole bodies).
        if can_stream(self.pool):
            return simple_average_streamed(self.pool)
        return simple_average_merge(self.pool.finetuned_bodies())

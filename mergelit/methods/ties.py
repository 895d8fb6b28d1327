"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
https://arxiv.org/abs/2306.01708.

With τi = θi − θ0, each flattened over the whole body (keys sorted by name) into one vector:

1. Trim: per task, keep the entries with |τi| ≥ the k-th smallest |τi|, k = d − int(d · threshold/100)
   (the top ``threshold`` % by magnitude over the whole body; ties at the cut are kept); zero the rest.
2. Elect: s = sign(Σ trimmed τi); entries where that is 0 take sign(Σ s), the majority sign.
3. Disjoint merge: keep the trimmed entries whose sign equals s and aggregate them: ``sum``
   (FusionBench's default and the reproduction setting), ``mean`` (divide by the number of kept
   entries, at least 1: the paper's choice) or ``max`` (largest magnitude, with sign s).

θ* = θ0 + λ τm. Default λ = 0.3; the best published GPT-2/GLUE λ is 0.6.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal

import torch
from torch import Tensor

from mergelit.methods.base import MergeMethod
from mergelit.methods.task_arithmetic import add_scaled_streamed
from mergelit.pool import ModelPool, can_stream, row_chunks
from mergelit.state_dict import add_scaled, check_finetuned, check_same_keys_and_shapes, flatten, unflatten

MERGE_FUNCS = ("sum", "mean", "max")


def _check_arguments(scaling_factor: float, threshold: float, merge_func: str) -> None:
    if not math.isfinite(scaling_factor):
        raise ValueError(f"scaling_factor (λ) must be a finite number, got {scaling_factor}.")
    if not 0 < threshold <= 100:
        raise ValueError(
            f"threshold is the percentage of each task vector's entries to keep and must be in (0, 100], "
            f"got {threshold}. (FusionBench read values <= 1 as fractions: its 0.2 is 20 here.)"
        )
    if merge_func not in MERGE_FUNCS:
        raise ValueError(f"merge_func must be one of {', '.join(MERGE_FUNCS)}; got {merge_func!r}.")


def kth_smallest(values: Tensor, k: int) -> Tensor:
    """The k-th smallest entry of a 1-D CPU tensor (k from 1), as a 0-d tensor: ``values.kthvalue(k)``'s value.

    An exact selection (NumPy's introselect) is several times faster than ``torch.kthvalue`` on the
    CPU (0.9 s vs 4.6 s for 124 M entries) and returns the same number: a selection, not an estimate.
    """
    import numpy as np

    if not 1 <= k <= values.numel():
        raise ValueError(f"k must be in [1, {values.numel()}], got {k}.")
    array = np.partition(values.detach().cpu().numpy(), k - 1)
    return torch.tensor(array[k - 1], dtype=values.dtype)


def trim_threshold(tau: Tensor, threshold: float) -> Tensor:
    """The magnitude at the cut: entries of the flat ``tau`` with |τ| ≥ it are the top ``threshold`` %."""
    return kth_smallest(tau.abs(), _trim_rank(tau.numel(), threshold))


def _trim_rank(d: int, threshold: float) -> int:
    # k exactly as FusionBench computes it: int(d * K) with K = threshold / 100. Threshold 100
    # gives k = 0, which means keep everything; counting from 1, the 1st smallest is the minimum.
    return max(d - int(d * (threshold / 100)), 1)


def trim(tau: Tensor, threshold: float) -> Tensor:
    """Trim: zero, in place, all but the top ``threshold`` % entries of the flat ``tau`` by magnitude
    (ties at the cut kept)."""
    cut = trim_threshold(tau, threshold)
    return tau.masked_fill_(tau.abs() < cut, 0)


def elect_sign(trimmed: list[Tensor]) -> Tensor:
    """s = sign(Σ trimmed τi); its zeros take sign(Σ s)."""
    summed = torch.zeros_like(trimmed[0])
    for tau in trimmed:  # in task order, as FusionBench's sum over the stacked vectors
        summed += tau
    sign = summed.sign_()
    # Zeros: entries trimmed away in every task, or exact cancellations.
    # Σ s summed exactly (float64 holds every integer count up to 2^53; a float32 sum of
    # 124 M ±1 would round), so the streamed merge, which counts piece by piece, agrees.
    return sign.masked_fill_(sign == 0, torch.sign(sign.sum(dtype=torch.float64)).to(sign.dtype))


def disjoint_merge(trimmed: list[Tensor], sign: Tensor, merge_func: str) -> Tensor:
    """Aggregate the entries of the trimmed τi whose sign equals ``sign``: sum, mean or max."""
    magnitude = torch.zeros_like(sign)
    count = torch.zeros_like(sign) if merge_func == "mean" else None
    for tau in trimmed:
        # |τi| where sign(τi) == s, else 0. Trimmed-away entries are 0 and so never count.
        agreeing = (tau * sign).clamp_(min=0)
        if merge_func == "max":
            # Not torch.maximum: which of +0 / -0 it returns depends on the kernel (vectorised or
            # not, so on the tensor's size); taking only strictly larger values keeps +0, and the
            # streamed merge (piece by piece) gets the same bits as the whole-body one.
            torch.where(agreeing > magnitude, agreeing, magnitude, out=magnitude)
        else:
            magnitude += agreeing
            if count is not None:
                count += agreeing > 0
    if count is not None:
        magnitude /= count.clamp_(min=1)
    # Every kept entry has sign s, so their sum (mean, max) is s times the sum (mean, max) of magnitudes.
    return magnitude.mul_(sign)


def ties_merge(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    scaling_factor: float = 0.3,
    threshold: float = 20,
    merge_func: Literal["sum", "mean", "max"] = "sum",
) -> dict[str, Tensor]:
    """θ* = θ0 + λ τm, τm the TIES merge of the task vectors τi = θi − θ0.

    Args:
        pretrained: θ0, the pretrained body's state dict.
        finetuned: task -> θi, the fine-tuned bodies' state dicts.
        scaling_factor: λ.
        threshold: percentage of each task vector's entries kept by the trim (by magnitude, whole body).
        merge_func: how the disjoint merge aggregates agreeing entries: ``sum``, ``mean`` or ``max``.
    """
    _check_arguments(scaling_factor, threshold, merge_func)
    return add_scaled(pretrained, ties_task_vector(pretrained, finetuned, threshold, merge_func), scaling_factor)


def ties_task_vector(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    threshold: float = 20,
    merge_func: Literal["sum", "mean", "max"] = "sum",
) -> dict[str, Tensor]:
    """τm, the trimmed, sign-elected, disjoint merge of the task vectors: the part of the merge
    that does not depend on λ (a state dict of views into one flat tensor)."""
    _check_arguments(0.0, threshold, merge_func)
    check_finetuned(pretrained, finetuned)
    theta0 = flatten(pretrained)
    # Trim: one task vector at a time, so only the trimmed vectors stay in memory (float32, n × d).
    trimmed = [trim(flatten(body).sub_(theta0), threshold) for body in finetuned.values()]
    del theta0
    return unflatten(_elect_and_merge(trimmed, merge_func), pretrained)


def ties_task_vector_from_task_vectors(
    task_vectors: Iterable[dict[str, Tensor]],
    threshold: float = 20,
    merge_func: Literal["sum", "mean", "max"] = "sum",
) -> dict[str, Tensor]:
    """τm from given task vectors (e.g. DARE's dropped and rescaled τ̃i), flattened by key name:
    trim, elect, disjoint merge as ``ties_task_vector`` (keys and shapes of the first).

    ``task_vectors`` is consumed one at a time (a generator keeps one τ in memory, not n)."""
    _check_arguments(0.0, threshold, merge_func)
    reference: dict[str, Tensor] | None = None
    trimmed = []
    for index, tau in enumerate(task_vectors, start=1):
        if reference is None:
            reference = {key: torch.empty(value.shape, dtype=value.dtype, device="meta") for key, value in tau.items()}
        else:
            check_same_keys_and_shapes(reference, tau, f"task vector {index}")
        trimmed.append(trim(flatten(tau), threshold))
    if reference is None:
        raise ValueError("No task vectors to merge: give at least one task.")
    return unflatten(_elect_and_merge(trimmed, merge_func), reference)


def _elect_and_merge(trimmed: list[Tensor], merge_func: str) -> Tensor:
    sign = elect_sign(trimmed)  # Elect sign.
    merged = disjoint_merge(trimmed, sign, merge_func)  # Disjoint merge.
    trimmed.clear()  # the caller's list: free the trimmed vectors now
    return merged


def ties_task_vector_streamed(
    pool: ModelPool, threshold: float = 20, merge_func: Literal["sum", "mean", "max"] = "sum"
) -> dict[str, Tensor]:
    """``ties_task_vector(pool.pretrained_body(), pool.finetuned_bodies(), ...)`` read piece by piece
    from the pool's memory-mapped checkpoints, bit-identical, holding about two bodies whatever n.

    Two passes over the fine-tuned checkpoints: (1) per task,
    |τi| of the whole body (keys sorted by name, as ``flatten``) in one reused buffer and its exact
    k-th value, the trim cut; (2) per piece: trim, elect, disjoint merge, with the entries whose
    summed sign is 0 merged as if s were 0 and remembered (a bool mask, plus the trimmed τi at
    exact cancellations); once Σ s, the zero fallback, is known, only those entries are redone.
    Every step is element-wise given the cuts and Σ s, so pieces give the whole's bits.
    """
    _check_arguments(0.0, threshold, merge_func)
    if not pool.tasks:
        raise ValueError("No fine-tuned bodies to merge: give at least one task.")
    pool.check()  # keys and shapes of every body, from the checkpoint headers
    shapes = pool.body_shapes()
    pieces = [(key, rows) for key in sorted(shapes) for rows in row_chunks(shapes[key])]
    # θ0 is re-read per piece rather than kept (a read is ~0.05 s a body; keeping it costs a body).
    # The pool checks each piece for NaN/inf on its first read only.

    # 1. Trim cuts, one task at a time (the buffer is the only other whole-body tensor of this pass).
    d = sum(math.prod(shape) for shape in shapes.values())
    rank = _trim_rank(d, threshold)
    buffer = torch.empty(d)
    shrink = []  # per task, the largest float32 below the cut: |τ| > it  <=>  |τ| >= cut
    for task in pool.tasks:
        offset = 0
        for key, rows in pieces:
            base = pool.pretrained_tensor(key, rows)
            out = buffer[offset : offset + base.numel()].view(base.shape)
            torch.sub(pool.finetuned_tensor(task, key, rows), base, out=out).abs_()
            offset += base.numel()
        cut = _kth_smallest_in_place(buffer, rank)
        shrink.append(float(torch.nextafter(cut, torch.tensor(-math.inf))))
    del buffer

    # 2. Trim, elect (zeros of s left at 0 for now), disjoint merge, piece by piece.
    merged = {key: torch.empty(shape) for key, shape in shapes.items()}
    total = 0.0  # Σ s, exact: an integer count summed in float64
    undecided = []  # (piece of merged, where s == 0, flat positions of exact cancellations, their trimmed τi)
    for key, rows in pieces:
        base = pool.pretrained_tensor(key, rows)
        taus = []
        for task, below in zip(pool.tasks, shrink):
            tau = torch.sub(pool.finetuned_tensor(task, key, rows), base)
            # Trim: hardshrink keeps x where |x| > below, i.e. |x| >= cut (no float32 lies between
            # them), and writes +0 elsewhere: the bits of tau.masked_fill_(tau.abs() < cut, 0), faster.
            taus.append(torch.nn.functional.hardshrink(tau, below))
        sign = torch.zeros_like(taus[0])  # from +0, as elect_sign: the sum is never -0
        for tau in taus:  # in task order, as elect_sign
            sign += tau
        sign.sign_()
        total += float(sign.sum(dtype=torch.float64))
        piece = merged[key] if rows is None else merged[key][rows]
        piece.copy_(disjoint_merge(taus, sign, merge_func))  # +0 wherever s == 0
        zero = sign == 0
        if bool(zero.any()):
            # Exact cancellations: s == 0 although some τi survived the trim (rare; gathered).
            cancelled = taus[0] != 0
            for tau in taus[1:]:
                cancelled |= tau != 0
            positions = cancelled.logical_and_(zero).view(-1).nonzero().squeeze(1)
            gathered = torch.stack([tau.reshape(-1)[positions] for tau in taus])
            undecided.append((piece, zero, positions, gathered))

    # The elect step's fallback: s's zeros take sign(Σ s); redo just those entries.
    fill = float(math.copysign(1.0, total)) if total else 0.0
    if fill:
        for piece, zero, positions, gathered in undecided:
            if fill < 0:
                piece.masked_fill_(zero, -0.0)  # trimmed away everywhere: +0 · s = -0, as the whole-body merge
            if positions.numel():
                sign = torch.full((positions.numel(),), fill)
                piece.view(-1)[positions] = disjoint_merge(list(gathered), sign, merge_func)
    return merged


def _kth_smallest_in_place(buffer: Tensor, k: int) -> Tensor:
    """``kth_smallest(buffer, k)`` partitioning ``buffer`` itself (no copy of a whole body)."""
    array = buffer.numpy()
    array.partition(k - 1)
    return torch.tensor(array[k - 1], dtype=buffer.dtype)


class TiesMerging(MergeMethod):
    """TIES-Merging: θ* = θ0 + λ τm, τm the trimmed, sign-elected, disjoint merge of the task vectors.

    Each task vector keeps only its largest entries (trim), every entry gets the sign of the
    summed trimmed vectors (elect), and only entries agreeing with it are aggregated (disjoint merge).

    Args:
        scaling_factor: λ, multiplies the merged task vector τm. The best published GPT-2/GLUE value is 0.6.
        threshold: percentage (0, 100] of each task vector's entries kept by the trim, chosen by
            magnitude over the whole body (the paper's k = 20 %).
        merge_func: aggregation of the agreeing entries: ``sum`` (FusionBench's default, reproduces
            the published numbers), ``mean`` (the paper's disjoint mean) or ``max`` (largest magnitude).
    """

    display_name = "TIES-Merging"
    symbols = {"scaling_factor": "λ", "threshold": "k"}
    recommended = {"scaling_factor": 0.6}  # the best published GPT-2/GLUE λ

    def __init__(
        self,
        pool: ModelPool,
        scaling_factor: float = 0.3,
        threshold: float = 20,
        merge_func: Literal["sum", "mean", "max"] = "sum",
    ):
        super().__init__(pool)
        _check_arguments(scaling_factor, threshold, merge_func)
        self.scaling_factor = float(scaling_factor)
        self.threshold = threshold
        self.merge_func = merge_func
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> tuple:
        # τm depends on the pool, the threshold and merge_func, not on λ: a λ sweep computes it once.
        return ("ties_task_vector", float(self.threshold), self.merge_func)

    def merge(self) -> dict[str, Tensor]:
        if not can_stream(self.pool):  # a stub holding whole bodies
            pretrained = self.pool.pretrained_body()
            if self.reusable is None:
                self.reusable = ties_task_vector(pretrained, self.pool.finetuned_bodies(), self.threshold, self.merge_func)
            return add_scaled(pretrained, self.reusable, self.scaling_factor)
        # Streamed from the checkpoints: bit-identical to ties_merge of the whole bodies.
        if self.reusable is None:
            self.reusable = ties_task_vector_streamed(self.pool, self.threshold, self.merge_func)
        return add_scaled_streamed(self.pool, self.reusable, self.scaling_factor)

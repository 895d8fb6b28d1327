"""EMR-Merging: elect a unified task vector, then a mask and a rescaler per task.

Huang et al. 2024, "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024,
https://arxiv.org/abs/2405.17461.

With τi = θi − θ0, on every body tensor (wte, wpe, LN, biases, Conv1D), elementwise:

1. Elect: γ = 2·[Σi τi > 0] − 1 (a zero sum counts as −1, as FusionBench's ``_sign``).
2. Unified vector: τuni = γ · maxi |Mi ⊙ τi|, with the masks Mi = [τi · γ > 0] (the entries of τi
   that agree with the elected sign; zeros never do). τuni is 0 where no task agrees.
3. Rescale: ri = Σk mean|τi,k| / Σk mean|Mi,k ⊙ τuni,k|, k over the body tensors in state-dict
   order. Per-tensor *means* are summed, so every tensor weighs the same whatever its size (this
   is FusionBench's and the original code's rule, not the global ratio Σ|τi| / Σ|Mi ⊙ τuni|).

Task t is scored with its own body θt = θ0 + rt · (Mt ⊙ τuni) and head t. There is no single
merged model: inference needs the task identity (``kind = "task-aware"``), like a router.

**What differs from FusionBench and why.** ``emr_merge`` reproduces FusionBench's function (same
elected signs, masks, τuni, and float32 rescalers accumulated in the same order). FusionBench
cannot score the result on GPT-2 (its modulated model raises "No task specified" in the GPT-2
task pool), and its ``set_task`` adds and subtracts δ in place, so switching tasks drifts
(1.2e-7 after t1 → t0 → t1); here each θt is built afresh from θ0. A task with no entry that
agrees with γ (e.g. τi = 0) has Mi = 0 and body θ0; FusionBench's rescaler is then 0/0 or x/0,
here 1.

**Storage** (what inference keeps): θ0 and τuni (one fp32 body each), n masks and n scalars. The
masks are held as ``torch.bool`` (1 byte per entry: n/4 of an fp32 body), so in memory
2 + n/4 = 3.75 bodies for n = 7 (GPT-2 small: 1.9 GB vs 3.5 GB for the 7 bodies); bit-packed masks
would take n/32 of a body, 2.22 bodies (1.1 GB). ``EMRMerging.inference_parameters()`` gives these.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned


def elect_sign(task_vectors: list[Tensor]) -> Tensor:
    """γ = 2·[Σi τi > 0] − 1: +1 where the summed task vector is positive, else −1.

    Held as float32 ±1 (FusionBench: int64); multiplying by ±1 is exact either way, and the
    float version avoids an 8-byte-per-entry temporary (3 s on wte alone).
    """
    summed = task_vectors[0].clone()
    for tau in task_vectors[1:]:  # in task order, as FusionBench's state-dict sum
        summed += tau
    return torch.where(summed > 0, 1.0, -1.0)


def emr_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]]
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, float]]:
    """Elect, mask, rescale.

    Args:
        pretrained: θ0, the pretrained body's state dict.
        finetuned: task -> θi, the fine-tuned bodies' state dicts.

    Returns:
        ``(tau_uni, masks, rescalers)``: τuni (key -> fp32 tensor), task -> key -> Mi (torch.bool),
        task -> ri (the float32 value, as a Python float).
    """
    check_finetuned(pretrained, finetuned)
    tasks = list(finetuned)
    tau_uni: dict[str, Tensor] = {}
    masks: dict[str, dict[str, Tensor]] = {task: {} for task in tasks}
    # Σk mean|τi,k| and Σk mean|Mi,k ⊙ τuni,k|, accumulated in float32 in state-dict order, as
    # FusionBench does (its rescalers are float32 tensors).
    task_means = torch.zeros(len(tasks))
    unified_means = torch.zeros(len(tasks))
    for key, base in pretrained.items():
        task_vectors = [finetuned[task][key] - base for task in tasks]
        sign = elect_sign(task_vectors)
        largest = torch.zeros_like(base)  # maxi |Mi ⊙ τi| = |τuni|
        for i, (task, tau) in enumerate(zip(tasks, task_vectors)):
            mask = tau * sign > 0  # agrees with the elected sign (zeros never do)
            masks[task][key] = mask
            magnitude = torch.abs(tau)
            task_means[i] += torch.mean(magnitude)
            torch.maximum(largest, magnitude.masked_fill_(~mask, 0), out=largest)
        tau_uni[key] = largest * sign
        for i, task in enumerate(tasks):
            # |Mi ⊙ τuni| = Mi ⊙ largest, entry for entry.
            unified_means[i] += torch.mean(torch.where(masks[task][key], largest, 0.0))
    rescalers = {}
    for i, task in enumerate(tasks):
        # No agreeing entry anywhere: the mask is all False and the body θ0 whatever ri is.
        rescalers[task] = float(task_means[i] / unified_means[i]) if unified_means[i] > 0 else 1.0
    return tau_uni, masks, rescalers


def modulated_body(
    pretrained: dict[str, Tensor], tau_uni: dict[str, Tensor], mask: dict[str, Tensor], rescaler: float
) -> dict[str, Tensor]:
    """θt = θ0 + rt · (Mt ⊙ τuni), new tensors built from θ0 (nothing added or removed in place)."""
    scale = torch.tensor(rescaler, dtype=torch.float32)
    return {key: base + (tau_uni[key] * mask[key]) * scale for key, base in pretrained.items()}


class EMRMerging(MergeMethod):
    """EMR-Merging: task t is scored with θ0 + rt · (Mt ⊙ τuni); γ elected, Mi masks, ri rescalers.

    No hyperparameters. Task-aware: there is one body per task, built when that task is scored,
    and inference needs the task identity.
    """

    display_name = "EMR-Merging"
    symbols: dict[str, str] = {}
    recommended: dict = {}
    kind = "task-aware"

    def __init__(self, pool: ModelPool):
        super().__init__(pool)
        self._emr: tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, float]] | None = None

    def emr(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, float]]:
        """``(tau_uni, masks, rescalers)`` of the pool, computed on first use."""
        if self._emr is None:
            self._emr = emr_merge(self.pool.pretrained_body(), self.pool.finetuned_bodies())
        return self._emr

    def merge(self) -> dict[str, Tensor]:
        raise NotImplementedError(
            "EMR-Merging has no single merged body: task t is scored with its own θ0 + rt (Mt ⊙ τuni); "
            "use merge_task(task)."
        )

    def merge_task(self, task: str) -> dict[str, Tensor]:
        """The body task ``task`` is scored with: θ0 + r_task · (M_task ⊙ τuni)."""
        tau_uni, masks, rescalers = self.emr()
        if task not in masks:
            raise ValueError(f"EMR-Merging has no task {task!r}; the pool's tasks are {list(masks)}.")
        return modulated_body(self.pool.pretrained_body(), tau_uni, masks[task], rescalers[task])

    def inference_parameters(self, packed: bool = True) -> float:
        """What inference keeps, in fp32-body equivalents (one body = its number count × 4 bytes).

        θ0 + τuni (2 bodies) + n masks + n fp32 scalars: 2 + n/32 + n/d with the masks bit-packed
        (``packed``; 2.21875 for n = 7), 2 + n/4 + n/d as mergelit holds them (torch.bool, one byte
        an entry; 3.75 for n = 7). d is the body's number count (124,439,808 at GPT-2 small).
        """
        d = sum(tensor.numel() for tensor in self.pool.pretrained_body().values())
        n = len(self.tasks)
        mask_bits = 1 if packed else 8
        return 2 + n * mask_bits / 32 + n / d

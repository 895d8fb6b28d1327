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
masks are bit-packed (``state_dict.pack_bits``: n/32 of an fp32 body), so 2 + n/32 bodies,
2.22 for n = 7 (GPT-2 small: 1.1 GB vs 3.5 GB for the 7 bodies); ``bodies_at_inference()``.

**Streaming.** τuni, the packed masks and the rescalers come from one pass over the pool, key by
key (``emr_parts``), reading one θi at a time: beside τuni and the masks it holds a few tensors of
one key, whatever n. Task t's body is then built key by key from θ0 (read per key), its unpacked
mask and τuni, when t is scored; the previous task's body is let go first, so one body is in
memory at a time. ``emr_merge`` is the same maths over whole bodies (the test oracle). On a
2-layer, 256-wide pool (56 MB a body, ``wte`` 88 % of it), computing the parts and building every
task's body in turn peaked 410 MB above the start at N = 2 and 418 MB at N = 7 (the masks' n/32);
the whole-body functions: 543 and 1138 MB (glibc's mmap threshold fixed at 64 KiB).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from mergelit.errors import KeyMissing
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned, pack_bits, unpack_bits


def elect_sign(task_vectors: Iterable[Tensor]) -> Tensor:
    """γ = 2·[Σi τi > 0] − 1: +1 where the summed task vector is positive, else −1.

    Held as float32 ±1 (FusionBench: int64); multiplying by ±1 is exact either way, and the
    float version avoids an 8-byte-per-entry temporary (3 s on wte alone).
    """
    summed = None
    for tau in task_vectors:  # in task order, as FusionBench's state-dict sum
        summed = tau.clone() if summed is None else summed.add_(tau)
    return torch.where(summed > 0, 1.0, -1.0)


def emr_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]]
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, float]]:
    """Elect, mask, rescale, over whole bodies (the reference ``emr_parts`` is tested against).

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
    return tau_uni, masks, _rescalers(tasks, task_means, unified_means)


def _rescalers(tasks: list[str], task_means: Tensor, unified_means: Tensor) -> dict[str, float]:
    rescalers = {}
    for i, task in enumerate(tasks):
        # No agreeing entry anywhere: the mask is all False and the body θ0 whatever ri is.
        rescalers[task] = float(task_means[i] / unified_means[i]) if unified_means[i] > 0 else 1.0
    return rescalers


def emr_parts(pool: ModelPool) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, float]]:
    """``emr_merge`` over a pool, streamed key by key: ``(tau_uni, packed_masks, rescalers)``.

    The same numbers (the same float32 operations in the same order), but each θi is read when
    its turn comes (twice per key: for γ, then for the masks) and each mask is bit-packed as soon
    as it is made (``pack_bits``; ``unpack_bits(packed, shape)`` gives it back), so what is held
    is τuni, n/32 of a body of masks, and a few tensors of one key.
    """
    tasks = list(pool.tasks)
    tau_uni: dict[str, Tensor] = {}
    masks: dict[str, dict[str, Tensor]] = {task: {} for task in tasks}
    task_means = torch.zeros(len(tasks))
    unified_means = torch.zeros(len(tasks))
    for key in pool.keys():
        base = pool.pretrained_tensor(key)
        sign = elect_sign(theta - base for theta in pool.finetuned_tensors(key))
        largest = torch.zeros_like(base)  # maxi |Mi ⊙ τi| = |τuni|
        for i, theta in enumerate(pool.finetuned_tensors(key)):
            tau = theta - base
            mask = tau * sign > 0  # agrees with the elected sign (zeros never do)
            masks[tasks[i]][key] = pack_bits(mask)
            magnitude = torch.abs(tau)
            task_means[i] += torch.mean(magnitude)
            torch.maximum(largest, magnitude.masked_fill_(~mask, 0), out=largest)
        tau_uni[key] = largest * sign
        for i, task in enumerate(tasks):
            mask = unpack_bits(masks[task][key], base.shape)
            unified_means[i] += torch.mean(torch.where(mask, largest, 0.0))
    return tau_uni, masks, _rescalers(tasks, task_means, unified_means)


def modulated_tensor(base: Tensor, tau_uni: Tensor, mask: Tensor, rescaler: float) -> Tensor:
    """θt[key] = θ0[key] + rt · (Mt[key] ⊙ τuni[key]) (new tensor, built from θ0)."""
    return base + (tau_uni * mask) * torch.tensor(rescaler, dtype=torch.float32)


def modulated_body(
    pretrained: dict[str, Tensor], tau_uni: dict[str, Tensor], mask: dict[str, Tensor], rescaler: float
) -> dict[str, Tensor]:
    """θt = θ0 + rt · (Mt ⊙ τuni), new tensors built from θ0 (nothing added or removed in place)."""
    return {key: modulated_tensor(base, tau_uni[key], mask[key], rescaler) for key, base in pretrained.items()}


class EMRMerging(MergeMethod):
    """EMR-Merging: task t is scored with θ0 + rt · (Mt ⊙ τuni); γ elected, Mi masks, ri rescalers.

    No hyperparameters. Task-aware: there is one body per task, built when that task is scored
    (one in memory at a time), and inference needs the task identity.
    """

    display_name = "EMR-Merging"
    symbols: dict[str, str] = {}
    recommended: dict = {}
    kind = "task-aware"
    data = "none"

    def __init__(self, pool: ModelPool):
        super().__init__(pool)
        self._parts: tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, float]] | None = None

    def prepare_merge(self) -> None:
        """τuni, the bit-packed masks and the rescalers of the pool (``emr_parts``), once."""
        if self._parts is None:
            self._parts = emr_parts(self.pool)

    def parts(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]], dict[str, float]]:
        """``(tau_uni, packed_masks, rescalers)``: task -> key -> ``pack_bits(Mt[key])``, task -> rt."""
        self.prepare_merge()
        return self._parts

    def body_for(self, task: str) -> nn.Module:
        """Task ``task``'s own body θ0 + r_task · (M_task ⊙ τuni), built when first asked for and
        kept until another task's is (one body in memory at a time)."""
        if task not in self.tasks:
            raise KeyMissing(f"EMR-Merging has no task {task!r}; the pool's tasks are {', '.join(self.tasks)}.")

        def state() -> dict[str, Tensor]:  # the first call also computes τuni, the masks and the rescalers
            tau_uni, masks, rescalers = self.parts()
            shapes = self.pool.body_shapes()
            return {
                key: modulated_tensor(
                    self.pool.pretrained_tensor(key), tau_uni[key], unpack_bits(masks[task][key], shapes[key]), rescalers[task]
                )
                for key in self.pool.keys()
            }

        return self.task_body(task, state, f"EMR-Merging body of {task!r}")

    def bodies_at_inference(self) -> float:
        """θ0 + τuni (2 fp32 bodies), n bit-packed masks (n/32) and n fp32 scalars (n/d), d the
        body's number count (124,439,808 at GPT-2 small): 2.21875 + 7/d for n = 7."""
        d = sum(math.prod(shape) for shape in self.pool.body_shapes().values())
        n = len(self.tasks)
        return 2 + n / 32 + n / d

"""TALL masks: task t is scored with θ0 + m_t ⊙ τ_MTL, its own mask on the summed task vector.

Wang, Dimitriadis et al. 2024, "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024, https://arxiv.org/abs/2405.07813 (official code: nik-dim/tall_masks).
m_t = |θ0 − θt| > λ·|θ_MTL − θt|, τ_MTL = Σi τi. Inference needs the task identity. Details: docs/methods.md.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from mergelit.errors import KeyMissing, check_number
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned, pack_bits, tall_mask, task_vector_sum, unpack_bits


def tall_mask_bodies(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], tall_mask_lambda: float = 0.6
) -> dict[str, dict[str, Tensor]]:
    """Every task's body θ0 + m_t ⊙ τ_MTL over whole state dicts: task -> state dict."""
    check_finetuned(pretrained, finetuned)
    scale = torch.tensor(check_number(tall_mask_lambda, "tall_mask_lambda (λ)", 0), dtype=torch.float32)
    bodies: dict[str, dict[str, Tensor]] = {task: {} for task in finetuned}
    for key, theta0 in pretrained.items():
        tau_mtl = task_vector_sum(theta0, [body[key] for body in finetuned.values()])
        theta_mtl = theta0 + tau_mtl
        for task, body in finetuned.items():
            bodies[task][key] = theta0 + tau_mtl * tall_mask(theta0, body[key], theta_mtl, scale)
    return bodies


class TallMasks(MergeMethod):
    """TALL masks: task t is scored with θ0 + m_t ⊙ τ_MTL, built when scored (one body in memory at a time).

    Args:
        tall_mask_lambda: λ of every task's mask (FusionBench's 0.6); a larger λ gives sparser masks.
    """

    display_name = "TALL masks"
    symbols = {"tall_mask_lambda": "λ"}
    recommended = {"tall_mask_lambda": 0.6}
    kind = "task-aware"

    def __init__(self, pool: ModelPool, tall_mask_lambda: float = 0.6):
        super().__init__(pool)
        self.tall_mask_lambda = check_number(tall_mask_lambda, "tall_mask_lambda (λ)", 0)
        self._parts: tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]] | None = None
        self.mask_density: dict[str, float] = {}  # task -> the share of the body's entries its mask holds
        self.save_hyperparameters(ignore=["pool"])

    def reusable_key(self) -> str:
        return "task_vector_sum"  # τ_MTL depends on the pool alone: a λ sweep sums once (the masks depend on λ)

    def prepare_merge(self) -> None:
        """τ_MTL and every task's bit-packed mask, in one pass over the pool (two reads of each θt), once."""
        if self._parts is not None:
            return
        pool, tasks = self.pool, self.tasks
        scale = torch.tensor(self.tall_mask_lambda, dtype=torch.float32)
        sizes = {key: math.prod(shape) for key, shape in pool.body_shapes().items()}
        # τ_MTL and each task's packed masks live in one buffer each (a view per key): a few large
        # allocations leave no fragmented heap behind (separate tensors left ~1 GB unreturned at GPT-2 small).
        flat_sums = torch.empty(sum(sizes.values()))
        packed_total = sum(-(-size // 8) for size in sizes.values())
        flat_masks = {task: torch.empty(packed_total, dtype=torch.uint8) for task in tasks}
        sums: dict[str, Tensor] = {}
        masks: dict[str, dict[str, Tensor]] = {task: {} for task in tasks}
        held = dict.fromkeys(tasks, 0)
        offset = packed_offset = 0
        for key, size in sizes.items():
            theta0, thetas = pool.pretrained_tensor(key), pool.finetuned_tensors(key)
            tau_mtl = self.reused(key, lambda: task_vector_sum(theta0, thetas))
            theta_mtl = theta0 + tau_mtl
            packed_size = -(-size // 8)
            for task, theta in zip(tasks, thetas):
                mask = tall_mask(theta0, theta, theta_mtl, scale)
                held[task] += int(mask.sum())
                masks[task][key] = flat_masks[task][packed_offset : packed_offset + packed_size]
                masks[task][key].copy_(pack_bits(mask))
            sums[key] = flat_sums[offset : offset + size].view(theta0.shape)
            sums[key].copy_(tau_mtl)
            offset, packed_offset = offset + size, packed_offset + packed_size
            del tau_mtl, theta_mtl
        self.mask_density = {task: held[task] / offset for task in tasks}
        densities = ", ".join(f"{task} {density:.3f}" for task, density in self.mask_density.items())
        rank_zero_info("TALL masks (λ = %g): mask densities %s." % (self.tall_mask_lambda, densities))
        self._parts = (sums, masks)

    def merge(self) -> dict[str, Tensor]:
        raise NotImplementedError(
            "TALL masks have no single merged body: task t is scored with θ0 + m_t ⊙ τ_MTL; use body_for(task)."
        )

    def body_for(self, task: str) -> nn.Module:
        """Task ``task``'s own body θ0 + m_task ⊙ τ_MTL, kept until another task's is asked for."""
        if task not in self.tasks:
            raise KeyMissing(f"TALL masks have no task {task!r}; the pool's tasks are {', '.join(self.tasks)}.")

        def state() -> dict[str, Tensor]:  # the first call also computes τ_MTL and the masks
            self.pool.check()
            self.prepare_merge()
            (sums, masks), shapes, pool = self._parts, self.pool.body_shapes(), self.pool
            return {  # θ_t = θ0 + m_t ⊙ τ_MTL
                key: pool.pretrained_tensor(key) + sums[key] * unpack_bits(masks[task][key], shapes[key])
                for key in pool.keys()
            }

        return self.task_body(task, state, f"TALL-mask body of {task!r}")

    def bodies_at_inference(self) -> float:
        """θ0 + τ_MTL (2 fp32 bodies) and n bit-packed masks (n/32): 2.21875 for n = 7."""
        return 2 + len(self.tasks) / 32

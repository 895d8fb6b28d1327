"""Small pure helpers over state dicts (``dict[str, Tensor]``) used by the merge methods; none modifies
its inputs (the pool hands out its cached tensors)."""

from __future__ import annotations

import hashlib
import math
import re
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor


def check_same_keys_and_shapes(reference: dict[str, Tensor], other: dict[str, Tensor], name: str) -> None:
    """Raise ``ValueError`` naming the first key ``other`` (``"fine-tuned body 'cola'"``) lacks, adds or reshapes."""
    for key in sorted(reference.keys() | other.keys()):
        if key not in other:
            raise ValueError(f"The {name} has no tensor {key!r}; every body to merge must share one architecture.")
        if key not in reference:
            raise ValueError(
                f"The {name} has a tensor {key!r} the others lack; every body to merge must share one architecture."
            )
        if reference[key].shape != other[key].shape:
            raise ValueError(
                f"Tensor {key!r} of the {name} has shape {tuple(other[key].shape)}, expected "
                f"{tuple(reference[key].shape)}; every body to merge must share one architecture."
            )


def check_finetuned(pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]]) -> None:
    """Check there is at least one fine-tuned body and each has the pretrained body's keys and shapes."""
    if not finetuned:
        raise ValueError("No fine-tuned bodies to merge: give at least one task.")
    for task, body in finetuned.items():
        check_same_keys_and_shapes(pretrained, body, f"fine-tuned body {task!r}")


def task_vector_sum(theta0: Tensor, thetas: Iterable[Tensor]) -> Tensor:
    """Σ τi = Σ (θi − θ0) for one tensor, accumulated in task order (FusionBench's float32 rounding)."""
    values = iter(thetas)
    summed = next(values) - theta0
    for theta in values:
        summed += theta - theta0
    return summed


def tall_mask(theta0: Tensor, theta: Tensor, theta_mtl: Tensor, tall_mask_lambda: Tensor) -> Tensor:
    """TALL mask m_t = |θ0 − θt| > |θ_MTL − θt| · λ (bool), the official expression; λ a float32 0-d tensor."""
    # In place on the two fresh differences (the same bits as the expression): fewer temporaries.
    return (theta0 - theta).abs_() > (theta_mtl - theta).abs_().mul_(tall_mask_lambda)


def flatten(state_dict: dict[str, Tensor]) -> Tensor:
    """Every tensor of ``state_dict``, keys sorted by name, concatenated into one new 1-D tensor."""
    return torch.cat([state_dict[key].reshape(-1) for key in sorted(state_dict)])


def unflatten(vector: Tensor, reference: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``flatten``: views of ``vector`` in ``reference``'s shapes, keys in ``reference``'s order."""
    total = sum(tensor.numel() for tensor in reference.values())
    if vector.numel() != total:
        raise ValueError(f"Cannot unflatten a vector of {vector.numel()} entries into a state dict of {total}.")
    keys = sorted(reference)
    pieces = dict(zip(keys, torch.split(vector, [reference[key].numel() for key in keys])))
    return {key: pieces[key].view(reference[key].shape) for key in reference}


def matching_keys(keys: Iterable[str], patterns: Sequence[str]) -> set[str]:
    """The keys one of ``patterns`` matches at their start (``re.match``, as FusionBench's regexes)."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"Invalid regular expression {pattern!r}: {error}.") from None
    return {key for key in keys if any(regex.match(key) for regex in compiled)}


def add_scaled(pretrained: dict[str, Tensor], task_vector: dict[str, Tensor], scaling_factor: float) -> dict[str, Tensor]:
    """θ0 + λ τ, tensor by tensor (new tensors): how every task-vector method applies its λ."""
    return {key: pretrained[key] + scaling_factor * task_vector[key] for key in pretrained}


def tensors_fingerprint(tensors: dict[str, Tensor], digest=None) -> str:
    """SHA-256 of names, dtypes, shapes and bytes of ``tensors`` (keys sorted)."""
    digest = digest or hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---- TIES-Merging's steps (trim, elect, disjoint merge), shared by TIES, DARE-TIES and Consensus ----
MERGE_FUNCS = ("sum", "mean", "max")


def keep_fraction(threshold: float) -> float:
    """The share TIES's trim keeps, read as FusionBench reads ``threshold``: ≤ 1 a fraction, else a percentage."""
    return threshold if threshold <= 1 else threshold / 100


def _kth_smallest(values: Tensor, threshold: float) -> Tensor:
    """The trim cut, the k-th smallest of the flat ``values`` (partitioned in place: numpy is 5× ``kthvalue``)."""
    k = max(values.numel() - int(values.numel() * keep_fraction(threshold)), 1)
    array = values.detach().cpu().numpy()
    array.partition(k - 1)
    return torch.tensor(array[k - 1], dtype=values.dtype)


def trim(tau: Tensor, threshold: float) -> Tensor:
    """Trim: zero, in place, all but the top ``threshold`` of the flat ``tau`` by magnitude (ties at the cut kept)."""
    cut = _kth_smallest(tau.abs(), threshold)
    return tau.masked_fill_(tau.abs() < cut, 0)


def elect_sign(trimmed: Iterable[Tensor]) -> Tensor:
    """Elect: s = sign(Σ trimmed τi); its zeros take sign(Σ s), the majority sign."""
    sign = _summed_sign(trimmed)
    # Σ s summed exactly in float64 (a float32 sum of 124 M ±1 would round), so a merge that counts
    # key by key agrees with the whole-body one.
    return sign.masked_fill_(sign == 0, torch.sign(sign.sum(dtype=torch.float64)).to(sign.dtype))


def _summed_sign(trimmed: Iterable[Tensor]) -> Tensor:
    """sign(Σ trimmed τi), summed in task order (FusionBench's) from +0, so never −0."""
    summed = None
    for tau in trimmed:
        summed = torch.zeros_like(tau) + tau if summed is None else summed.add_(tau)
    return summed.sign_()


def disjoint_merge(trimmed: Iterable[Tensor], sign: Tensor, merge_func: str) -> Tensor:
    """Disjoint merge: aggregate the entries of the trimmed τi whose sign equals ``sign``: sum, mean or max."""
    magnitude = torch.zeros_like(sign)
    count = torch.zeros_like(sign) if merge_func == "mean" else None
    for tau in trimmed:
        agreeing = (tau * sign).clamp_(min=0)  # |τi| where sign(τi) == s, else 0 (trimmed entries are 0)
        if merge_func == "max":
            # Not torch.maximum: whether it returns +0 or -0 depends on the kernel (so on the tensor's
            # size); taking only strictly larger values keeps +0, so key by key gives the whole-body bits.
            torch.where(agreeing > magnitude, agreeing, magnitude, out=magnitude)
        else:
            magnitude += agreeing
            if count is not None:
                count += agreeing > 0
    if count is not None:
        magnitude /= count.clamp_(min=1)
    # Every kept entry has sign s, so their sum (mean, max) is s times the sum (mean, max) of magnitudes.
    return magnitude.mul_(sign)


# ---- bit-packed boolean masks (EMR-Merging's and TALL's per-task masks) ------------------------------
def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor as flat uint8, 8 entries a byte in ``reshape(-1)`` order (``numpy.packbits``)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().reshape(-1).numpy()))


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """The boolean tensor of ``shape`` that ``pack_bits`` packed (a new tensor)."""
    bits = np.unpackbits(packed.numpy(), count=math.prod(shape))  # 0/1 bytes
    return torch.from_numpy(bits).view(torch.bool).view(tuple(shape))


class TiesElection:
    """TIES's whole-body part (``ties_election``): each task's trim cut and every key's elected sign."""

    def __init__(self, belows: list[float], fill: float, signs: dict[str, Tensor]):
        self.belows, self.fill, self.signs = belows, fill, signs

    def trimmed(self, task_vectors: Iterable[Tensor]) -> Iterable[Tensor]:
        """Each τi of one key (in task order) trimmed at its task's cut, one at a time (new tensors)."""
        for tau, below in zip(task_vectors, self.belows):
            # hardshrink keeps x where |x| > below, i.e. |x| >= the cut (no float32 lies between them),
            # and writes +0 elsewhere: the bits of ``trim``'s masked_fill_, faster.
            yield torch.nn.functional.hardshrink(tau, below)

    def sign(self, key: str) -> Tensor:
        """The elected sign s of ``key`` (float32, zeros filled), handed out once."""
        sign = self.signs.pop(key).to(torch.float32)
        return sign.masked_fill_(sign == 0, self.fill)

    def merged(self, key: str, theta0: Tensor, thetas: Iterable[Tensor], merge_func: str) -> Tensor:
        """τm of ``key``: the task vectors θi − θ0 trimmed at the cuts, disjoint-merged under its sign."""
        sign = self.sign(key)
        return disjoint_merge(self.trimmed(theta - theta0 for theta in thetas), sign, merge_func)


def pool_task_vectors(pool) -> tuple[dict[str, int], int, Callable[[int, str], Tensor]]:
    """``ties_election``'s first three arguments for a ``ModelPool``'s task vectors τi = θi − θ0."""
    def task_vector(i: int, key: str) -> Tensor:
        return pool.finetuned_tensor(pool.tasks[i], key) - pool.pretrained_tensor(key)

    return {key: shape.numel() for key, shape in pool.body_shapes().items()}, len(pool.tasks), task_vector


def ties_election(
    numels: dict[str, int], num_tasks: int, task_vector: Callable[[int, str], Tensor], threshold: float
) -> TiesElection:
    """TIES's trim cuts and elected signs over a whole body (keys and sizes ``numels``), reading τi[key] =
    ``task_vector(i, key)`` (a new tensor) twice: per task, |τi| in one reused body-sized buffer and its exact
    cut (kept as the largest float32 below it); per key, s = sign(Σ trimmed τi) as int8, and Σ s."""
    buffer = torch.empty(sum(numels.values()))
    belows = []
    for i in range(num_tasks):
        offset = 0
        for key, numel in numels.items():
            torch.abs(task_vector(i, key).reshape(-1), out=buffer[offset : offset + numel])
            offset += numel
        cut = _kth_smallest(buffer, threshold)
        belows.append(float(torch.nextafter(cut, torch.tensor(-float("inf")))))
    del buffer
    election = TiesElection(belows, 0.0, {})
    total = 0.0
    for key in numels:
        sign = _summed_sign(election.trimmed(task_vector(i, key) for i in range(num_tasks)))
        total += float(sign.sum(dtype=torch.float64))  # an integer count, exact in float64
        election.signs[key] = sign.to(torch.int8)
    election.fill = float(torch.sign(torch.tensor(total, dtype=torch.float64)))
    return election

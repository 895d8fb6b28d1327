"""Linear algebra shared by the SVD methods (TSV-M, Iso-C, Iso-CTS, CART) and WUDI, one tensor at a time:
task vectors computed when read (``TaskVectors``), float32 decompositions, the rank-deficiency warning,
which tensors take the SVD path, and the sums in FusionBench's order (the merged bits depend on it)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from mergelit.errors import KeyMissing
from mergelit.gpt2 import is_conv1d_weight

SVD_KEYS = ("all_2d", "conv1d")  # which 2-D tensors the SVD methods decompose: every one (FusionBench), or Conv1D only


class IllPosedMergeWarning(UserWarning):
    """A task vector (or sum) has fewer non-zero singular values than kept: the merge depends on the LAPACK build."""


class TaskVectors(Sequence):
    """τi = αi (θi − θ0) of one tensor (αi = ``weights[i]``, or 1), computed from ``thetas[i]`` each time it
    is read: a pass holds one at a time, a second recomputes them bit for bit. ``transpose`` gives θiᵀ − θ0ᵀ
    (Iso-CTS and WUDI run GPT-2's [in, out] Conv1D weights as [out, in])."""

    def __init__(self, theta0: Tensor, thetas: Sequence[Tensor], weights: Sequence[float] | None = None, transpose: bool = False):
        self.theta0, self.thetas, self.weights, self.transpose = theta0, thetas, weights, transpose

    def __len__(self) -> int:
        return len(self.thetas)

    def __getitem__(self, index: int) -> Tensor:
        if isinstance(index, slice):
            raise TypeError("TaskVectors are read one at a time (a slice would hold them all).")
        theta = self.thetas[index]
        tau = theta.T - self.theta0.T if self.transpose else theta - self.theta0
        return tau if self.weights is None else tau.mul_(self.weights[index])

    def __iter__(self) -> Iterator[Tensor]:
        return (self[index] for index in range(len(self)))

    def transposed(self) -> TaskVectors:
        """The same task vectors, each transposed: θiᵀ − θ0ᵀ, from views of θi and θ0."""
        return TaskVectors(self.theta0, self.thetas, self.weights, not self.transpose)


def svd_applies(key: str, tensor: Tensor, svd_keys: str, exclude_keys: Sequence[str] = ()) -> bool:
    """Whether the SVD path handles ``key``: 2-D, not excluded, and a Conv1D weight if ``svd_keys`` is ``conv1d``."""
    if tensor.dim() != 2 or key in exclude_keys:
        return False
    return svd_keys == "all_2d" or is_conv1d_weight(key)


def check_exclude_keys(keys: Iterable[str], exclude_keys: Sequence[str]) -> None:
    """Refuse an ``exclude_keys`` entry that is not a tensor of the body: a typo would silently SVD it."""
    known = set(keys)
    unknown = [key for key in exclude_keys if key not in known]
    if unknown:
        raise KeyMissing(
            f"exclude_keys names {unknown}, which {'is' if len(unknown) == 1 else 'are'} not a tensor of the body; "
            f"give exact state-dict keys such as 'wte.weight' or 'wpe.weight'."
        )


def thin_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in float32 (float64 kept); a wide matrix through its transpose (CPU LAPACK: 2.5-3× faster)."""
    if matrix.dtype not in (torch.float32, torch.float64):
        matrix = matrix.float()  # LAPACK has no half precision (FusionBench upcasts too)
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = torch.linalg.svd(matrix.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(matrix, full_matrices=False)


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor A Bᵀ of ``matrix`` = A Σ Bᵀ, the nearest matrix with orthonormal columns (rows)."""
    u, _, vh = thin_svd(matrix)
    return u @ vh


def low_rank(matrix: Tensor, rank: int) -> Tensor:
    """The best rank-``rank`` approximation (Eckart–Young): the top singular triplets of ``matrix``."""
    u, s, vh = thin_svd(matrix)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(matrix.dtype)


def numerical_rank(singular_values: Tensor, shape: Sequence[int]) -> int:
    """Number of singular values above max(s) · max(shape) · eps (``torch.linalg.matrix_rank``'s default)."""
    if singular_values.numel() == 0:
        return 0
    tolerance = singular_values.max() * max(shape) * torch.finfo(singular_values.dtype).eps
    return int((singular_values > tolerance).sum())


def warn_rank_deficient(method: str, name: str, kept: int, ranks: dict[str, int], advice: str) -> None:
    """Warn once for tensor ``name`` about the parts (task -> numerical rank) whose rank is below ``kept``."""
    low = {part: rank for part, rank in ranks.items() if rank < kept}
    if low:
        listed = ", ".join(f"{part} (rank {rank})" for part, rank in low.items())
        warnings.warn(
            f"{method}: {name!r} keeps {kept} singular vectors per part but {listed} "
            f"{'has' if len(low) == 1 else 'have'} fewer non-zero singular values; the vectors kept for "
            f"the zero ones are arbitrary, so the merged {name!r} depends on the device and LAPACK build. "
            f"{advice}",
            IllPosedMergeWarning,
            stacklevel=3,
        )


def ordered_sum(tensors: Iterable[Tensor]) -> Tensor:
    """t1 + t2 + … in order (Python's ``sum``, as FusionBench calls it), a new tensor; reads each once."""
    total = None
    for tensor in tensors:
        total = tensor.clone() if total is None else total.add_(tensor)
        del tensor  # before the next one is read
    return total


def running_mean(tensors: Iterable[Tensor]) -> Tensor:
    """m ← t1, m ← m + (ti − m)/i: FusionBench's mean of TSV-M's and Iso-CTS's other keys (a new
    tensor; it differs from Σ ti / n in the last bit)."""
    mean = None
    for i, tensor in enumerate(tensors, start=1):
        mean = tensor.clone() if mean is None else mean.add_((tensor - mean) / i)
    return mean

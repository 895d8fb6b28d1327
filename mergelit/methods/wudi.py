"""WUDI merging: find the merged task vector that least disturbs each task's own inputs.

Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors", https://arxiv.org/abs/2503.08099.

With τi = θi − θ0, θ* = θ0 + τ on every key. On 2-D tensors not in ``exclude_keys`` (wte, wpe, the
48 Conv1D weights) τ starts at Σ τi and takes ``iter_num`` full-batch Adam steps (betas 0.9/0.999,
eps 1e-8) on L(τ) = Σi ‖(τ − τi) τiᵀ‖²_F / ‖τi‖²_F (τ, τi as [out, in]): the rows of τi span the
inputs task i saw, so τ − τi should vanish on them; the result is the last iterate. Other tensors:
(Σ τi)/n (``others: mean``, FusionBench's) or θ0 (``pretrained``, the paper's code). GPT-2 stores
2-D tensors input index first, so ``side: input`` runs the formula on Wᵀ (the paper's loss) and
``fusionbench`` on the stored layout. ``gradient: gram`` feeds Adam 2 Σi (τ − τi) Gi/ci from
precomputed Gram sums, ``autograd`` back-propagates in FusionBench's order (its iterates, bit for bit
on CPU). The Gram form, what differs from FusionBench, the closed form and the cost: docs/methods.md, "WUDI".
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mergelit.errors import KeyMissing, MergelitError, check_choice, check_integer, check_number
from mergelit.linalg import TaskVectors, ordered_sum
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned

# A key whose [n, a, a] loss product is larger than this is refused on the paths that stack it
# (FusionBench's wte on GPT-2 is 65.9 GiB, and autograd needs about three times the product).
MAX_PRODUCT_BYTES = 4 * 2**30


def _check_arguments(iter_num: int, lr: float, side: str, solver: str, gradient: str, others: str) -> tuple[int, float]:
    """Check every argument; return (iter_num, lr)."""
    check_choice(side, "side", ("input", "fusionbench"))
    check_choice(solver, "solver", ("adam", "closed_form"))
    check_choice(gradient, "gradient", ("gram", "autograd"))
    check_choice(others, "others", ("mean", "pretrained"))
    iter_num = check_integer(iter_num, "iter_num (the number of Adam steps)", 0)
    return iter_num, check_number(lr, "lr (η, Adam's learning rate)", 0, low_open=True)


def interference_loss(merged: Tensor, task_vectors: Tensor, squared_norms: Tensor) -> Tensor:
    """L(τ) = Σi ‖(τ − τi) τiᵀ‖²_F / ‖τi‖²_F, τi stacked [n, a, b], τ [a, b], in FusionBench's order of
    operations (difference, batched product, square, divide, sum): its Adam iterates to the bit on CPU."""
    product = torch.matmul(merged.unsqueeze(0) - task_vectors, task_vectors.transpose(1, 2))
    return torch.sum(torch.square(product) / squared_norms.unsqueeze(-1).unsqueeze(-1))


def _nonzero_task_vectors(task_vectors: Tensor) -> tuple[Tensor, Tensor]:
    """The stacked τi with ‖τi‖ > 0 and their squared norms: a zero τi's term is 0 for every τ,
    and keeping it would divide 0 by 0."""
    squared_norms = torch.square(torch.linalg.vector_norm(task_vectors.reshape(task_vectors.shape[0], -1), dim=-1))
    nonzero = squared_norms > 0
    if bool(nonzero.all()):  # the usual case: no copy, so the iterates are FusionBench's
        return task_vectors, squared_norms
    return task_vectors[nonzero], squared_norms[nonzero]


def _adam(start: Tensor, lr: float) -> tuple[torch.nn.Parameter, torch.optim.Adam]:
    """τ (a parameter, from ``start``) and FusionBench's Adam on it: the one optimiser both gradients feed."""
    merged = torch.nn.Parameter(start)
    return merged, torch.optim.Adam([merged], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)


def minimise_interference_adam(
    task_vectors: Tensor, iter_num: int, lr: float, device: str | torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """(τ, L at iterates 0 .. iter_num − 1): ``iter_num`` full-batch Adam steps on L from τ = Σ τi, the τi
    stacked [n, a, b], the gradient by autograd through FusionBench's order of operations (its
    iterates, bit for bit on CPU); on ``device`` (default: where ``task_vectors`` are)."""
    if device is not None:
        task_vectors = task_vectors.to(device)
    with torch.inference_mode(False), torch.enable_grad():
        if task_vectors.is_inference():  # made under inference mode: autograd cannot save it
            task_vectors = task_vectors.clone()
        # The sum over the stacked dimension: FusionBench's starting point.
        merged, optimizer = _adam(torch.sum(task_vectors, dim=0), lr)
        active, squared_norms = _nonzero_task_vectors(task_vectors)
        losses: list[Tensor] = []
        if iter_num > 0 and active.shape[0] > 0:
            for _ in range(iter_num):
                loss = interference_loss(merged, active, squared_norms)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
        losses_tensor = torch.stack(losses) if losses else torch.zeros(0, dtype=task_vectors.dtype)
        return merged.detach(), losses_tensor


def minimise_interference_gram(
    task_vectors: Sequence[Tensor], iter_num: int, lr: float, device: str | torch.device | None = None
) -> Tensor:
    """τ after ``iter_num`` Adam steps on L from τ0 = Σ τi (τ1..τn each [a, b], read twice, one at a
    time), fed 2((τ − τ0) A + C0) with A = Σi Gi/ci and C0 = Σi (τ0 − τi) Gi/ci computed once in
    float64: one [a, b] × [b, b] product a step. On ``device`` (default CPU)."""
    device = torch.device(device or "cpu")
    with torch.inference_mode(False):
        # Pass 1: τ0 = Σ τi (in task order), ci, and the input columns some task changed.
        start, norms, changed = None, [], None
        for tau in task_vectors:
            tau = tau.to(device).contiguous()  # row-major [a, b] whatever the caller's layout
            start = tau.clone() if start is None else start.add_(tau)
            norms.append(torch.square(torch.linalg.vector_norm(tau)).item())
            changed = tau.ne(0).any(dim=0) if changed is None else changed.logical_or_(tau.ne(0).any(dim=0))
            del tau
        # A zero τi's term is 0 for every τ (and would divide 0 by 0). A column no task changed has a
        # zero gradient, so Adam leaves it at τ0 = 0: it is left out of the products.
        active = [i for i, norm in enumerate(norms) if norm > 0]
        if iter_num == 0 or not active:
            return start
        columns = None if bool(changed.all()) else changed.nonzero().squeeze(1)
        origin = start if columns is None else start[:, columns].contiguous()
        a, b = origin.shape
        # Pass 2, in float64: A = Σ Gi/ci and C0 = Σ (τ0 − τi) Gi/ci.
        origin64 = origin.double()
        gram = origin64.new_zeros((b, b))
        gradient0 = torch.zeros_like(origin64)
        for i in active:
            tau = task_vectors[i].to(device)
            tau64 = (tau if columns is None else tau[:, columns]).double()
            del tau
            g_i = (tau64.T @ tau64).div_(norms[i])
            gram += g_i
            if 2 * a < b:  # ((τ0 − τi) τiᵀ) τi/ci: 2·a²·b flop instead of a·b²
                gradient0.addmm_((origin64 - tau64) @ tau64.T, tau64, alpha=1 / norms[i])
            else:
                gradient0.addmm_(origin64 - tau64, g_i)
            del tau64, g_i
        gram, gradient0 = gram.float(), gradient0.float()
        del origin64
        # The Adam steps, each on g = 2((τ − τ0) A + C0).
        merged, optimizer = _adam(origin.clone(), lr)
        delta, grad = torch.empty_like(origin), torch.empty_like(origin)
        for _ in range(iter_num):
            with torch.no_grad():
                torch.sub(merged, origin, out=delta)
                torch.matmul(delta, gram, out=grad)
                grad.add_(gradient0).mul_(2)
            merged.grad = grad
            optimizer.step()
        if columns is None:
            return merged.detach()
        start[:, columns] = merged.detach()
        return start


def gram_applies(shape: Sequence[int], n: int) -> bool:
    """Whether the Gram form saves work on an [a, b] tensor with n task vectors: A ([b, b]) no larger
    than them (b ≤ n·a). Otherwise (wte on the input side) autograd costs no more, with FusionBench's bits."""
    a, b = shape
    return b <= n * a


def minimise_interference_closed_form(task_vectors: Tensor, key: str = "tensor") -> Tensor:
    """τ* = (Σi τi Gi/ci)(Σi Gi/ci)⁺, the minimiser of L, warning (naming ``key``) when it is not unique.

    L's gradient is 0 where τ AᵀA = Σi τi Gi/ci, A the τi/√ci stacked row-wise ([n·a, b]): the normal
    equation of min ‖A τᵀ − Cᵀ‖, Cᵀ the blocks τi τiᵀ/√ci ([n·a, a]). A float64 least-squares solve
    never squares AᵀA's condition number and gives the minimum-norm minimiser when singular.
    """
    active, squared_norms = _nonzero_task_vectors(task_vectors)
    n, a, b = active.shape
    if n == 0:
        return torch.zeros_like(task_vectors[0])
    vectors = active.double()
    scaled = vectors / squared_norms.double().sqrt().view(-1, 1, 1)  # Ai = τi / √ci
    design = scaled.reshape(n * a, b)
    target = torch.matmul(scaled, vectors.transpose(1, 2)).reshape(n * a, a)
    solution = torch.linalg.lstsq(design, target, driver="gelsd")
    if int(solution.rank) < min(n * a, b):
        warnings.warn(
            f"WUDI closed form on {key!r}: Σ Gi/ci has numerical rank {int(solution.rank)} < "
            f"{min(n * a, b)}, so the loss has many minimisers; taking the minimum-norm one "
            f"(depends on the library's rank cut-off).",
            stacklevel=3,
        )
    return solution.solution.T.to(task_vectors.dtype)


def _stacked_task_vectors(theta0: Tensor, thetas: Sequence[Tensor], transpose: bool) -> Tensor:
    """[n, ...]: τi = θi − θ0 (transposed if asked), written straight into one tensor, one θi read
    at a time (no list of n temporaries: wte's stack alone is 1 GiB at GPT-2 small)."""
    base = theta0.T if transpose else theta0
    stacked = base.new_empty((len(thetas), *base.shape))
    for i, theta in enumerate(thetas):
        torch.sub(theta.T if transpose else theta, base, out=stacked[i])
    return stacked


def wudi_merge_tensor(
    theta0: Tensor, thetas: Sequence[Tensor], optimise: bool, iter_num: int = 400, lr: float = 1e-5,
    side: Literal["input", "fusionbench"] = "input", solver: Literal["adam", "closed_form"] = "adam",
    gradient: Literal["gram", "autograd"] = "gram", others: Literal["mean", "pretrained"] = "mean",
    key: str = "tensor", device: str | torch.device | None = None,
) -> Tensor:
    """θ*[key] = θ0 + τ (on θ0's device) from θ0[key] and θ1[key] … θn[key]: τ from the loss if
    ``optimise`` (a 2-D key not excluded), else per ``others``; the other arguments as ``WUDIMerging``'s,
    ``device`` where the optimisation runs (default CPU; the closed form always solves on the CPU)."""
    if not optimise:
        if others == "pretrained":  # the paper's code: only the optimised tensors move
            return theta0
        if gradient == "autograd":  # FusionBench's sum over the stacked task vectors, bit for bit
            return theta0 + torch.sum(_stacked_task_vectors(theta0, thetas, transpose=False), dim=0) / len(thetas)
        return theta0 + ordered_sum(TaskVectors(theta0, thetas)) / len(thetas)
    # On the input side the τi go to [out, in], where the formula is the paper's.
    transpose = side == "input"
    shape = theta0.T.shape if transpose else theta0.shape
    if solver == "adam" and gradient == "gram" and gram_applies(shape, len(thetas)):
        tau = minimise_interference_gram(TaskVectors(theta0, thetas, transpose=transpose), iter_num, lr, device)
    else:
        stacked = _stacked_task_vectors(theta0, thetas, transpose)
        if solver == "adam":
            tau, _ = minimise_interference_adam(stacked, iter_num, lr, device)
        else:  # LAPACK's gelsd (the minimum-norm solve) is CPU-only
            tau = minimise_interference_closed_form(stacked, key)
        del stacked
    tau = tau.to(theta0.device)
    return theta0 + (tau.T if transpose else tau)


def _optimised_keys(shapes: dict[str, Sequence[int]], exclude_keys: Sequence[str]) -> list[str]:
    """The keys whose τ minimises the loss: 2-D and not excluded (FusionBench's rule)."""
    unknown = sorted(set(exclude_keys) - shapes.keys())
    if unknown:
        raise KeyMissing(f"exclude_keys names {unknown[0]!r}, which is not a tensor of the body; give exact state-dict keys.")
    return [key for key, shape in shapes.items() if len(shape) == 2 and key not in exclude_keys]


def _check_products(
    shapes: dict[str, Sequence[int]], optimised: list[str], n: int, side: str, solver: str, gradient: str
) -> None:
    """Refuse a key whose stacked fp32 [n, a, a] loss product (autograd, closed form) would not fit."""
    # The product is [a, a] for the τi as optimised, [a, b]: on the input side τiᵀ ([out, in] for
    # GPT-2's [in, out] storage, so [out, out]); on FusionBench's, the stored rows ([in, in]).
    for key in optimised:
        shape = tuple(reversed(shapes[key])) if side == "input" else tuple(shapes[key])
        if solver == "adam" and gradient == "gram" and gram_applies(shape, n):
            continue  # the Gram form never forms the product
        rows = shape[0]
        size = n * rows * rows * 4
        if size <= MAX_PRODUCT_BYTES:
            continue
        fixes = "use gradient: gram (the default, which never forms it), " if solver == "adam" else ""
        fixes += f"exclude it (exclude_keys: [{key}]"
        if side == "fusionbench":
            fixes += ", FusionBench's own workaround: it then gets θ0 + mean τ) or use side: input"
        else:
            fixes += ")"
        raise MergelitError(
            f"WUDI side={side!r} on {key!r} needs a [{n}, {rows}, {rows}] loss product "
            f"({size / 2**30:.1f} GiB, about three times that with autograd); {fixes}."
        )


def wudi_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], iter_num: int = 400, lr: float = 1e-5,
    exclude_keys: list[str] | None = None, side: Literal["input", "fusionbench"] = "input",
    solver: Literal["adam", "closed_form"] = "adam", gradient: Literal["gram", "autograd"] = "gram",
    others: Literal["mean", "pretrained"] = "mean", device: str | torch.device | None = None, progress: bool = True,
) -> dict[str, Tensor]:
    """θ* = θ0 + τ over whole bodies (the reference ``WUDIMerging``'s per-key merge is tested against);
    arguments as ``WUDIMerging``'s, ``device`` where the optimisation runs (the result is on CPU),
    ``progress`` a progress bar over the keys."""
    iter_num, lr = _check_arguments(iter_num, lr, side, solver, gradient, others)
    check_finetuned(pretrained, finetuned)
    shapes = {key: tuple(tensor.shape) for key, tensor in pretrained.items()}
    optimised = set(_optimised_keys(shapes, list(exclude_keys or [])))
    _check_products(shapes, sorted(optimised), len(finetuned), side, solver, gradient)

    from tqdm.auto import tqdm

    return {
        key: wudi_merge_tensor(
            base, [body[key] for body in finetuned.values()], key in optimised, iter_num, lr, side, solver,
            gradient, others, key, device,
        )
        for key, base in tqdm(pretrained.items(), desc="WUDI", leave=False, disable=not progress)
    }


class WUDIMerging(MergeMethod):
    """WUDI: θ0 + τ, τ from Adam on Σi ‖τiᵀ(τ − τi)‖²/‖τi‖² per 2-D tensor (mean τi elsewhere), on the
    Trainer's device (a GPU when it has one).

    Args:
        iter_num: Adam steps per 2-D tensor (FusionBench's ``wudi.yaml``: 400); 0 gives Task Arithmetic
            with λ = 1 on the 2-D tensors.
        lr: η, Adam's learning rate (FusionBench fixes 1e-5; the paper's RoBERTa code uses 2e-5).
        exclude_keys: exact names of 2-D tensors treated like the 1-D ones (FusionBench's), e.g. ``[wte.weight]``.
        side: ``input`` (default): the paper's loss for GPT-2's [in, out] storage of Conv1D and embeddings;
            ``fusionbench``: FusionBench's formula on the stored layout (the output side of Conv1D).
        solver: ``adam`` (default, the paper and FusionBench) or ``closed_form``: the loss's exact
            (minimum-norm) minimiser; changes the numbers (Adam stays near Σ τi).
        gradient: ``gram`` (default): from Gram sums precomputed per tensor, one [a, b] × [b, b]
            product per Adam step, wherever that saves work (with 7 tasks all of GPT-2 small's but wte
            on the input side, which takes ``autograd``); within 8.2e-8 of ``autograd`` after 400 steps
            where measured. ``autograd``: back-propagation through FusionBench's loss, its iterates bit
            for bit on CPU (with ``side: fusionbench`` GPT-2's wte then needs ``exclude_keys: [wte.weight]``).
        others: the tensors not optimised: ``mean`` (default, FusionBench) θ0 + the mean τi;
            ``pretrained``: θ0, as the paper's code leaves them.
    """

    display_name = "WUDI"
    symbols = {"iter_num": "steps", "lr": "η"}
    quick = {"iter_num": 20}
    # No reusable_key: there is no λ, and every argument changes the iterates.

    def __init__(
        self,
        pool: ModelPool,
        iter_num: int = 400,
        lr: float = 1e-5,
        exclude_keys: list[str] | None = None,
        side: Literal["input", "fusionbench"] = "input",
        solver: Literal["adam", "closed_form"] = "adam",
        gradient: Literal["gram", "autograd"] = "gram",
        others: Literal["mean", "pretrained"] = "mean",
    ):
        super().__init__(pool)
        self.iter_num, self.lr = _check_arguments(iter_num, lr, side, solver, gradient, others)
        self.exclude_keys = list(exclude_keys) if exclude_keys else []
        self.side, self.solver, self.gradient, self.others = side, solver, gradient, others
        self._optimised: set[str] = set()
        self._device = torch.device("cpu")
        self.save_hyperparameters(ignore=["pool"])

    def merge_device(self) -> torch.device:
        """Where the optimisation runs: the Trainer's device when the method is attached to one
        (``setup`` runs before Lightning moves the module there), else the CPU."""
        trainer = self._trainer
        return torch.device("cpu") if trainer is None else torch.device(trainer.strategy.root_device)

    def prepare_merge(self) -> None:
        shapes = {key: tuple(shape) for key, shape in self.pool.body_shapes().items()}
        optimised = _optimised_keys(shapes, self.exclude_keys)
        _check_products(shapes, optimised, len(self.tasks), self.side, self.solver, self.gradient)
        self._optimised = set(optimised)
        self._device = self.merge_device()

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        return wudi_merge_tensor(
            theta0, thetas, key in self._optimised, self.iter_num, self.lr, self.side, self.solver, self.gradient,
            self.others, key, self._device,
        )

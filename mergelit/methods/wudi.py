"""WUDI merging: find the merged task vector that least disturbs each task's own inputs.

Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors", https://arxiv.org/abs/2503.08099.

With τi = θi − θ0, per tensor (no λ; θ* = θ0 + τ on every key):

- 2-D tensors not in ``exclude_keys`` (FusionBench's rule: wte, wpe and the 48 Conv1D weights):
  start from τ = Σ τi and take ``iter_num`` full-batch Adam steps (lr 1e-5, betas 0.9/0.999,
  eps 1e-8, no weight decay) on the interference loss

      L(τ) = Σi ‖(τ − τi) τiᵀ‖²_F / ‖τi‖²_F        (τ, τi as [out, in], y = τ x)

  The paper's argument: the rows of a task's update τi span the inputs that task saw, so τ − τi
  should vanish on them. The result is the last iterate, not the minimiser.
- Every other tensor (LN, biases, excluded keys): the mean (Σ τi)/n.

**Which side (GPT-2 stores every 2-D body tensor input index first).** Conv1D keeps W as
[in, out] (y = x W), and an embedding as [vocab or positions, width] (its rows are indexed by the
input token), so the paper's loss is Σi ‖τiᵀ(τ − τi)‖² / ‖τi‖²: FusionBench's formula applied to
Wᵀ. ``side="input"`` (default) does exactly that: it transposes the 50 2-D tensors, runs the
formula, and transposes back. ``side="fusionbench"`` uses the formula on the stored layout, as
FusionBench's ``wudi_merging`` does on a GPT-2 pool: the output-side Gram of Conv1D, the other
side from the paper's (on a tiny pool the two results differ by ~2× the size of the update).

**What differs from FusionBench and why.**

- FusionBench cannot run WUDI on GPT-2 as-is: on wte its product is [7, 50257, 50257] fp32
  (65.9 GiB, over 190 GiB with autograd). mergelit's defaults say that where FusionBench cannot
  run, the default is the paper's method: the input side, where wte's product is [7, 768, 768].
  ``side="fusionbench"`` reproduces FusionBench bit-exactly on CPU where it can run; it refuses a
  key whose product would exceed 4 GiB (wte on GPT-2) and names the fix, FusionBench's own
  workaround ``exclude_keys: [wte.weight]`` (wte then gets θ0 + mean τ).
- A task vector that is 0 on a tensor (a task that did not change it) makes FusionBench divide
  0 by 0 (NaN); here that task's term is left out of the loss (it is 0 for every τ).
- ``lr`` is an argument (FusionBench fixes 1e-5); ``iter_num`` defaults to 400 as FusionBench's
  ``wudi.yaml`` (its function's default is 300, the paper's ViT code uses 300).
- ``solver="closed_form"`` (an option; neither implementation has it, and it changes the numbers):
  the loss is a convex quadratic, minimised by τ* = (Σi τi Gi/ci)(Σi Gi/ci)⁺ with Gi = τiᵀτi and
  ci = ‖τi‖², solved as a float64 least-squares problem (the minimum-norm minimiser when the
  system is singular, as it is for wte on the input side: the loss sees only the tokens the tasks
  changed). Adam with lr 1e-5 moves each entry about 1e-5 per step, so 400 steps land near
  Task Arithmetic (λ = 1), far from τ*.

Cost: each Adam step is about 4·n·a²·b flop for a key whose loss product is [a, a]. At GPT-2
small, input side, that is ≈5.4 TFLOP per step (≈0.8 of it wte): hours on a CPU for 400 steps.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import Tensor

from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned

SIDES = ("input", "fusionbench")
SOLVERS = ("adam", "closed_form")
# A key whose [n, a, a] loss product is larger than this is refused (FusionBench's wte on GPT-2 is
# 65.9 GiB, and autograd needs about three times the product).
MAX_PRODUCT_BYTES = 4 * 2**30


def _check_arguments(iter_num: int, lr: float, side: str, solver: str) -> None:
    if isinstance(iter_num, bool) or not isinstance(iter_num, int) or iter_num < 0:
        raise ValueError(f"iter_num must be an integer >= 0 (the number of Adam steps), got {iter_num!r}.")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0 (Adam's learning rate), got {lr}.")
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(SIDES)}; got {side!r}.")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}.")


def interference_loss(merged: Tensor, task_vectors: Tensor, squared_norms: Tensor) -> Tensor:
    """L(τ) = Σi ‖(τ − τi) τiᵀ‖²_F / ‖τi‖²_F for ``task_vectors`` stacked as [n, a, b], τ [a, b].

    Written in FusionBench's order of operations (difference, batched product, square, divide,
    sum) so that the Adam iterates match its own to the bit on CPU.
    """
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


def minimise_interference_adam(task_vectors: Tensor, iter_num: int, lr: float) -> tuple[Tensor, Tensor]:
    """τ after ``iter_num`` full-batch Adam steps on L from τ = Σ τi, and L at each iterate.

    Args:
        task_vectors: the τi stacked as [n, a, b]; the loss product is [a, a].
        iter_num: number of Adam steps (0 gives Σ τi).
        lr: Adam's learning rate.

    Returns:
        (τ [a, b], losses [iter_num]: L at iterates 0 .. iter_num − 1, each before its step).
    """
    with torch.inference_mode(False), torch.enable_grad():
        if task_vectors.is_inference():  # made under inference mode: autograd cannot save it
            task_vectors = task_vectors.clone()
        # The sum over the stacked dimension: FusionBench's starting point.
        merged = torch.nn.Parameter(torch.sum(task_vectors, dim=0))
        active, squared_norms = _nonzero_task_vectors(task_vectors)
        losses: list[Tensor] = []
        if iter_num > 0 and active.shape[0] > 0:
            optimizer = torch.optim.Adam([merged], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
            for _ in range(iter_num):
                loss = interference_loss(merged, active, squared_norms)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
        losses_tensor = torch.stack(losses) if losses else torch.zeros(0, dtype=task_vectors.dtype)
        return merged.detach(), losses_tensor


def minimise_interference_closed_form(task_vectors: Tensor, key: str = "tensor") -> Tensor:
    """τ* = (Σi τi Gi/ci)(Σi Gi/ci)⁺, Gi = τiᵀτi, ci = ‖τi‖²: the minimiser of L (float64 solve).

    Setting L's gradient 2 Σi (τ − τi) Gi/ci to 0 gives τ AᵀA = Σi τi Gi/ci with A the τi/√ci
    stacked row-wise ([n·a, b]), which is the normal equation of min ‖A τᵀ − Cᵀ‖, Cᵀ the blocks
    τi τiᵀ/√ci stacked ([n·a, a]). A least-squares solve avoids forming (and squaring the
    condition number of) AᵀA, and gives the minimum-norm minimiser when the system is singular.
    Warns, naming ``key``, when the minimiser is not unique beyond that structure.
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


def _check_product_size(key: str, rows: int, n: int, element_size: int, side: str) -> None:
    size = n * rows * rows * element_size
    if size > MAX_PRODUCT_BYTES:
        fix = (
            f"exclude it (exclude_keys: [{key}], FusionBench's own workaround: it then gets θ0 + mean τ) "
            f"or use side: input"
            if side == "fusionbench"
            else f"exclude it (exclude_keys: [{key}])"
        )
        raise ValueError(
            f"WUDI side={side!r} on {key!r} needs a [{n}, {rows}, {rows}] loss product "
            f"({size / 2**30:.1f} GiB, about three times that with autograd); {fix}."
        )


def wudi_merge(
    pretrained: dict[str, Tensor],
    finetuned: dict[str, dict[str, Tensor]],
    iter_num: int = 400,
    lr: float = 1e-5,
    exclude_keys: list[str] | None = None,
    side: Literal["input", "fusionbench"] = "input",
    solver: Literal["adam", "closed_form"] = "adam",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """θ* = θ0 + τ, τ minimising the interference loss on 2-D keys and the mean τi elsewhere.

    Args:
        pretrained: θ0, the pretrained body's state dict.
        finetuned: task -> θi, the fine-tuned bodies' state dicts.
        iter_num: Adam steps per 2-D key (``solver="adam"``).
        lr: Adam's learning rate.
        exclude_keys: exact key names (as FusionBench) of 2-D tensors that take the mean instead.
        side: ``"input"`` (the paper's side for GPT-2's [in, out] storage) or ``"fusionbench"``
            (the formula on the stored layout).
        solver: ``"adam"`` (the paper and FusionBench) or ``"closed_form"`` (the exact minimiser).
        device: where the optimisation runs (default CPU); the result is on CPU.
        progress: show a progress bar over the keys.
    """
    _check_arguments(iter_num, lr, side, solver)
    check_finetuned(pretrained, finetuned)
    excluded = set(exclude_keys or [])
    unknown = sorted(excluded - pretrained.keys())
    if unknown:
        raise ValueError(f"exclude_keys names {unknown[0]!r}, which is not a tensor of the body.")
    n = len(finetuned)
    optimised = [key for key, tensor in pretrained.items() if tensor.dim() == 2 and key not in excluded]
    # The loss product is [a, a] for the τi as optimised, [a, b]: on the input side τiᵀ ([out, in]
    # for GPT-2's [in, out] storage, so [out, out]); on FusionBench's, the stored rows ([in, in]).
    for key in optimised:
        rows = pretrained[key].shape[1] if side == "input" else pretrained[key].shape[0]
        _check_product_size(key, rows, n, pretrained[key].element_size(), side)

    from tqdm.auto import tqdm

    merged = {}
    for key in tqdm(list(pretrained), desc="WUDI", leave=False, disable=not progress):
        base = pretrained[key]
        if key in optimised:
            # On the input side the τi go to [out, in], where the formula is the paper's.
            stacked = _stacked_task_vectors(pretrained, finetuned, key, transpose=side == "input")
            stacked = stacked.to(device or "cpu")
            if solver == "adam":
                tau, _ = minimise_interference_adam(stacked, iter_num, lr)
            else:
                tau = minimise_interference_closed_form(stacked, key)
            del stacked
            tau = tau.to(base.device)
            if side == "input":
                tau = tau.T
        else:
            tau = torch.sum(_stacked_task_vectors(pretrained, finetuned, key, transpose=False), dim=0) / n
        merged[key] = base + tau
    return merged


def _stacked_task_vectors(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], key: str, transpose: bool
) -> Tensor:
    """[n, ...]: τi = θi − θ0 on ``key`` (transposed if asked), written straight into one tensor
    (no list of n temporaries: wte's stack alone is 1 GiB at GPT-2 small)."""
    base = pretrained[key].T if transpose else pretrained[key]
    stacked = base.new_empty((len(finetuned), *base.shape))
    for i, body in enumerate(finetuned.values()):
        torch.sub(body[key].T if transpose else body[key], base, out=stacked[i])
    return stacked


class WUDIMerging(MergeMethod):
    """WUDI: θ0 + τ, τ from Adam on Σi ‖τiᵀ(τ − τi)‖²/‖τi‖² per 2-D tensor (mean τi elsewhere).

    Args:
        iter_num: Adam steps per 2-D tensor (FusionBench's ``wudi.yaml``: 400). 0 gives Task
            Arithmetic with λ = 1 on the 2-D tensors.
        lr: η, Adam's learning rate (FusionBench fixes 1e-5; the paper's RoBERTa code uses 2e-5).
        exclude_keys: exact names of 2-D tensors that get the mean τi instead (FusionBench's
            argument), e.g. ``[wte.weight]``.
        side: ``input`` (default): the paper's loss for GPT-2's [in, out] storage of Conv1D and
            embeddings. ``fusionbench``: FusionBench's formula on the stored layout (the output
            side of Conv1D); needs ``exclude_keys: [wte.weight]`` on GPT-2 (wte's product would be
            66 GiB), and then reproduces FusionBench.
        solver: ``adam`` (default, the paper and FusionBench) or ``closed_form``: the loss's exact
            (minimum-norm) minimiser; changes the numbers (Adam stays near Σ τi).
    """

    display_name = "WUDI"
    symbols = {"iter_num": "steps", "lr": "η"}
    recommended: dict = {}  # FusionBench's 400 steps (the demo and the tests give it a smaller budget by name)
    kind = "merged"

    def __init__(
        self,
        pool: ModelPool,
        iter_num: int = 400,
        lr: float = 1e-5,
        exclude_keys: list[str] | None = None,
        side: Literal["input", "fusionbench"] = "input",
        solver: Literal["adam", "closed_form"] = "adam",
    ):
        super().__init__(pool)
        _check_arguments(iter_num, lr, side, solver)
        self.iter_num = iter_num
        self.lr = float(lr)
        self.exclude_keys = list(exclude_keys) if exclude_keys else []
        self.side = side
        self.solver = solver
        self.save_hyperparameters(ignore=["pool"])

    def merge(self) -> dict[str, Tensor]:
        return wudi_merge(
            self.pool.pretrained_body(),
            self.pool.finetuned_bodies(),
            iter_num=self.iter_num,
            lr=self.lr,
            exclude_keys=self.exclude_keys,
            side=self.side,
            solver=self.solver,
        )

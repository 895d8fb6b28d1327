"""AdaMerging: merging coefficients learned by minimising the prediction entropy on unlabeled inputs.

Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
https://arxiv.org/abs/2310.02575.

With τi = θi − θ0 and one coefficient per task and per body tensor p (layer-wise: λ ∈ R^{n×P},
P = 148 tensors on GPT-2 small, each LayerNorm weight and bias its own "layer"; task-wise:
λ ∈ R^n, the same for every tensor):

    θ(λ)_p = θ0_p + Σi λ̃i,p τi,p,      λ̃ = clamp(λ, 0, 1) (``clamp``; applied inside the merge)

λ starts at ``init_value`` everywhere (0.3: the start is Task Arithmetic with λ = 0.3) and is
trained with Adam (betas 0.9/0.999, eps 1e-8) for ``max_steps`` steps. Each step takes, for each
task t in pool order, the next batch of ``batch_size`` unlabeled inputs of task t, runs the
merged body θ(λ) (``torch.func.functional_call`` on a frozen ``GPT2Model``) and task t's frozen
head, reads the logits z out at each row's last non-pad token, and sums over tasks

    L = Σt Lt,   Lt = (1/B) Σb H(softmax(z_b))             (``loss: entropy``, the paper's)
             or  Lt = H(softmax((1/B) Σb z_b)),  H(p) = −Σ p log(p + 1e-8)   (``loss: fusionbench``)

then one Adam step on λ. Labels are never read: the adaptation loader holds the ``input_ids``
column only. The result is θ(λ) with the learned λ (clamped).

Adaptation runs as ``trainer.fit`` of ``AdaMergingCoefficients`` (a LightningModule whose only
trainable parameters are λ) inside ``prepare``, on the same Trainer that then runs
``trainer.test``, as Fisher/RegMean's ``trainer.predict`` statistics do (``mergelit.statistics``
explains why: a private Trainer inside a running test is unsound under DDP). So it has
Lightning's progress bar and logs ``adamerging/loss`` (and each task's entropy) to the run's
logger. The fit runs exactly ``max_steps`` steps whatever the Trainer's own ``max_epochs``: its
loader has exactly ``max_steps`` batches and the module sets ``trainer.should_stop`` after the
last one. ``max_steps: 0`` skips the fit: the merge is Task Arithmetic with λ = ``init_value``.
Under DDP every rank adapts on the same batches, so the averaged gradient is one process's.

**The data.** ``adaptation_split: validation`` (the default) adapts on the inputs, not the labels,
of the very GLUE validation rows that are then scored (MNLI: validation_matched): test-time
adaptation, transductive, the paper's and FusionBench's setting; it is the default because
mergelit's default is the paper's method, and the number it gives is the one published tables
print. ``adaptation_split: train`` adapts on unlabeled train inputs instead: no scored row is
seen, the honest inductive number. ``method.data`` ("validation inputs" / "train inputs") and
``method.transductive`` say which was used, for the report and the comparison table.

What differs from FusionBench's ``GPT2LayerWiseAdaMergingAlgorithm`` (spec section 7), and why:

- The loss: FusionBench's GPT-2 version takes the entropy of the batch-mean logits, which rewards
  predicting one class for the whole batch (two confident, opposite predictions score ln 2, the
  maximum); the paper (and FusionBench's CLIP version) averages per-example entropies. Default
  ``entropy``; ``fusionbench`` is the option.
- Eval mode throughout (no dropout), for adaptation and scoring; FusionBench trains with GPT-2's
  dropout on and scores the body still in train mode (a stochastic forward).
- Defaults lr 1e-3 and ``clamp`` to [0, 1], the paper's; FusionBench's GPT-2 config has lr 1e-4
  and no clamp (set ``lr: 1e-4``, ``clamp: false`` to get them).
- FusionBench cannot run on a GPT-2 pool as shipped (no test datasets); the split is explicit here.
- One seeded generator per task (``seed + task index``) orders its inputs: each pass over the
  split is a new permutation, cut into batches (the last of a pass may be short), as an infinite
  shuffled DataLoader; FusionBench seeds them from the global RNG, interleaved with dropout draws.
- ``use_cache=False`` (no DynamicCache); dynamic padding unless ``data.pad_to_max_length``
  (same logits, far less compute than padding to 512); θ(λ) is computed once per step and shared
  by the tasks' forwards, and one backward of the summed loss (the paper's).
- The paper's code (ViT) takes two batches per task per step; FusionBench and mergelit take one
  (``batch_size: 32`` is close to the paper's two batches of 16: Adam is invariant to the loss's
  scale).

Cost: each step is n forward + backward passes of GPT-2 on ``batch_size`` rows plus two passes
over the n stacked task vectors (3.5 GB on GPT-2 small: the merge, and ∂L/∂λi,p = ⟨∂L/∂θp, τi,p⟩).
Measured on a shared 2-core CPU host (fp32, GPT-2 small, 2 tasks, 16 rows x 64 tokens each):
35-48 s per step, of which ~5 s the merge and its backward; so about 2 minutes per step for the
7 tasks, and the default 500 steps take the better part of a day. Use a GPU (the spec estimates
minutes for 500 steps on one H200 with dynamic padding; not measured here); the tiny test pool
takes ~0.25 s per step. Memory: θ0 + n τ stacked (4 GB fp32 on GPT-2 small) besides the pool's
own copies (4 GB), and the activations of n batches (peak 8.3 GB RSS for the 2-task run above).

Saved coefficients (``coefficients_path``): a JSON file, written atomically (temporary file +
``os.replace``) once adaptation has run all ``max_steps`` steps, so a killed run leaves no file
that is trusted; a rerun adapts from scratch. It records what λ depends on (pool tasks, tensor
names, granularity, every adaptation argument, the models' content hashes, the data's path,
tokenizer and ``max_length``) and a checksum; a later run with everything equal loads λ instead
of adapting (the log says so), otherwise it warns, adapts again and overwrites the file.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from mergelit.glue import GLUEDataModule, pad_right
from mergelit.gpt2 import build_body, build_head, last_non_pad_index
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.report import atomic_write_text
from mergelit.state_dict import atomic_save_safetensors, check_finetuned, tensors_fingerprint

GRANULARITIES = ("layer", "task")
LOSSES = ("entropy", "fusionbench")
SPLITS = ("train", "validation")
FUSIONBENCH_EPS = 1e-8  # FusionBench's H(p) = −Σ p log(p + eps)

# Bump when what a coefficients file holds changes, so that older files are not trusted.
_FILE_FORMAT = 1


# ---- the maths -----------------------------------------------------------------------------
def entropy_loss(logits: Tensor) -> Tensor:
    """The paper's loss: the mean over the batch of each row's entropy H(softmax(z_b)) (log_softmax, no eps)."""
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def fusionbench_entropy_loss(logits: Tensor) -> Tensor:
    """FusionBench's GPT-2 loss: the entropy of the softmax of the batch-mean logits, −Σ p log(p + 1e-8)."""
    p = logits.mean(0).softmax(-1)
    return -(p * (p + FUSIONBENCH_EPS).log()).sum()


LOSS_FUNCTIONS = {"entropy": entropy_loss, "fusionbench": fusionbench_entropy_loss}


def coefficient_matrix(coefficients: Tensor, num_tensors: int, clamp: bool) -> Tensor:
    """λ̃ as an [n, P] matrix: a task-wise λ [n] is repeated for every tensor; clamped to [0, 1] if asked.

    The clamp sits inside the merge, so the raw λ (the trained parameter) is unbounded, and an
    entry outside [0, 1] gets no gradient (the paper's behaviour).
    """
    if coefficients.dim() == 1:
        coefficients = coefficients[:, None].expand(-1, num_tensors)
    elif coefficients.shape[1] != num_tensors:
        raise ValueError(f"Layer-wise coefficients of shape {tuple(coefficients.shape)} for {num_tensors} tensors.")
    return coefficients.clamp(0.0, 1.0) if clamp else coefficients


def merge_tensor(pretrained: Tensor, task_vectors: Tensor, coefficients: Tensor) -> Tensor:
    """θ0_p + Σi λ̃i,p τi,p for one tensor; ``task_vectors`` stacks the n τi,p, ``coefficients`` is λ̃[:, p]."""
    return pretrained + torch.tensordot(coefficients, task_vectors, dims=1)


def adamerging_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], coefficients: Tensor, clamp: bool = True
) -> dict[str, Tensor]:
    """θ(λ)_p = θ0_p + Σi λ̃i,p τi,p, τi = θi − θ0, λ̃ = clamp(λ, 0, 1) if ``clamp``.

    Args:
        pretrained: θ0, the pretrained body's state dict (its key order is the order of λ's columns).
        finetuned: task -> θi, in the order of λ's rows.
        coefficients: λ, [n, P] (layer-wise, one per task and tensor) or [n] (task-wise).
        clamp: clamp λ to [0, 1] inside the merge (the paper's).
    """
    check_finetuned(pretrained, finetuned)
    if coefficients.shape[0] != len(finetuned):
        raise ValueError(f"Coefficients for {coefficients.shape[0]} tasks but {len(finetuned)} fine-tuned bodies.")
    lam = coefficient_matrix(coefficients.detach().float(), len(pretrained), clamp)
    merged = {}
    for p, key in enumerate(pretrained):
        # One tensor's τ stack at a time: n copies of a single tensor, never of the whole body.
        task_vectors = torch.stack([body[key] - pretrained[key] for body in finetuned.values()])
        merged[key] = merge_tensor(pretrained[key], task_vectors, lam[:, p])
    return merged


# ---- adaptation data -----------------------------------------------------------------------
class AdaptationBatches:
    """Exactly ``num_steps`` steps of ``{task: {"input_ids", "attention_mask"}}``, one batch per task.

    Task i's rows are shuffled by its own generator seeded with ``seed + i``, created afresh at
    each ``iter()`` (so the order does not depend on anything else): each pass over the split is
    a new permutation cut into batches of ``batch_size`` (the last of a pass may be short), passes
    following one another as an infinite shuffled DataLoader. Rows are right-padded with
    ``pad_token_id`` to the batch's longest row, or to ``pad_to`` when given. Only the
    ``input_ids`` column is read.

    Args:
        inputs: task -> a sequence of rows, ``inputs[task][indices]["input_ids"]`` giving their
            token ids (a ``datasets.Dataset`` holding only ``input_ids``).
    """

    def __init__(
        self,
        inputs: dict[str, Any],
        batch_size: int,
        num_steps: int,
        seed: int,
        pad_token_id: int,
        pad_to: Optional[int] = None,
        start: int = 0,
    ):
        for task, rows in inputs.items():
            if len(rows) == 0:
                raise ValueError(f"AdaMerging: the adaptation split of {task!r} has no rows.")
        self.inputs = inputs
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to
        self.start = start  # a resumed adaptation: the steps before it were taken already

    def __len__(self) -> int:
        return self.num_steps - self.start

    def _indices(self, task_index: int, num_rows: int) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + task_index)
        while True:
            order = torch.randperm(num_rows, generator=generator).tolist()
            for start in range(0, num_rows, self.batch_size):
                yield order[start : start + self.batch_size]

    def _pad(self, rows: list[list[int]]) -> dict[str, Tensor]:
        input_ids, attention_mask = pad_right(rows, self.pad_token_id, self.pad_to)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __iter__(self) -> Iterator[dict[str, dict[str, Tensor]]]:
        streams = {task: self._indices(i, len(rows)) for i, (task, rows) in enumerate(self.inputs.items())}
        for step in range(self.num_steps):
            indices = {task: next(streams[task]) for task in self.inputs}  # the same order, resumed or not
            if step >= self.start:
                yield {task: self._pad(self.inputs[task][indices[task]]["input_ids"]) for task in self.inputs}


# ---- the fit-loop module -------------------------------------------------------------------
class AdaMergingCoefficients(L.LightningModule):
    """The coefficients λ as a LightningModule: ``trainer.fit`` minimises the tasks' summed entropy.

    Its only trainable parameter is ``coefficients`` (λ, [n, P] or [n]). θ0 is a frozen
    ``GPT2Model`` (``body``), the task vectors are frozen parameters stacked per tensor
    (``task_vectors[p]``: [n, *shape], parameters rather than buffers so that they follow the
    module to its device without DDP re-broadcasting them every step), the heads are frozen. The
    module stays in eval mode (no dropout): ``train()`` keeps it in eval.

    Args:
        pretrained: θ0's state dict (its key order is λ's column order).
        finetuned: task -> θi (its order is λ's row order and the order of the tasks in a step).
        heads: task -> its head weight [num_labels, n_embd].
        pad_token_ids: task -> the pad id of the read-out (the head config's).
        body_config: the ``GPT2Config`` of the bodies.
        batches: the training iterable (``AdaptationBatches``); ``len(batches)`` is the number of steps.
        granularity: ``layer`` (λ [n, P]) or ``task`` (λ [n]).
        init_value: λ's initial value, everywhere.
        clamp: clamp λ to [0, 1] inside the merge.
        lr: Adam's learning rate.
        loss: ``entropy`` (per-example, the paper's) or ``fusionbench`` (of the batch-mean logits).
    """

    def __init__(
        self,
        pretrained: dict[str, Tensor],
        finetuned: dict[str, dict[str, Tensor]],
        heads: dict[str, Tensor],
        pad_token_ids: dict[str, int],
        body_config,
        batches: AdaptationBatches,
        granularity: str = "layer",
        init_value: float = 0.3,
        clamp: bool = True,
        lr: float = 1e-3,
        loss: str = "entropy",
        resume: Optional[tuple[Tensor, dict]] = None,
        checkpoint: Optional[Any] = None,
        checkpoint_every: int = 0,
    ):
        super().__init__()
        check_finetuned(pretrained, finetuned)
        self.tasks = list(finetuned)
        self.names = list(pretrained)
        self.body = build_body(body_config, pretrained)
        self.task_vectors = nn.ParameterList(
            nn.Parameter(torch.stack([finetuned[t][name] - pretrained[name] for t in self.tasks]), requires_grad=False)
            for name in self.names
        )
        self.heads = nn.ModuleDict({task: build_head(heads[task]) for task in self.tasks})
        self.pad_token_ids = dict(pad_token_ids)
        shape = (len(self.tasks), len(self.names)) if granularity == "layer" else (len(self.tasks),)
        self.coefficients = nn.Parameter(torch.full(shape, float(init_value)))
        self.batches = batches
        self.clamp = clamp
        self.lr = lr
        self.loss_function = LOSS_FUNCTIONS[loss]
        self.steps = batches.start  # optimizer steps taken (a resumed run starts where it stopped)
        self.losses: list[float] = []  # L at each step, before that step's update
        # Resuming: λ and Adam's state as they were after `batches.start` steps.
        self.optimizer_state = None
        if resume is not None:
            self.coefficients.data.copy_(resume[0])
            self.optimizer_state = resume[1]
        self.checkpoint = checkpoint  # checkpoint(steps, λ, optimizer state dict), every `checkpoint_every` steps
        self.checkpoint_every = checkpoint_every
        self.eval()

    def train(self, mode: bool = True) -> "AdaMergingCoefficients":
        # AdaMerging adapts in eval mode (GPT-2's dropout off): whoever asks for train mode gets eval.
        return super().train(False)

    def merged_parameters(self) -> dict[str, Tensor]:
        """θ(λ) as ``{tensor name: tensor}``, differentiable in λ."""
        lam = coefficient_matrix(self.coefficients, len(self.names), self.clamp)
        theta0 = dict(self.body.named_parameters())
        return {
            name: merge_tensor(theta0[name], tau, lam[:, p])
            for p, (name, tau) in enumerate(zip(self.names, self.task_vectors))
        }

    def logits(self, merged: dict[str, Tensor], batch: dict[str, Tensor], task: str) -> Tensor:
        """Task ``task``'s head on the merged body, at each row's last non-pad token: [batch, num_labels]."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        hidden = torch.func.functional_call(self.body, merged, args=(), kwargs=kwargs).last_hidden_state
        last = last_non_pad_index(input_ids, self.pad_token_ids[task])
        return self.heads[task](hidden[torch.arange(len(input_ids), device=hidden.device), last])

    def entropies(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """Each task's loss Lt on its batch of ``batch`` (θ(λ) computed once, shared by the tasks)."""
        merged = self.merged_parameters()
        return {task: self.loss_function(self.logits(merged, batch[task], task).float()) for task in self.tasks}

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        entropies = self.entropies(batch)
        loss = torch.stack(list(entropies.values())).sum()
        size = sum(len(batch[task]["input_ids"]) for task in self.tasks)
        self.log("adamerging/loss", loss, prog_bar=True, batch_size=size)
        for task, value in entropies.items():
            self.log(f"adamerging/{task}/entropy", value, batch_size=len(batch[task]["input_ids"]))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps += 1
        self.losses.append(float(outputs["loss"]))
        due = self.checkpoint_every and self.steps % self.checkpoint_every == 0 and self.steps < self.batches.num_steps
        if self.checkpoint and due and self.trainer.is_global_zero:
            self.checkpoint(self.steps, self.coefficients.detach(), self.trainer.optimizers[0].state_dict())
        if self.steps >= self.batches.num_steps:
            # The method's max_steps, not the Trainer's max_epochs (which belongs to the user's config).
            self.trainer.should_stop = True

    def train_dataloader(self) -> AdaptationBatches:
        return self.batches

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.Adam([self.coefficients], lr=self.lr, betas=(0.9, 0.999), eps=1e-8)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        return optimizer


# ---- the method ----------------------------------------------------------------------------
class AdaMerging(MergeMethod):
    """AdaMerging: θ0 + Σi λ̃i,p τi,p with λ learned by entropy minimisation on unlabeled inputs.

    Adaptation runs as ``trainer.fit`` in ``prepare`` (``mergelit test`` calls it), with a
    progress bar and ``adamerging/loss`` in the run's log. ``method.data`` and
    ``method.transductive`` say which inputs it read.

    Args:
        granularity: ``layer``: one λ per task and per body tensor (148 per task on GPT-2 small,
            FusionBench's "layer-wise"); ``task``: one λ per task.
        init_value: λ's initial value everywhere (FusionBench ``init_values``). 0.3 starts from
            Task Arithmetic with λ = 0.3.
        clamp: clamp λ to [0, 1] inside the merge (the paper's; FusionBench ``clamp_weights``,
            false in its GPT-2 config).
        lr: Adam's learning rate (the paper's 1e-3; FusionBench's GPT-2 config: 1e-4).
        max_steps: Adam steps (the paper's 500; FusionBench's 1000). 0 skips adaptation: Task
            Arithmetic with λ = ``init_value``. On a CPU each GPT-2-small step takes tens of seconds.
        batch_size: unlabeled inputs per task per step (FusionBench's 16).
        loss: ``entropy``: mean per-example prediction entropy (the paper's); ``fusionbench``: the
            entropy of the batch-mean logits, FusionBench's GPT-2 loss.
        adaptation_split: whose inputs adapt λ. ``validation``: those of the very rows scored
            (transductive test-time adaptation, the paper's and FusionBench's setting);
            ``train``: unlabeled train inputs (no scored row is seen). Labels are never read.
        seed: task i's inputs are shuffled by a generator seeded with ``seed + i``.
        coefficients_path: a JSON file for the learned λ: loaded instead of adapting when it
            matches this run (models, tasks, tensors and every argument above), else written
            (atomically) once adaptation has finished.
        checkpoint_every: with ``coefficients_path``, every this many steps λ and Adam's state are
            saved (atomically) to ``<coefficients_path>.partial.safetensors``; a rerun of the same
            run resumes from there (the same result, bit for bit, as an uninterrupted run) and the
            file is removed once adaptation has finished. 0: never.
    """

    display_name = "AdaMerging"
    symbols = {"granularity": "granularity", "init_value": "λ₀", "max_steps": "steps", "adaptation_split": "split"}
    # A quick run on the tiny test pool; real runs use the paper's 500 steps (the default).

    def __init__(
        self,
        pool: ModelPool,
        granularity: Literal["layer", "task"] = "layer",
        init_value: float = 0.3,
        clamp: bool = True,
        lr: float = 1e-3,
        max_steps: int = 500,
        batch_size: int = 16,
        loss: Literal["entropy", "fusionbench"] = "entropy",
        adaptation_split: Literal["validation", "train"] = "validation",
        seed: int = 0,
        coefficients_path: Optional[str] = None,
        checkpoint_every: int = 50,
    ):
        super().__init__(pool)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}.")
        if not math.isfinite(init_value):
            raise ValueError(f"init_value (λ's initial value) must be a finite number, got {init_value}.")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}.")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
            raise ValueError(f"max_steps must be an integer >= 0, got {max_steps!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}.")
        if adaptation_split not in SPLITS:
            raise ValueError(f"adaptation_split must be one of {', '.join(SPLITS)}, got {adaptation_split!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0 (0: never), got {checkpoint_every!r}.")
        self.granularity = granularity
        self.init_value = float(init_value)
        self.clamp = clamp
        self.lr = float(lr)
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.loss = loss
        self.adaptation_split = adaptation_split
        self.seed = seed
        self.coefficients_path = coefficients_path
        self.checkpoint_every = checkpoint_every
        # What the report and the comparison table say the method read (issue 12, part 3).
        self.data = f"{adaptation_split} inputs"
        self.transductive = adaptation_split == "validation"
        self.losses: list[float] = []  # the adaptation's L per step (empty when loaded or skipped)
        self._coefficients: Tensor | None = None
        self.save_hyperparameters(ignore=["pool"])

    # ---- coefficients -----------------------------------------------------------------------
    def initial_coefficients(self) -> Tensor:
        """λ before adaptation: ``init_value`` everywhere, [n, P] or [n]."""
        n, num_tensors = len(self.tasks), len(self.pool.pretrained_body())
        shape = (n, num_tensors) if self.granularity == "layer" else (n,)
        return torch.full(shape, self.init_value)

    def coefficients(self) -> Tensor:
        """The raw learned λ (before the clamp), [n, P] or [n], rows in task order (after ``prepare``)."""
        if self._coefficients is None:
            if self.max_steps == 0:
                return self.initial_coefficients()
            raise RuntimeError(
                "AdaMerging has not adapted yet: call `method.prepare(trainer, datamodule)` before "
                "`trainer.test(method, datamodule)` (the `mergelit test` command does this for you)."
            )
        return self._coefficients.clone()

    def merge(self) -> dict[str, Tensor]:
        pool = self.pool
        return adamerging_merge(pool.pretrained_body(), pool.finetuned_bodies(), self.coefficients(), self.clamp)

    # ---- adaptation -------------------------------------------------------------------------
    def prepare(self, trainer: L.Trainer, datamodule) -> None:
        self.losses = []
        if self.max_steps == 0:
            self._coefficients = self.initial_coefficients()
            return
        if not isinstance(datamodule, GLUEDataModule):
            raise TypeError(
                f"AdaMerging adapts on the GLUE inputs and needs the GLUEDataModule, got {type(datamodule).__name__}; "
                f"pass `datamodule=GLUEDataModule(...)` (the CLI's `data:` group)."
            )
        missing = [task for task in self.tasks if task not in datamodule.tasks]
        if missing:
            raise ValueError(f"The data module lacks the pool's task(s) {missing}; give it the pool's tasks.")
        fields = self._file_fields(datamodule) if self.coefficients_path else None
        if fields is not None:
            loaded = self._read_coefficients(fields) if trainer.is_global_zero else None
            # Rank 0 decides, so that every process takes the same path (fit is collective).
            loaded = trainer.strategy.broadcast(loaded, src=0)
            if loaded is not None:
                rank_zero_info(f"AdaMerging coefficients: loaded from {self.coefficients_path}")
                self._coefficients = loaded
                return
        self._check_trainer(trainer)
        resume = self._read_partial(fields) if fields is not None and trainer.is_global_zero else None
        resume = trainer.strategy.broadcast(resume, src=0)
        module = self._coefficients_module(datamodule, resume, fields)
        if resume is not None:
            rank_zero_info(f"AdaMerging: resuming after step {resume[0]} of {self.max_steps} from {self._partial_path()}")
        rank_zero_info(
            f"AdaMerging: {self.max_steps} steps of {self.batch_size} unlabeled {self.adaptation_split} inputs "
            f"per task ({self.granularity}-wise, loss {self.loss}, lr {self.lr}, seed {self.seed})"
        )
        with warnings.catch_warnings():
            # Eval mode during fit is the point (no dropout), not an accident.
            warnings.filterwarnings("ignore", message=".*in eval mode at the start of training.*")
            # The fit's length is max_steps (its loader's length), not the Trainer's epochs.
            warnings.filterwarnings("ignore", message=".*`max_epochs` was not set.*")
            trainer.fit(module)
        self._coefficients = module.coefficients.detach().cpu().clone()
        self.losses = list(module.losses)
        if module.steps != self.max_steps:
            if not trainer.fast_dev_run:
                raise RuntimeError(
                    f"AdaMerging adapted for {module.steps} of max_steps={self.max_steps} steps: the Trainer stopped "
                    f"it (trainer max_steps / max_epochs / max_time / limit_train_batches). Leave those unset; "
                    f"the adaptation's length is `model.init_args.max_steps`."
                )
            rank_zero_warn(
                f"AdaMerging: fast_dev_run adapted for {module.steps} of {self.max_steps} steps; not saving them."
            )
            return
        if fields is not None:
            if trainer.is_global_zero:
                self._write_coefficients(fields, self._coefficients)
                Path(self._partial_path()).unlink(missing_ok=True)  # finished: nothing left to resume
                rank_zero_info(f"AdaMerging coefficients: written to {self.coefficients_path}")
            trainer.strategy.barrier("adamerging coefficients written")

    def _check_trainer(self, trainer: L.Trainer) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"AdaMerging takes one Adam step per batch; trainer accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches} would change that. Leave it at 1."
            )
        if trainer.fast_dev_run:
            return
        if trainer.max_steps != -1 and trainer.max_steps < trainer.global_step + self.max_steps:
            raise ValueError(
                f"trainer max_steps={trainer.max_steps} would stop AdaMerging's {self.max_steps} steps; leave "
                f"trainer.max_steps unset (the adaptation's length is `model.init_args.max_steps`)."
            )
        end_step, end_epoch = trainer.global_step + self.max_steps, trainer.current_epoch + 1
        if (trainer.min_steps or 0) > end_step or (trainer.min_epochs or 0) > end_epoch:
            raise ValueError(
                f"trainer min_steps={trainer.min_steps} / min_epochs={trainer.min_epochs} would run AdaMerging beyond "
                f"its {self.max_steps} steps; leave them unset."
            )

    def _coefficients_module(
        self, datamodule: GLUEDataModule, resume: Optional[tuple[int, Tensor, dict]] = None, fields: Optional[dict] = None
    ) -> AdaMergingCoefficients:
        datamodule.check(("eval",) if self.adaptation_split == "validation" else ("train",))
        split = datamodule.eval_dataset if self.adaptation_split == "validation" else datamodule.train_dataset
        # Only the token ids: the labels are not even in what the loader can read.
        inputs = {task: split(task).select_columns(["input_ids"]) for task in self.tasks}
        batches = AdaptationBatches(
            inputs,
            batch_size=self.batch_size,
            num_steps=self.max_steps,
            seed=self.seed,
            pad_token_id=datamodule.pad_token_id,
            pad_to=datamodule.max_length if datamodule.pad_to_max_length else None,
            start=resume[0] if resume is not None else 0,
        )
        return AdaMergingCoefficients(
            self.pool.pretrained_body(),
            self.pool.finetuned_bodies(),
            heads={task: self.pool.head(task) for task in self.tasks},
            pad_token_ids={task: self.pool.task_config(task).pad_token_id for task in self.tasks},
            body_config=self.pool.body_config(),
            batches=batches,
            granularity=self.granularity,
            init_value=self.init_value,
            clamp=self.clamp,
            lr=self.lr,
            loss=self.loss,
            resume=resume[1:] if resume is not None else None,
            checkpoint=(lambda steps, values, state: self._write_partial(fields, steps, values, state)) if fields else None,
            checkpoint_every=self.checkpoint_every,
        )

    # ---- the coefficients file --------------------------------------------------------------
    def _file_fields(self, datamodule: GLUEDataModule) -> dict[str, Any]:
        """Everything the learned λ depends on; a file is trusted only when all of it is equal."""
        return {
            "format": _FILE_FORMAT,
            "tasks": list(self.tasks),
            "tensors": list(self.pool.pretrained_body()),
            "granularity": self.granularity,
            "init_value": self.init_value,
            "clamp": self.clamp,
            "lr": self.lr,
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "loss": self.loss,
            "adaptation_split": self.adaptation_split,
            "seed": self.seed,
            "pretrained": tensors_fingerprint(self.pool.pretrained_body()),
            "models": {task: self.pool.fingerprint(task) for task in self.tasks},
            "data": {
                "path": str(datamodule.path),
                "tokenizer": str(datamodule.tokenizer_path),
                "max_length": datamodule.max_length,
            },
        }

    def _partial_path(self) -> str:
        return f"{self.coefficients_path}.partial.safetensors"

    def _write_partial(self, fields: dict[str, Any], steps: int, values: Tensor, optimizer_state: dict) -> None:
        """λ and Adam's state after ``steps`` steps, for a rerun to resume from (rank 0; atomic)."""
        (state,) = optimizer_state["state"].values()
        tensors = {"coefficients": values.float().cpu().contiguous()}
        tensors.update({f"adam.{k}": torch.as_tensor(v).cpu().contiguous() for k, v in state.items()})
        metadata = {"fields": json.dumps(fields, sort_keys=True), "steps": str(steps),
                    "param_groups": json.dumps(optimizer_state["param_groups"])}
        atomic_save_safetensors(self._partial_path(), tensors, metadata)  # the previous state or this one, never half

    def _read_partial(self, fields: dict[str, Any]) -> Optional[tuple[int, Tensor, dict]]:
        """``(steps, λ, Adam state dict)`` of a matching partial adaptation, else None (warned when not trusted)."""
        from safetensors import safe_open

        path = self._partial_path()
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
                tensors = {name: file.get_tensor(name) for name in file.keys()}
            stored, steps = json.loads(metadata["fields"]), int(metadata["steps"])
            param_groups = json.loads(metadata["param_groups"])
        except Exception as error:  # safetensors raises several types for a damaged file
            rank_zero_warn(f"AdaMerging partial state {path} is unreadable ({type(error).__name__}); adapting from step 0.")
            return None
        if stored != json.loads(json.dumps(fields, sort_keys=True)) or not 0 < steps < self.max_steps:
            rank_zero_warn(f"AdaMerging partial state {path} is for another run; adapting from step 0.")
            return None
        state = {name[len("adam."):]: value for name, value in tensors.items() if name.startswith("adam.")}
        return steps, tensors["coefficients"], {"state": {0: state}, "param_groups": param_groups}

    @staticmethod
    def _checksum(values: Tensor) -> str:
        return tensors_fingerprint({"coefficients": values.float().contiguous()})

    def _write_coefficients(self, fields: dict[str, Any], values: Tensor) -> None:
        values = values.float()
        if values.dim() == 2:
            readable = {t: dict(zip(fields["tensors"], map(float, row))) for t, row in zip(self.tasks, values.tolist())}
        else:
            readable = dict(zip(self.tasks, map(float, values.tolist())))
        payload = {"fields": fields, "checksum": self._checksum(values), "coefficients": readable}
        # Temporary file + os.replace: a reader sees no file or the whole file, never half of one.
        atomic_write_text(self.coefficients_path, json.dumps(payload, indent=1) + "\n")

    def _read_coefficients(self, fields: dict[str, Any]) -> Tensor | None:
        """λ from ``coefficients_path``, or None if it is missing or not trusted (warned about)."""
        path = self.coefficients_path
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as file:
                payload = json.load(file)
            stored = payload["fields"]
            readable = payload["coefficients"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            rank_zero_warn(
                f"AdaMerging coefficients file {path} is unreadable ({type(error).__name__}: {error}); adapting again."
            )
            return None
        differing = [key for key in fields if stored.get(key) != fields[key]]
        if differing:
            key = differing[0]
            shown = (lambda v: v) if key not in ("pretrained", "models", "tensors") else (lambda v: "<other>")
            rank_zero_warn(
                f"AdaMerging coefficients file {path} is for another run ({key}: {shown(stored.get(key))!r}, "
                f"this run: {shown(fields[key])!r}); adapting again and overwriting it."
            )
            return None
        try:
            if self.granularity == "layer":
                values = torch.tensor([[readable[t][name] for name in fields["tensors"]] for t in self.tasks])
            else:
                values = torch.tensor([readable[t] for t in self.tasks])
        except (KeyError, TypeError, ValueError) as error:
            rank_zero_warn(f"AdaMerging coefficients file {path} lacks a value ({error}); adapting again.")
            return None
        if payload.get("checksum") != self._checksum(values):
            rank_zero_warn(f"AdaMerging coefficients file {path} does not match its checksum; adapting again.")
            return None
        return values

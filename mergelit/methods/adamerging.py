"""AdaMerging: merging coefficients learned by minimising the prediction entropy on unlabeled inputs.

Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
https://arxiv.org/abs/2310.02575.

θ(λ)_p = θ0_p + Σi λ̃i,p τi,p with τi = θi − θ0, λ̃ = clamp(λ, 0, 1) (``clamp``), one λ per task and
body tensor (layer-wise, 148 on GPT-2 small) or per task. λ starts at ``init_value`` and takes
``max_steps`` Adam steps on L = Σt Σj Lt,j over the next ``batches_per_step`` batches of each task's
unlabeled inputs under its own head: Lt,j = (1/B) Σb H(softmax(z_b)) (``loss: entropy``, the paper's)
or H(softmax((1/B) Σb z_b)) with H(p) = −Σ p log(p + 1e-8) (``fusionbench``). The adaptation is
``trainer.fit`` of ``AdaMergingCoefficients`` in ``prepare``; labels are never read. How it runs, the
data, what is kept, what differs from FusionBench and the cost: docs/methods.md, "AdaMerging".
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from mergelit import costs
from mergelit.cache import Cache
from mergelit.errors import BadData, MergelitError, NotWritable, check_choice, check_integer, check_number
from mergelit.glue import GLUEDataModule, pad_right
from mergelit.gpt2 import build_body, build_head, last_non_pad_index
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool
from mergelit.state_dict import check_finetuned
from mergelit.tasks import GLUE_TASKS

FUSIONBENCH_EPS = 1e-8  # FusionBench's H(p) = −Σ p log(p + eps)

# Bump when what λ means for the same key fields changes (batching, loss, data order), so that
# coefficients files and checkpoints of the older meaning get another key.
_FORMAT = 2


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
    """λ̃ as an [n, P] matrix (a task-wise λ [n] repeated for every tensor), clamped to [0, 1] if asked:
    inside the merge, so the trained λ is unbounded and an entry outside [0, 1] gets no gradient (the paper's)."""
    if coefficients.dim() == 1:
        coefficients = coefficients[:, None].expand(-1, num_tensors)
    elif coefficients.shape[1] != num_tensors:
        raise ValueError(f"Layer-wise coefficients of shape {tuple(coefficients.shape)} for {num_tensors} tensors.")
    return coefficients.clamp(0.0, 1.0) if clamp else coefficients


def merged_tensor(pretrained: Tensor, task_vectors: Tensor, weights: Tensor) -> Tensor:
    """θ0_p + Σi λ̃i,p τi,p (``task_vectors`` the n τi,p stacked, ``weights`` λ̃[:, p]): one formula for
    the adaptation's forward and the merge that is scored, so the same bits."""
    return pretrained + torch.tensordot(weights, task_vectors, dims=1)


def adamerging_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], coefficients: Tensor, clamp: bool = True
) -> dict[str, Tensor]:
    """θ(λ) over whole bodies (the test oracle): λ [n, P] or [n], rows in ``finetuned``'s order, columns
    in ``pretrained``'s key order."""
    check_finetuned(pretrained, finetuned)
    if coefficients.shape[0] != len(finetuned):
        raise ValueError(f"Coefficients for {coefficients.shape[0]} tasks but {len(finetuned)} fine-tuned bodies.")
    lam = coefficient_matrix(coefficients.detach().float(), len(pretrained), clamp)
    merged = {}
    for p, key in enumerate(pretrained):
        task_vectors = torch.stack([body[key] - pretrained[key] for body in finetuned.values()])
        merged[key] = merged_tensor(pretrained[key], task_vectors, lam[:, p])
    return merged


# ---- adaptation data -----------------------------------------------------------------------
def rows_fingerprint(rows) -> str:
    """A hash of the token ids of ``rows`` (a ``datasets.Dataset`` with ``input_ids``) in row order: the
    content read, not where it came from. Read through Arrow chunk by chunk, without Python lists."""
    import numpy as np
    import pyarrow.compute as pc

    column = rows.with_format("arrow")[:]["input_ids"]  # the selected rows, in order
    lengths, values = hashlib.sha256(), hashlib.sha256()
    for chunk in column.chunks:
        lengths.update(np.asarray(pc.list_value_length(chunk), dtype=np.int64).tobytes())
        values.update(np.asarray(pc.list_flatten(chunk), dtype=np.int64).tobytes())
    return hashlib.sha256(f"{len(rows)}|{lengths.hexdigest()}|{values.hexdigest()}".encode()).hexdigest()[:24]


class AdaptationBatches:
    """Exactly ``num_steps`` steps of ``{task: [batch, ...]}``, ``batches_per_step`` batches of
    ``{"input_ids", "attention_mask"}`` per task, from ``inputs`` (task -> a ``datasets.Dataset`` of
    ``input_ids`` only).

    Task i's rows are shuffled by a generator seeded with ``seed + i`` afresh at each ``iter()``: each
    pass a new permutation cut into batches of ``batch_size`` (the last may be short), passes following
    one another as an infinite shuffled DataLoader. Rows are right-padded with ``pad_token_id`` to the
    batch's longest row, or to ``pad_to``. A stateful loader in Lightning's sense, so a resumed fit
    continues with the next step's batches; its state is the steps trained (``consumed``, set by the
    module: Lightning's fetcher reads ahead, so the loader cannot count them itself).
    """

    def __init__(
        self, inputs: dict[str, Any], batch_size: int, num_steps: int, seed: int, pad_token_id: int,
        pad_to: Optional[int] = None, batches_per_step: int = 1,
    ):
        for task, rows in inputs.items():
            if len(rows) == 0:
                raise BadData(f"AdaMerging: the adaptation rows of {task!r} are empty.")
        self.inputs = inputs
        self.batch_size = batch_size
        self.batches_per_step = batches_per_step
        self.num_steps = num_steps
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to
        self.start = 0  # the steps a resumed fit took already
        self.consumed = 0  # steps trained so far (the state a checkpoint keeps)

    def __len__(self) -> int:
        return self.num_steps

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = self.consumed = int(state["steps"])

    def _indices(self, task_index: int, num_rows: int) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + task_index)
        while True:
            order = torch.randperm(num_rows, generator=generator).tolist()
            for start in range(0, num_rows, self.batch_size):
                yield order[start : start + self.batch_size]

    def _pad(self, rows: list[list[int]]) -> dict[str, Tensor]:
        input_ids, attention_mask = pad_right(rows, self.pad_token_id, self.pad_to)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __iter__(self) -> Iterator[dict[str, list[dict[str, Tensor]]]]:
        streams = {task: self._indices(i, len(rows)) for i, (task, rows) in enumerate(self.inputs.items())}
        for step in range(self.num_steps):
            # Drawn at every step, resumed or not, so that step k sees the same rows either way.
            drawn = {task: [next(streams[task]) for _ in range(self.batches_per_step)] for task in self.inputs}
            if step >= self.start:
                yield {task: [self._pad(self.inputs[task][part]["input_ids"]) for part in drawn[task]] for task in self.inputs}


# ---- the fit-loop module -------------------------------------------------------------------
class AdaMergingCoefficients(L.LightningModule):
    """The coefficients λ ([n, P] or [n], the only trainable parameter) as a LightningModule that
    ``trainer.fit`` trains on ``batches`` (``len(batches)`` steps); arguments as ``AdaMerging``'s, ``key``
    the run's content key written into its checkpoints.

    θ0 is a frozen ``GPT2Model``, the task vectors frozen parameters stacked per tensor ([n, *shape]:
    parameters rather than buffers, so they follow the module to its device without DDP
    re-broadcasting them every step), the heads frozen; ``train()`` keeps eval mode (no dropout). A
    checkpoint keeps λ alone of the module's tensors, beside what Lightning saves itself.
    """

    def __init__(
        self, pool: ModelPool, batches: AdaptationBatches, granularity: str = "layer", init_value: float = 0.3,
        clamp: bool = True, lr: float = 1e-3, loss: str = "entropy", key: Optional[str] = None,
    ):
        super().__init__()
        self.tasks = list(pool.tasks)
        self.names = pool.keys()
        theta0 = pool.pretrained_body()
        self.body = build_body(pool.body_config(), theta0)
        # One tensor's τ stack at a time from the memory-mapped checkpoints: θ0 and n τ, never n θi besides.
        self.task_vectors = nn.ParameterList(
            nn.Parameter(torch.stack([pool.finetuned_tensor(t, name) - theta0[name] for t in self.tasks]), requires_grad=False)
            for name in self.names
        )
        del theta0
        self.heads = nn.ModuleDict({task: build_head(pool.head(task)) for task in self.tasks})
        self.pad_token_ids = {task: pool.task_config(task).pad_token_id for task in self.tasks}
        shape = (len(self.tasks), len(self.names)) if granularity == "layer" else (len(self.tasks),)
        self.coefficients = nn.Parameter(torch.full(shape, float(init_value)))
        self.batches = batches
        self.clamp = clamp
        self.lr = lr
        self.loss_function = LOSS_FUNCTIONS[loss]
        self.key = key
        self.steps = 0  # optimizer steps taken, a resumed fit's earlier ones included
        self.losses: list[float] = []  # L at each step of this fit, before that step's update
        self.seconds = 0.0  # the adaptation's time in earlier fits of a resumed run
        self._started: Optional[float] = None
        # A checkpoint holds λ alone (on_save_checkpoint): the frozen parts are not loaded from it.
        self.strict_loading = False
        self.eval()

    def train(self, mode: bool = True) -> "AdaMergingCoefficients":
        # AdaMerging adapts in eval mode (GPT-2's dropout off): whoever asks for train mode gets eval.
        return super().train(False)

    def merged_parameters(self) -> dict[str, Tensor]:
        """θ(λ) as ``{tensor name: tensor}``, differentiable in λ."""
        lam = coefficient_matrix(self.coefficients, len(self.names), self.clamp)
        theta0 = dict(self.body.named_parameters())
        return {
            name: merged_tensor(theta0[name], tau, lam[:, p])
            for p, (name, tau) in enumerate(zip(self.names, self.task_vectors))
        }

    def logits(self, merged: dict[str, Tensor], batch: dict[str, Tensor], task: str) -> Tensor:
        """Task ``task``'s head on the merged body, at each row's last non-pad token: [batch, num_labels]."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        hidden = torch.func.functional_call(self.body, merged, args=(), kwargs=kwargs).last_hidden_state
        last = last_non_pad_index(input_ids, self.pad_token_ids[task])
        return self.heads[task](hidden[torch.arange(len(input_ids), device=hidden.device), last])

    def entropies(self, batch: dict[str, list[dict[str, Tensor]]]) -> dict[str, Tensor]:
        """Each task's part of L, Σj Lt,j over its batches in ``batch`` (θ(λ) computed once, shared)."""
        merged = self.merged_parameters()
        return {
            task: torch.stack([self.loss_function(self.logits(merged, part, task).float()) for part in batch[task]]).sum()
            for task in self.tasks
        }

    def training_step(self, batch: dict[str, list[dict[str, Tensor]]], batch_idx: int) -> Tensor:
        self.batches.consumed = batch_idx + 1  # the loader's state in a checkpoint taken after this step
        entropies = self.entropies(batch)
        loss = torch.stack(list(entropies.values())).sum()
        size = sum(len(part["input_ids"]) for task in self.tasks for part in batch[task])
        self.log("adamerging/loss", loss, prog_bar=True, batch_size=size)
        for task, value in entropies.items():
            self.log(f"adamerging/{task}/entropy", value, batch_size=sum(len(part["input_ids"]) for part in batch[task]))
        return loss

    def on_train_start(self) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps = batch_idx + 1
        self.losses.append(float(outputs["loss"]))
        if self.steps >= self.batches.num_steps:
            # The method's max_steps, not the Trainer's max_epochs (which belongs to the user's config).
            self.trainer.should_stop = True

    def elapsed(self) -> float:
        """Seconds adapting, the earlier fits of a resumed run included."""
        return self.seconds + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {"coefficients": checkpoint["state_dict"]["coefficients"]}
        checkpoint["adamerging"] = {"key": self.key, "seconds": self.elapsed()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.seconds = float(checkpoint.get("adamerging", {}).get("seconds", 0.0))

    def train_dataloader(self) -> AdaptationBatches:
        return self.batches

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.coefficients], lr=self.lr, betas=(0.9, 0.999), eps=1e-8)


class CoefficientsFile(Cache):
    """The coefficients file at the path the user chose: the cache's record (key, checksum,
    payload), its atomic write, trust check and message, for one named file."""

    def __init__(self, path: str | os.PathLike):
        self.file = Path(path).expanduser()
        super().__init__(self.file.parent, "adamerging", "AdaMerging coefficients")

    def path(self, key: str, suffix: str = ".json", prefix: str = "") -> Path:
        return self.file


# ---- the method ----------------------------------------------------------------------------
class AdaMerging(MergeMethod):
    """AdaMerging: θ0 + Σi λ̃i,p τi,p, λ learned by entropy minimisation on unlabeled inputs (``trainer.fit``
    in ``prepare``); ``method.data`` and ``method.transductive`` say which inputs it read.

    Args:
        granularity: ``layer``: one λ per task and per body tensor (148 per task on GPT-2 small,
            FusionBench's "layer-wise"); ``task``: one λ per task.
        init_value: λ's initial value everywhere (FusionBench ``init_values``); 0.3 starts from Task
            Arithmetic with λ = 0.3.
        clamp: clamp λ to [0, 1] inside the merge (the paper's; FusionBench ``clamp_weights``, false for GPT-2).
        lr: Adam's learning rate (the paper's 1e-3; FusionBench's GPT-2 config: 1e-4).
        max_steps: Adam steps (the paper's 500; FusionBench's 1000); 0 skips adaptation (Task Arithmetic
            with λ = ``init_value``). On a CPU each GPT-2-small step takes minutes.
        batch_size: unlabeled inputs per batch (the paper's and FusionBench's 16).
        batches_per_step: batches per task per step, their losses summed (the paper's code: 2; FusionBench: 1).
        loss: ``entropy``: mean per-example prediction entropy (the paper's); ``fusionbench``: the
            entropy of the batch-mean logits, FusionBench's GPT-2 loss.
        adaptation_split: whose inputs adapt λ: ``validation``, those of the very rows scored (transductive,
            the paper's and FusionBench's setting), or ``train``. Labels and held-out dev rows never adapt.
        seed: task i's inputs are shuffled by a generator seeded with ``seed + i``.
        coefficients_path: a JSON file (not a folder) for the learned λ: loaded instead of adapting when
            its content key (adaptation rows, models, tensors, every argument above) matches, else
            written atomically once adaptation has finished.
        checkpoint_every: with ``coefficients_path``, a Lightning checkpoint every this many steps in
            ``<coefficients_path>.checkpoints/<key>/``, from which a rerun resumes to the same λ, bit
            for bit. 0: never. Not part of the key: it does not change λ.
    """

    display_name = "AdaMerging"
    symbols = {"granularity": "granularity", "init_value": "λ₀", "max_steps": "steps", "adaptation_split": "split"}
    quick = {"max_steps": 3}  # a few steps on the tiny test pool; real runs use the paper's 500
    data = "validation inputs"

    def __init__(
        self,
        pool: ModelPool,
        granularity: Literal["layer", "task"] = "layer",
        init_value: float = 0.3,
        clamp: bool = True,
        lr: float = 1e-3,
        max_steps: int = 500,
        batch_size: int = 16,
        batches_per_step: int = 2,
        loss: Literal["entropy", "fusionbench"] = "entropy",
        adaptation_split: Literal["validation", "train"] = "validation",
        seed: int = 0,
        coefficients_path: Optional[str] = None,
        checkpoint_every: int = 50,
    ):
        super().__init__(pool)
        self.granularity = check_choice(granularity, "granularity", ("layer", "task"))
        self.init_value = check_number(init_value, "init_value (λ₀, λ's initial value)")
        self.clamp = bool(check_choice(clamp, "clamp", (True, False)))
        self.lr = check_number(lr, "lr", low=0.0, low_open=True)
        self.max_steps = check_integer(max_steps, "max_steps", 0)
        self.batch_size = check_integer(batch_size, "batch_size", 1)
        self.batches_per_step = check_integer(batches_per_step, "batches_per_step", 1)
        self.loss = check_choice(loss, "loss", ("entropy", "fusionbench"))
        self.adaptation_split = check_choice(adaptation_split, "adaptation_split", ("train", "validation"))
        self.seed = check_integer(seed, "seed", 0)
        self.checkpoint_every = check_integer(checkpoint_every, "checkpoint_every (0: never)", 0)
        self.coefficients_path = coefficients_path
        # What the report and the comparison table say the method read.
        self.data = f"{adaptation_split} inputs"
        self.transductive = adaptation_split == "validation"
        self.losses: list[float] = []  # the adaptation's L per step of this run (empty when loaded or skipped)
        self._coefficients: Tensor | None = None
        self._weights: Tensor | None = None
        self._columns: dict[str, int] = {}
        self.save_hyperparameters(ignore=["pool"])

    # ---- coefficients and the per-key merge ---------------------------------------------------
    def initial_coefficients(self) -> Tensor:
        """λ before adaptation: ``init_value`` everywhere, [n, P] or [n]."""
        n, num_tensors = len(self.tasks), len(self.pool.keys())
        return torch.full((n, num_tensors) if self.granularity == "layer" else (n,), self.init_value)

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

    def prepare_merge(self) -> None:
        names = self.pool.keys()
        self._weights = coefficient_matrix(self.coefficients().float(), len(names), self.clamp)
        self._columns = {name: p for p, name in enumerate(names)}

    def merge_tensor(self, key: str, theta0: Tensor, thetas) -> Tensor:
        # The n τi of this one key stacked, as the adaptation's forward did: the same bits.
        task_vectors = torch.stack([theta - theta0 for theta in thetas])
        return merged_tensor(theta0, task_vectors, self._weights[:, self._columns[key]])

    # ---- adaptation -------------------------------------------------------------------------
    def prepare(self, trainer: L.Trainer, datamodule) -> None:
        self.losses = []
        if self.max_steps == 0:
            self._coefficients = self.initial_coefficients()
            return
        # Everything that can be refused is refused here, before the pool or the data is read.
        self._check_datamodule(datamodule)
        self._check_coefficients_path()
        self._check_trainer(trainer)
        inputs = self.adaptation_inputs(datamodule)
        key, file = None, None
        if self.coefficients_path:
            file = CoefficientsFile(self.coefficients_path)
            key = file.key(self.key_fields(inputs, datamodule))
            start = time.perf_counter()
            found = self._read_coefficients(file, key) if trainer.is_global_zero else None
            # Rank 0 decides, so that every process takes the same path (fit is collective).
            found = trainer.strategy.broadcast(found, src=0)
            if found is not None:
                self._coefficients, seconds = found
                costs.note_cached("prepare", seconds=seconds, peak_gb=None, read_seconds=time.perf_counter() - start)
                rank_zero_info(f"AdaMerging coefficients: loaded from {self.coefficients_path}")
                return
        folder = self.checkpoint_folder(key) if key is not None and self.checkpoint_every and not trainer.fast_dev_run else None
        resume = self._latest_checkpoint(folder, key) if folder is not None and trainer.is_global_zero else None
        resume = trainer.strategy.broadcast(resume, src=0)
        if resume is not None and resume[1] == self.max_steps:
            # Stopped after the last step's checkpoint, before the file was written: λ is in the checkpoint.
            checkpoint = torch.load(resume[0], map_location="cpu", weights_only=True)
            self._coefficients = checkpoint["state_dict"]["coefficients"].detach().float().clone()
            rank_zero_info(f"AdaMerging coefficients: the finished adaptation's, from {resume[0]}")
            self._keep(trainer, file, key, folder, float(checkpoint["adamerging"]["seconds"]))
            return
        module = self.adaptation_module(datamodule, inputs, key)
        rank_zero_info(
            f"AdaMerging: {self.max_steps} steps of {self.batches_per_step} x {self.batch_size} unlabeled "
            f"{self.adaptation_split} inputs per task ({self.granularity}-wise, loss {self.loss}, lr {self.lr}, seed {self.seed})"
            + (f"; resuming after step {resume[1]} from {resume[0]}" if resume else "")
        )
        self._fit(trainer, module, folder, resume[0] if resume else None)
        self._coefficients = module.coefficients.detach().cpu().clone()
        self.losses = list(module.losses)
        if module.steps != self.max_steps:
            if not trainer.fast_dev_run:
                kept = f"; rerun to resume from its last checkpoint in {folder}" if folder is not None else ""
                raise MergelitError(
                    f"AdaMerging's adaptation stopped after {module.steps} of max_steps={self.max_steps} steps (a callback "
                    f"or the Trainer stopped the fit){kept}. The adaptation's length is model.init_args.max_steps."
                )
            rank_zero_warn(f"AdaMerging: fast_dev_run adapted for {module.steps} of {self.max_steps} steps; not saving them.")
            return
        self._keep(trainer, file, key, folder, module.elapsed())

    def _keep(
        self, trainer: L.Trainer, file: Optional[CoefficientsFile], key: Optional[str], folder: Optional[Path],
        seconds: float,
    ) -> None:
        """Write the finished λ to the coefficients file (rank 0) and remove the run's checkpoints."""
        if file is None:
            return
        if trainer.is_global_zero:
            self._write_coefficients(file, key, self._coefficients, seconds)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)  # finished: nothing left to resume
                if folder.parent.is_dir() and not any(folder.parent.iterdir()):
                    folder.parent.rmdir()
            rank_zero_info(f"AdaMerging coefficients: written to {self.coefficients_path}")
        trainer.strategy.barrier("adamerging coefficients written")

    def _fit(self, trainer: L.Trainer, module: AdaMergingCoefficients, folder: Optional[Path], ckpt_path: Optional[str]) -> None:
        """``trainer.fit(module)``, with a ``ModelCheckpoint`` into ``folder`` for this fit only, resumed from
        ``ckpt_path``; without the run's model summary (the adaptation module is not the run's model)."""
        from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary

        summaries = [c for c in trainer.callbacks if isinstance(c, ModelSummary)]
        for summary in summaries:
            trainer.callbacks.remove(summary)
        callback = None
        if folder is not None:
            # save_top_k=1 without a monitor: the latest step's checkpoint replaces the previous one.
            callback = ModelCheckpoint(
                dirpath=folder, filename="{step}", every_n_train_steps=self.checkpoint_every, save_top_k=1,
                enable_version_counter=False,
            )
            trainer.callbacks.append(callback)
        try:
            with warnings.catch_warnings():
                # Eval mode during fit is the point (no dropout), not an accident.
                warnings.filterwarnings("ignore", message=".*in eval mode at the start of training.*")
                # The fit's length is max_steps (its loader's length), not the Trainer's epochs.
                warnings.filterwarnings("ignore", message=".*`max_epochs` was not set.*")
                # Resuming: the folder holds the checkpoint being resumed from.
                warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
                trainer.fit(module, ckpt_path=ckpt_path, weights_only=True)
        finally:
            if callback is not None:
                trainer.callbacks.remove(callback)
            trainer.callbacks.extend(summaries)

    def adaptation_module(
        self, datamodule: GLUEDataModule, inputs: Optional[dict] = None, key: Optional[str] = None
    ) -> AdaMergingCoefficients:
        """The LightningModule ``prepare`` fits (λ at ``init_value``), on ``inputs`` (default: ``adaptation_inputs``)."""
        inputs = self.adaptation_inputs(datamodule) if inputs is None else inputs
        pad_to = datamodule.max_length if datamodule.pad_to_max_length else None
        batches = AdaptationBatches(
            inputs, self.batch_size, self.max_steps, self.seed, datamodule.pad_token_id, pad_to, self.batches_per_step
        )
        return AdaMergingCoefficients(
            self.pool, batches, granularity=self.granularity, init_value=self.init_value, clamp=self.clamp,
            lr=self.lr, loss=self.loss, key=key,
        )

    def adaptation_inputs(self, datamodule: GLUEDataModule) -> dict[str, Any]:
        """Task -> the rows adaptation reads: ``input_ids`` only, of ``adaptation_split``, without the
        rows the data module holds out (``held_out_rows``: the dev rows)."""
        role = "eval" if self.adaptation_split == "validation" else "train"
        datamodule.check((role,))
        inputs = {}
        for task in self.tasks:
            split = GLUE_TASKS[task].eval_split if role == "eval" else GLUE_TASKS[task].train_split
            # Only the token ids: the labels are not even in what the loader can read.
            rows = (datamodule.eval_dataset if role == "eval" else datamodule.train_dataset)(task).select_columns(["input_ids"])
            held_out = set(datamodule.held_out_rows(task, split))
            if held_out:
                rows = rows.select([i for i in range(len(rows)) if i not in held_out])
            if len(rows) == 0:
                raise BadData(
                    f"AdaMerging: task {task!r} split {split!r} has no rows left to adapt on once its {len(held_out)} "
                    f"held-out dev rows are left out; use a smaller data.dev_size or another adaptation_split."
                )
            inputs[task] = rows
        return inputs

    # ---- checks before anything is read ---------------------------------------------------------
    def _check_datamodule(self, datamodule) -> None:
        if not isinstance(datamodule, GLUEDataModule):
            raise MergelitError(
                f"AdaMerging adapts on the GLUE inputs and needs the GLUEDataModule, got {type(datamodule).__name__}; "
                f"pass `datamodule=GLUEDataModule(...)` (the CLI's `data:` group)."
            )
        missing = [task for task in self.tasks if task not in datamodule.tasks]
        if missing:
            raise MergelitError(f"The data module lacks the pool's task(s) {missing}; give it the pool's tasks.")

    def _check_coefficients_path(self) -> None:
        """``coefficients_path`` must name a file that can be written (and its checkpoints folder beside it)."""
        if not self.coefficients_path:
            return
        given = str(self.coefficients_path)
        path = Path(given).expanduser().absolute()
        if path.is_dir():
            raise NotWritable(
                f"model.init_args.coefficients_path {given!r} is a folder; give a file path for the coefficients "
                f"(e.g. {os.path.join(given, 'adamerging.json')!r})."
            )
        existing = path.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise NotWritable(f"model.init_args.coefficients_path {given!r} cannot be written: {str(existing)!r} is a file, not a folder.")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise NotWritable(f"model.init_args.coefficients_path {given!r} cannot be written: no write permission in {str(existing)!r}.")

    def _check_trainer(self, trainer: L.Trainer) -> None:
        """Refuse Trainer settings that would stop the adaptation before ``max_steps`` (or change its steps)."""
        from lightning.pytorch.callbacks import Timer

        if trainer.accumulate_grad_batches != 1:
            raise MergelitError(
                f"AdaMerging takes one Adam step per batch; trainer.accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches} would change that. Leave it at 1."
            )
        if trainer.fast_dev_run:
            return
        length = f"the adaptation's length is model.init_args.max_steps ({self.max_steps})"
        timers = [c for c in trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None]
        if timers:
            raise MergelitError(
                f"trainer.max_time ({timers[0].time_remaining():.0f} s left) would stop AdaMerging's adaptation when it runs "
                f"out; leave --trainer.max_time unset ({length}; to bound the time, lower max_steps, or set "
                f"coefficients_path and stop and resume it: it resumes from its last checkpoint)."
            )
        if trainer.max_steps != -1 and trainer.max_steps < trainer.global_step + self.max_steps:
            raise MergelitError(
                f"trainer.max_steps={trainer.max_steps} would stop AdaMerging's {self.max_steps} steps; leave "
                f"--trainer.max_steps unset ({length})."
            )
        limit = trainer.limit_train_batches
        if (isinstance(limit, float) and limit < 1.0) or (isinstance(limit, int) and not isinstance(limit, bool) and limit < self.max_steps):
            raise MergelitError(
                f"trainer.limit_train_batches={limit} would stop AdaMerging's {self.max_steps} steps; leave "
                f"--trainer.limit_train_batches unset ({length})."
            )
        if trainer.max_epochs is not None and trainer.max_epochs != -1 and trainer.max_epochs <= trainer.current_epoch:
            raise MergelitError(
                f"trainer.max_epochs={trainer.max_epochs} leaves AdaMerging no epoch to adapt in; leave "
                f"--trainer.max_epochs unset ({length})."
            )
        end_step, end_epoch = trainer.global_step + self.max_steps, trainer.current_epoch + 1
        if (trainer.min_steps or 0) > end_step or (trainer.min_epochs or 0) > end_epoch:
            raise MergelitError(
                f"trainer.min_steps={trainer.min_steps} / min_epochs={trainer.min_epochs} would run AdaMerging beyond "
                f"its {self.max_steps} steps; leave them unset."
            )

    # ---- what is kept ---------------------------------------------------------------------------
    def key_fields(self, inputs: dict[str, Any], datamodule: GLUEDataModule) -> dict[str, Any]:
        """Everything the learned λ depends on, by content (``mergelit.cache``): never a path."""
        pool = self.pool
        return {
            "format": _FORMAT,
            "tasks": list(self.tasks),
            "tensors": pool.keys(),
            "pretrained": pool.pretrained_fingerprint(),
            "models": {task: pool.fingerprint(task) for task in self.tasks},
            "rows": {task: rows_fingerprint(rows) for task, rows in inputs.items()},
            "padding": {"pad_token_id": datamodule.pad_token_id,
                        "pad_to": datamodule.max_length if datamodule.pad_to_max_length else None},
            "arguments": {
                "granularity": self.granularity, "init_value": self.init_value, "clamp": self.clamp, "lr": self.lr,
                "max_steps": self.max_steps, "batch_size": self.batch_size, "batches_per_step": self.batches_per_step,
                "loss": self.loss, "adaptation_split": self.adaptation_split, "seed": self.seed,
            },
        }

    def checkpoint_folder(self, key: str) -> Path:
        """Where the adaptation of the run with content key ``key`` keeps its Lightning checkpoints."""
        return Path(f"{Path(self.coefficients_path).expanduser()}.checkpoints") / key

    def _latest_checkpoint(self, folder: Path, key: str) -> Optional[tuple[str, int]]:
        """``(path, steps)`` of the latest checkpoint in ``folder`` read with ``weights_only=True`` that carries
        this run's key and one of its steps, or None; one that fails gets the cache's one message."""
        if not folder.is_dir():
            return None
        found = []
        for path in folder.glob("step=*.ckpt"):
            match = re.fullmatch(r"step=(\d+)\.ckpt", path.name)
            if match:
                found.append((int(match.group(1)), path))
        checkpoints = Cache(folder.parent, "", "AdaMerging checkpoint")
        for steps, path in sorted(found, reverse=True):
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
                stored_key = checkpoint.get("adamerging", {}).get("key")
                stored_steps = int(checkpoint["global_step"])
            except Exception as error:  # torch.load raises several types for a damaged or foreign file
                checkpoints.distrust(path, f"unreadable: {type(error).__name__}: {error}")
                continue
            if stored_key != key:
                checkpoints.distrust(path, f"it was written for key {stored_key!r}")
            elif not 0 < stored_steps <= self.max_steps:
                checkpoints.distrust(path, f"it holds step {stored_steps}, not one of 1..{self.max_steps}")
            else:
                return str(path), stored_steps
        return None

    def _write_coefficients(self, file: CoefficientsFile, key: str, values: Tensor, seconds: float) -> None:
        values = values.float()
        names = self.pool.keys()
        if values.dim() == 2:
            readable = {t: dict(zip(names, map(float, row))) for t, row in zip(self.tasks, values.tolist())}
        else:
            readable = dict(zip(self.tasks, map(float, values.tolist())))
        file.write_json(key, {"coefficients": readable, "granularity": self.granularity, "seconds": seconds})

    def _read_coefficients(self, file: CoefficientsFile, key: str) -> Optional[tuple[Tensor, float]]:
        """``(λ, seconds the adaptation took)`` from the file, or None if absent or not trusted (warned)."""
        payload = file.read_json(key)
        if payload is None:
            return None
        try:
            readable = payload["coefficients"]
            if self.granularity == "layer":
                values = torch.tensor([[readable[t][name] for name in self.pool.keys()] for t in self.tasks])
            else:
                values = torch.tensor([readable[t] for t in self.tasks])
            seconds = float(payload.get("seconds", 0.0))
        except (KeyError, TypeError, ValueError) as error:
            file.distrust(file.file, f"it lacks a value: {type(error).__name__}: {error}")
            return None
        return values, seconds

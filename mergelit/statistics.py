"""Per-task statistics for the data-driven merges, computed by ``Trainer.predict`` and kept in the cache.

Fisher Merging needs each fine-tuned model's diagonal Fisher information, RegMean the Gram
matrix of every Conv1D input. Both come from a few hundred **train** examples of the task, run
through that task's own fine-tuned body (and head, for Fisher) in eval mode:

- ``fisher_statistics(trainer, datamodule, pool, ...)`` -> Fi per body tensor name
- ``gram_statistics(trainer, datamodule, pool, ...)``   -> Gi per Conv1D module name

Both return a ``StoredStatistics``: each task's statistics stay in their cache file and are read
one tensor at a time when a merge asks for them, so a merge that streams its keys holds one
task's statistic of one key at a time, whatever the number of tasks.

One task after another (``_task_statistics``): draw its rows; if the cache holds statistics for
exactly those rows, that model and those arguments, use them (and report what they originally
cost: ``costs.note_cached``); otherwise run ``trainer.predict`` over ``FisherStatistics`` /
``GramStatistics`` (Lightning's progress bar) and write the result, with the time and peak
memory of the predict loop, to the cache.

Sampling: ``draw_examples`` permutes the train split with an explicit seed and keeps the first
``num_examples`` rows; consecutive groups of ``batch_size`` of them, in that drawn order, are the
batches (Fisher squares the gradient of a batch *sum*, so the grouping changes the result). The
drawn indices are stored beside the statistics (``read_statistics(path)[1]["indices"]``). Rows
the data module holds out (``datamodule.held_out_rows``: the dev rows of a sweep that selects on
them) are skipped in that same permuted order, so dev and statistics rows are disjoint; with none
held out the draw is the plain one.

Why the merge methods call these in ``prepare`` and not in ``setup`` (the design):
``trainer.predict`` cannot run inside a running ``trainer.test``, and ``setup`` runs inside it.
So ``mergelit test`` calls ``method.prepare(trainer, datamodule)``, which runs the predict loops
on the *same* Trainer, then ``trainer.test`` merges in ``setup`` and scores, all in one command.
A private second Trainer inside ``setup`` would be unsound under DDP: it would launch (or fail to
launch) its own processes inside a running distributed job. With one Trainer, each process runs
the same hooks in the same order, so the predict calls line up across ranks.

Gradients: Lightning predicts under ``torch.inference_mode`` (or ``no_grad`` with
``Trainer(inference_mode=False)``). ``FisherStatistics.predict_step`` leaves it locally
(``torch.inference_mode(False)`` + ``torch.enable_grad()``) and clones the batch, whose tensors
were made in inference mode and so cannot be saved for backward: it works under either setting,
without touching the Trainer that ``test`` uses next.

Several processes (DDP): each rank takes every ``world_size``-th batch (disjoint, nothing
repeated), sums its per-batch contributions, and ``on_predict_epoch_end`` all-reduces the sums
and the counts (``trainer.strategy.reduce(..., "sum")``, a no-op on one process) before dividing,
so every rank ends with the same statistics as one process would. Only rank 0 writes the cache
file, then all ranks meet at a barrier and read it. The cache folder must be shared by all ranks.

Cache (``mergelit.cache.Cache``): ``cache_dir/<kind>/<task>-<key>.safetensors``, the key a hash of
the model's content (body, head, pad id), the drawn rows' token ids, their number, the seed, the
batch size, and for Grams the padding mode and ``max_length``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from mergelit import costs
from mergelit.cache import Cache
from mergelit.glue import GLUEDataModule
from mergelit.gpt2 import build_body, build_head, last_non_pad_index
from mergelit.pool import ModelPool
from mergelit.tasks import GLUE_TASKS

DEFAULT_CACHE_DIR = "lightning_logs/cache/statistics"

# Statistics kind (the cache sub-folder) -> how the log names it.
TITLES = {"fisher": "Fisher statistics", "regmean": "RegMean Gram matrices"}


# ---- sampling -----------------------------------------------------------------------------
def draw_examples(num_rows: int, num_examples: int, seed: int, exclude: Sequence[int] = ()) -> list[int]:
    """The first ``num_examples`` of a seeded random permutation of ``range(num_rows)``, skipping ``exclude``.

    Asking for more rows than the split has gives every row (in shuffled order), as
    FusionBench's loop stops at the end of the data. ``exclude`` (held-out rows) leaves the
    permutation as it is and drops those rows from it: with no exclusion the draw is unchanged.
    """
    if num_examples < 1:
        raise ValueError(f"The number of statistics examples must be >= 1, got {num_examples}.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_rows, generator=generator).tolist()
    if exclude:
        skipped = set(exclude)
        order = [i for i in order if i not in skipped]
    return order[:num_examples]


def batches_of(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive groups of ``batch_size`` indices, in the drawn order (the last may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]


class FixedBatches(Sampler[list[int]]):
    """Given batches of indices, as they are (Lightning's predict loop wants a ``Sampler`` object)."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def statistics_loader(
    dataset, batches: list[list[int]], collate: Callable, num_workers: int = 0, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """The DataLoader of process ``rank``: every ``world_size``-th of ``batches``.

    The ranks see disjoint batches (nothing repeated, unlike ``DistributedSampler``), so
    the all-reduced sums of their per-batch contributions equal one process's sums.
    """
    sampler = FixedBatches(batches[rank::world_size])
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)


# ---- predict-loop modules -----------------------------------------------------------------
class _SumsOverBatches(L.LightningModule):
    """A predict loop that adds up per-batch contributions (``sums``, ``counts``), then adds up the
    processes' totals at the end of the epoch (a no-op on one process).

    ``loader(rank=, world_size=)`` gives that process's DataLoader (``statistics_loader``); it is
    called once the processes exist.
    """

    def __init__(self, loader: Callable[..., DataLoader]):
        super().__init__()
        self.loader = loader
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def predict_dataloader(self) -> DataLoader:
        return self.loader(rank=self.trainer.global_rank, world_size=self.trainer.world_size)

    def on_predict_start(self) -> None:
        # Made here (on the module's device, outside inference mode) and not lazily, so that a
        # rank's tensors exist for the all-reduce whatever it saw.
        with torch.inference_mode(False):
            self.sums = self.zero_sums()
            self.counts = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in ("examples", "positions")}

    def zero_sums(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def on_predict_epoch_end(self) -> None:
        with torch.inference_mode(False):
            reduce = functools.partial(self.trainer.strategy.reduce, reduce_op="sum")
            self.sums = {name: reduce(total) for name, total in self.sums.items()}
            self.counts = {name: reduce(total) for name, total in self.counts.items()}

    def num_examples(self) -> int:
        return int(self.counts["examples"].item())


class FisherStatistics(_SumsOverBatches):
    """Diagonal Fisher information of one task's fine-tuned classifier, as a predict loop.

    Per batch: p = softmax(logits) (detached), S = Σ_batch Σ_class √p · log_softmax(logits),
    F += (∂S/∂θ)² for every body tensor; at the end F /= number of examples. No labels are used.
    ``fisher()`` returns F (float32, on the CPU) after ``trainer.predict(module)``.

    Args:
        body: the task's fine-tuned ``GPT2Model`` (its parameters get ``requires_grad``).
        head: the task's ``score`` weight, [num_labels, n_embd].
        pad_token_id: the head config's pad id (read-out at the last non-pad token).
        loader: ``loader(rank=, world_size=)`` gives that process's DataLoader (``statistics_loader``).
    """

    def __init__(self, body: nn.Module, head: Tensor, pad_token_id: int, loader: Callable[..., DataLoader]):
        super().__init__(loader)
        self.body = body.requires_grad_(True)
        self.head = build_head(head)
        self.pad_token_id = pad_token_id

    def zero_sums(self) -> dict[str, Tensor]:
        return {name: torch.zeros_like(p) for name, p in self.body.named_parameters()}

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # Lightning predicts under torch.inference_mode (or no_grad); Fisher needs gradients. The
        # batch was made in inference mode, and such tensors cannot be saved for backward: clone.
        with torch.inference_mode(False), torch.enable_grad():
            input_ids = batch["input_ids"].clone()
            attention_mask = batch["attention_mask"].clone()
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            last = last_non_pad_index(input_ids, self.pad_token_id)
            logits = self.head(hidden[torch.arange(len(input_ids), device=hidden.device), last]).float()
            probabilities = logits.softmax(-1).detach()
            # The spec's (FusionBench's) estimator: one backward per batch; squaring the gradient
            # turns the √p weights into p, a stand-in for E_y~p[(∂ log p_y / ∂θ)²] without labels.
            expectation = (probabilities.sqrt() * logits.log_softmax(-1)).sum()
            parameters = dict(self.body.named_parameters())
            grads = torch.autograd.grad(expectation, list(parameters.values()), allow_unused=True)
            for name, grad in zip(parameters, grads):
                if grad is not None:  # None: the parameter did not take part (zero gradient)
                    self.sums[name].addcmul_(grad, grad)
            self.counts["examples"] += len(input_ids)

    def fisher(self) -> dict[str, Tensor]:
        """F = (Σ_batches (∂S/∂θ)²) / number of examples, per body tensor (CPU, float32)."""
        return {name: (total / self.counts["examples"]).float().cpu() for name, total in self.sums.items()}


def conv1d_modules(body: nn.Module) -> dict[str, nn.Module]:
    """The body's Conv1D modules by name (per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)."""
    from transformers.pytorch_utils import Conv1D

    return {name: module for name, module in body.named_modules() if isinstance(module, Conv1D)}


class GramStatistics(_SumsOverBatches):
    """Gram matrix G = XᵀX / T of the input of every Conv1D of one task's body, as a predict loop.

    X stacks the Conv1D's input vectors over the counted positions, T is their number. With
    ``count_padding`` every position of every row counts, padding included (FusionBench, with
    rows padded to ``max_length``: the reproduction setting); without it only real tokens
    (attention mask 1) count. Sums are accumulated in float64, so the order of batches and ranks
    changes nothing measurable. The head does not change a Conv1D input, so only the body runs.
    ``grams()`` returns G (float64, on the CPU) after ``trainer.predict(module)``.

    Args:
        body: the task's fine-tuned ``GPT2Model``.
        count_padding: count padding positions too (the batches should then be padded to ``max_length``).
        loader: ``loader(rank=, world_size=)`` gives that process's DataLoader (``statistics_loader``).
    """

    def __init__(self, body: nn.Module, count_padding: bool, loader: Callable[..., DataLoader]):
        super().__init__(loader)
        self.body = body.requires_grad_(False)
        self.count_padding = count_padding
        self.modules_by_name = conv1d_modules(self.body)
        if not self.modules_by_name:
            raise ValueError("The body has no Conv1D module: RegMean's statistics are defined for GPT-2 bodies.")
        for name, module in self.modules_by_name.items():
            module.register_forward_hook(self._accumulate(name))
        self._rows: Tensor | None = None  # the counted positions of the current batch (flattened mask)

    def zero_sums(self) -> dict[str, Tensor]:
        return {  # Conv1D weight: [in, out]
            name: torch.zeros(m.weight.shape[0], m.weight.shape[0], dtype=torch.float64, device=self.device)
            for name, m in self.modules_by_name.items()
        }

    def _accumulate(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])  # [batch * length, in]
            if self._rows is not None:
                x = x[self._rows]
            x = x.double()
            self.sums[name].addmm_(x.T, x)

        return hook

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # Outside inference mode, so that the sums stay ordinary tensors (reduced and read later).
        with torch.inference_mode(False), torch.no_grad():
            attention_mask = batch["attention_mask"]
            self._rows = None if self.count_padding else attention_mask.reshape(-1).bool()
            self.body(input_ids=batch["input_ids"], attention_mask=attention_mask, use_cache=False)
            self._rows = None
            self.counts["positions"] += attention_mask.numel() if self.count_padding else attention_mask.sum()
            self.counts["examples"] += len(attention_mask)

    def grams(self) -> dict[str, Tensor]:
        """G = XᵀX / T per Conv1D module name (CPU, float64)."""
        return {name: (total / self.counts["positions"]).cpu() for name, total in self.sums.items()}


# ---- what a merge reads -------------------------------------------------------------------
class StoredStatistics:
    """Each task's statistics, read one tensor at a time when asked for.

    A task's statistics stay in their cache file; ``tensor(task, name)`` opens it memory-mapped,
    copies that one tensor out and closes it, so reading them key by key holds one tensor at a
    time, whatever the number of tasks. Statistics that were not written (a predict loop cut short,
    e.g. by ``limit_predict_batches``) are held in memory instead.

    Args:
        sources: task -> its cache file, or its statistics as a dict (name -> tensor).
    """

    def __init__(self, sources: dict[str, Path | dict[str, Tensor]]):
        self.sources = dict(sources)
        self.tasks = list(self.sources)

    def __repr__(self) -> str:
        return f"StoredStatistics(tasks={self.tasks})"

    def names(self, task: str) -> list[str]:
        """The names of ``task``'s statistics (body tensor names for Fisher, Conv1D module names for Grams)."""
        source = self.sources[task]
        if isinstance(source, dict):
            return list(source)
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as file:
            return list(file.keys())

    def tensor(self, task: str, name: str) -> Tensor:
        """``task``'s statistic ``name`` (a new tensor each call when read from the file)."""
        source = self.sources[task]
        if isinstance(source, dict):
            return source[name]
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as file:
            # A copy: safetensors' tensor lives in the file's mapping, which a file truncated in
            # place (not the cache's atomic rewrite) would pull from under it (SIGBUS).
            return file.get_tensor(name).clone()


def read_statistics(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    """``(tensors, metadata)`` of one statistics cache file (``cache_dir/<kind>/<task>-<key>.safetensors``),
    or None when the cache would not trust it (warned). For inspection: ``json.loads(metadata["indices"])``
    are the drawn rows, ``metadata["fields"]`` what the key was made of, ``metadata["seconds"]`` and
    ``metadata["peak_gb"]`` what computing them cost."""
    path = Path(path)
    task, key = path.stem.split("-", 1)
    kind = path.parent.name
    return Cache(path.parent.parent, kind, TITLES.get(kind, "Statistics")).read_tensors(key, prefix=f"{task}-")


# ---- the statistics of every task -----------------------------------------------------------
@dataclass
class _Recipe:
    """What differs between the kinds of statistics; the flow (``_task_statistics``) is shared."""

    kind: str  # the cache sub-folder: "fisher" or "regmean"
    module: Callable[[str, Callable[..., DataLoader]], _SumsOverBatches]  # (task, loader) -> its predict loop
    result: Callable[[Any], dict[str, Tensor]]  # the statistics, from the module after the loop
    collate: Callable  # rows -> batch
    key_fields: dict[str, Any]  # what else the statistics depend on (padding mode)

    @property
    def title(self) -> str:
        return TITLES[self.kind]


def fisher_statistics(
    trainer: L.Trainer,
    datamodule: GLUEDataModule,
    pool: ModelPool,
    num_examples: int = 256,
    batch_size: int = 32,
    seed: int = 42,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
) -> StoredStatistics:
    """Each task's diagonal Fisher (per body tensor name), from the cache or ``trainer.predict``.

    Rows are padded per batch (the DataModule's setting): GPT-2's read-out at the last real
    token does not depend on the padding.
    """

    def module(task: str, loader: Callable) -> FisherStatistics:
        body = build_body(pool.body_config(), pool.finetuned_body(task))
        return FisherStatistics(body, pool.head(task), pool.task_config(task).pad_token_id, loader)

    recipe = _Recipe("fisher", module, FisherStatistics.fisher, datamodule.collate, {})
    return _statistics(recipe, trainer, datamodule, pool, num_examples, batch_size, seed, cache_dir)


def gram_statistics(
    trainer: L.Trainer,
    datamodule: GLUEDataModule,
    pool: ModelPool,
    num_examples: int = 256,
    batch_size: int = 32,
    seed: int = 42,
    count_padding: bool = True,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
) -> StoredStatistics:
    """Each task's Conv1D input Grams (per Conv1D module name), from the cache or ``trainer.predict``.

    ``count_padding``: rows padded to the data's ``max_length`` and every position counted
    (FusionBench); otherwise rows padded per batch and only real tokens counted.
    """

    def module(task: str, loader: Callable) -> GramStatistics:
        return GramStatistics(build_body(pool.body_config(), pool.finetuned_body(task)), count_padding, loader)

    # Padding changes these statistics: pad to max_length when it is counted, whatever evaluation does.
    collate = functools.partial(datamodule.collate, pad_to_max_length=True) if count_padding else datamodule.collate
    key_fields = {"count_padding": count_padding, "max_length": datamodule.max_length if count_padding else None}
    recipe = _Recipe("regmean", module, GramStatistics.grams, collate, key_fields)
    return _statistics(recipe, trainer, datamodule, pool, num_examples, batch_size, seed, cache_dir)


def _statistics(
    recipe: _Recipe,
    trainer: L.Trainer,
    datamodule: GLUEDataModule,
    pool: ModelPool,
    num_examples: int,
    batch_size: int,
    seed: int,
    cache_dir: str | os.PathLike,
) -> StoredStatistics:
    if not isinstance(datamodule, GLUEDataModule):
        raise TypeError(
            f"{recipe.title} need the GLUEDataModule (for the tasks' train splits), got {type(datamodule).__name__}; "
            f"pass `datamodule=GLUEDataModule(...)` (the CLI's `data:` group)."
        )
    missing = [task for task in pool.tasks if task not in datamodule.tasks]
    if missing:
        raise ValueError(f"The data module lacks the pool's task(s) {missing}; give it the pool's tasks.")
    datamodule.check(("train",))
    cache = Cache(cache_dir, recipe.kind, recipe.title)
    sources = {}
    for task in pool.tasks:
        sources[task] = _task_statistics(recipe, task, trainer, datamodule, pool, num_examples, batch_size, seed, cache)
    return StoredStatistics(sources)


def _task_statistics(
    recipe: _Recipe,
    task: str,
    trainer: L.Trainer,
    datamodule: GLUEDataModule,
    pool: ModelPool,
    num_examples: int,
    batch_size: int,
    seed: int,
    cache: Cache,
) -> Path | dict[str, Tensor]:
    """One task: draw its rows, use the cached statistics if there are any, else run
    ``trainer.predict`` and write them. Returns the cache file (or, when not written, the tensors)."""
    title = f"{recipe.title} of {task}"
    split = GLUE_TASKS[task].train_split
    dataset = datamodule.train_dataset(task)
    indices = draw_examples(len(dataset), num_examples, seed, exclude=datamodule.held_out_rows(task, split))
    if len(indices) < num_examples:
        rank_zero_warn(f"{title}: asked for {num_examples} examples but its train split has {len(indices)} usable rows; "
                       f"using all of them.")
    batches = batches_of(indices, batch_size)
    if len(batches) < trainer.world_size:
        raise ValueError(
            f"{title}: {len(indices)} examples in batches of {batch_size} make {len(batches)} batch(es), fewer than "
            f"the {trainer.world_size} processes; each process needs one. Lower batch_size or use fewer devices."
        )
    fields = {
        "task": task,
        "model": pool.fingerprint(task),
        "data": _rows_fingerprint(dataset, indices),
        "num_examples": len(indices),
        "seed": seed,
        "batch_size": batch_size,
        **recipe.key_fields,
    }
    key, prefix = cache.key(fields), f"{task}-"
    path = cache.path(key, prefix=prefix)

    # 1. The cache.
    start = time.perf_counter()
    found = cache.read_tensors(key, prefix=prefix)  # the whole file once: the trust check reads every tensor
    if found is not None:
        metadata = found[1]
        peak = metadata.get("peak_gb", "")
        costs.note_cached("prepare", seconds=float(metadata["seconds"]), peak_gb=float(peak) if peak else None,
                          read_seconds=time.perf_counter() - start)
        rank_zero_info(f"{title}: loaded from the cache {path}")
        return path

    # 2. The predict loop.
    rank_zero_info(f"{title}: {len(indices)} train examples (seed {seed}) in {len(batches)} batches of {batch_size}")
    loader = functools.partial(statistics_loader, dataset, batches, recipe.collate, datamodule.num_workers)
    module = recipe.module(task, loader)
    with warnings.catch_warnings(), costs.measured() as cost:
        # Lightning cannot check a custom batch sampler's drop_last (ours drops nothing), and
        # asks whether returning None was meant (it was: the statistics stay in the module).
        warnings.filterwarnings("ignore", message=".*custom batch sampler.*")
        warnings.filterwarnings("ignore", message=".*predict returned None.*")
        trainer.predict(module, return_predictions=False)
    tensors = recipe.result(module)
    seen = module.num_examples()
    if seen != len(indices):
        # e.g. fast_dev_run or limit_predict_batches: usable for a smoke test, never cached.
        rank_zero_warn(f"{title}: the predict loop saw {seen} of {len(indices)} examples; not caching them.")
        return tensors

    # 3. Written by rank 0 (the other ranks hold the same all-reduced statistics), read by all.
    if trainer.is_global_zero:
        metadata = {
            "fields": json.dumps(fields, sort_keys=True),
            "indices": json.dumps(indices),
            "seconds": repr(cost.seconds),
            "peak_gb": "" if cost.peak_gb is None else repr(cost.peak_gb),
        }
        cache.write_tensors(key, tensors, metadata, prefix=prefix)
        rank_zero_info(f"{title}: written to {path}")
    trainer.strategy.barrier("statistics written")
    return path if path.is_file() else tensors


def _rows_fingerprint(dataset, indices: Sequence[int]) -> str:
    """A hash of the drawn rows' token ids, in drawn order: exactly what the statistics read."""
    digest = hashlib.sha256(f"rows={len(dataset)}|".encode())
    for row in dataset.select(indices)["input_ids"]:
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()

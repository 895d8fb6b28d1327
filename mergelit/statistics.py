"""Per-task statistics for the data-driven merges: each fine-tuned model's diagonal Fisher (Fisher
Merging) and the Gram matrix of every Conv1D input (RegMean), from a seeded draw of its **train**
rows (held-out dev rows skipped), computed by ``trainer.predict`` and kept in the cache
(``cache_dir/<kind>/<task>-<key>.safetensors``). See docs/methods.md ("Statistics", "Cache").

Why ``method.prepare`` and not ``setup`` runs them: ``trainer.predict`` cannot run inside a running
``trainer.test`` (where ``setup`` runs), and a second Trainer inside ``setup`` would launch its own
processes inside a distributed job. On the run's one Trainer every rank runs the same hooks in the
same order: each takes every ``world_size``-th batch, the sums are all-reduced before dividing, and
rank 0 writes the cache file that all ranks read after a barrier (the folder must be shared).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mergelit import costs
from mergelit.cache import Cache
from mergelit.glue import FixedBatches, GLUEDataModule
from mergelit.gpt2 import build_body, build_head, last_non_pad_index
from mergelit.pool import ModelPool
from mergelit.tasks import GLUE_TASKS

DEFAULT_CACHE_DIR = "lightning_logs/cache/statistics"
TITLES = {"fisher": "Fisher statistics", "regmean": "RegMean Gram matrices"}  # cache sub-folder -> log name


# ---- sampling -----------------------------------------------------------------------------
def draw_examples(num_rows: int, num_examples: int, seed: int, exclude: Sequence[int] = ()) -> list[int]:
    """The first ``num_examples`` of a seeded permutation of ``range(num_rows)`` without ``exclude``
    (the permutation itself unchanged); more than the split gives every row, as FusionBench's loop."""
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


def statistics_loader(dataset, batches: list[list[int]], collate: Callable, num_workers: int = 0, rank: int = 0,
                      world_size: int = 1) -> DataLoader:
    """The DataLoader of process ``rank``: every ``world_size``-th of ``batches`` (disjoint, nothing repeated)."""
    sampler = FixedBatches(batches[rank::world_size])
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)


# ---- predict-loop modules -----------------------------------------------------------------
class _SumsOverBatches(L.LightningModule):
    """A predict loop that adds up per-batch ``sums`` and ``counts``, then the processes' totals.
    ``loader(rank=, world_size=)`` gives a process's DataLoader (``statistics_loader``)."""

    def __init__(self, loader: Callable[..., DataLoader]):
        super().__init__()
        self.loader = loader
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def predict_dataloader(self) -> DataLoader:
        return self.loader(rank=self.trainer.global_rank, world_size=self.trainer.world_size)

    def on_predict_start(self) -> None:
        # Made here (on the device, outside inference mode), not lazily: every rank needs them for the all-reduce.
        with torch.inference_mode(False):
            self.sums = self.zero_sums()
            names = ("examples", "positions")
            self.counts = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in names}

    def on_predict_epoch_end(self) -> None:
        with torch.inference_mode(False):
            reduce = functools.partial(self.trainer.strategy.reduce, reduce_op="sum")
            self.sums = {name: reduce(total) for name, total in self.sums.items()}
            self.counts = {name: reduce(total) for name, total in self.counts.items()}

    def num_examples(self) -> int:
        return int(self.counts["examples"].item())


class FisherStatistics(_SumsOverBatches):
    """Diagonal Fisher of one task's classifier (``body``, ``head`` weight, read-out ``pad_token_id``),
    without labels: per batch S = Σ_batch Σ_class √p · log_softmax(logits) with p = softmax (detached),
    F += (∂S/∂θ)²; ``fisher()`` gives F / number of examples (float32, CPU) after ``trainer.predict``."""

    def __init__(self, body: nn.Module, head: Tensor, pad_token_id: int, loader: Callable[..., DataLoader]):
        super().__init__(loader)
        self.body = body.requires_grad_(True)
        self.head = build_head(head)
        self.pad_token_id = pad_token_id

    def zero_sums(self) -> dict[str, Tensor]:
        return {name: torch.zeros_like(p) for name, p in self.body.named_parameters()}

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        # Lightning predicts under inference_mode (or no_grad); Fisher needs gradients, and tensors
        # made in inference mode cannot be saved for backward: clone the batch.
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


class GramStatistics(_SumsOverBatches):
    """Gram matrix G = XᵀX / T of every Conv1D input of one task's ``body`` over the T counted
    positions: every position with ``count_padding`` (FusionBench, rows padded to ``max_length``),
    else real tokens only. Float64 sums, so batch and rank order change nothing measurable.
    ``grams()`` gives G (float64, CPU) after ``trainer.predict``."""

    def __init__(self, body: nn.Module, count_padding: bool, loader: Callable[..., DataLoader]):
        from transformers.pytorch_utils import Conv1D
        super().__init__(loader)
        self.body = body.requires_grad_(False)
        self.count_padding = count_padding
        self.modules_by_name = {name: m for name, m in self.body.named_modules() if isinstance(m, Conv1D)}
        if not self.modules_by_name:
            raise ValueError("The body has no Conv1D module: RegMean's statistics are defined for GPT-2 bodies.")
        for name, module in self.modules_by_name.items():
            module.register_forward_hook(self._accumulate(name))
        self._rows: Tensor | None = None  # the current batch's counted positions (flattened mask)

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
        # Outside inference mode, so that the sums stay ordinary tensors.
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
    """Each task's statistics (``sources``: task -> its cache file, or a dict when not written), read
    one tensor at a time: a merge that streams its keys holds one tensor, whatever the number of tasks."""

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
        with safe_open(str(source), framework="pt") as file:
            return list(file.keys())

    def tensor(self, task: str, name: str) -> Tensor:
        """``task``'s statistic ``name`` (a new tensor each call when read from the file)."""
        source = self.sources[task]
        if isinstance(source, dict):
            return source[name]
        with safe_open(str(source), framework="pt") as file:
            # A copy: a file truncated in place would pull the mapped tensor from under it (SIGBUS).
            return file.get_tensor(name).clone()


def read_statistics(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    """``(tensors, metadata)`` of one statistics cache file, or None when not trusted (warned).
    ``json.loads(metadata["indices"])`` are the drawn rows; ``fields``, ``seconds``, ``peak_gb`` too."""
    path = Path(path)
    task, key = path.stem.split("-", 1)
    kind = path.parent.name
    return Cache(path.parent.parent, kind, TITLES.get(kind, "Statistics")).read_tensors(key, prefix=f"{task}-")


# ---- the statistics of every task -----------------------------------------------------------
def fisher_statistics(trainer: L.Trainer, datamodule: GLUEDataModule, pool: ModelPool, num_examples: int = 256,
                      batch_size: int = 32, seed: int = 42,
                      cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> StoredStatistics:
    """Each task's diagonal Fisher (per body tensor name), from the cache or ``trainer.predict``; rows
    padded per batch (the read-out at the last real token does not depend on the padding)."""

    def module(task: str, loader: Callable) -> FisherStatistics:
        body = build_body(pool.body_config(), pool.finetuned_body(task))
        return FisherStatistics(body, pool.head(task), pool.task_config(task).pad_token_id, loader)

    return _statistics("fisher", module, FisherStatistics.fisher, datamodule.collate, {},
                       trainer, datamodule, pool, num_examples, batch_size, seed, cache_dir)


def gram_statistics(trainer: L.Trainer, datamodule: GLUEDataModule, pool: ModelPool, num_examples: int = 256,
                    batch_size: int = 32, seed: int = 42, count_padding: bool = True,
                    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> StoredStatistics:
    """Each task's Conv1D input Grams (per Conv1D module name), from the cache or ``trainer.predict``.
    ``count_padding``: rows padded to ``max_length``, every position counted (FusionBench)."""

    def module(task: str, loader: Callable) -> GramStatistics:
        return GramStatistics(build_body(pool.body_config(), pool.finetuned_body(task)), count_padding, loader)

    # Padding changes these statistics: pad to max_length when it is counted, whatever evaluation does.
    collate = functools.partial(datamodule.collate, pad_to_max_length=True) if count_padding else datamodule.collate
    key_fields = {"count_padding": count_padding, "max_length": datamodule.max_length if count_padding else None}
    return _statistics("regmean", module, GramStatistics.grams, collate, key_fields,
                       trainer, datamodule, pool, num_examples, batch_size, seed, cache_dir)


def _statistics(kind: str, module: Callable[[str, Callable[..., DataLoader]], _SumsOverBatches],
                result: Callable[[Any], dict[str, Tensor]], collate: Callable, key_fields: dict[str, Any],
                trainer: L.Trainer, datamodule: GLUEDataModule, pool: ModelPool, num_examples: int, batch_size: int,
                seed: int, cache_dir: str | os.PathLike) -> StoredStatistics:
    """Per task: draw its rows; use the cached statistics of exactly those rows, model and arguments
    (reporting what they originally cost), else run ``module(task, loader)``'s predict loop and write
    ``result(module)`` to the cache. ``key_fields``: what else the statistics depend on."""
    if not isinstance(datamodule, GLUEDataModule):
        raise TypeError(f"{TITLES[kind]} need the GLUEDataModule (for the tasks' train splits), got "
                        f"{type(datamodule).__name__}; pass `datamodule=GLUEDataModule(...)` (the CLI's `data:` "
                        f"group).")
    missing = [task for task in pool.tasks if task not in datamodule.tasks]
    if missing:
        raise ValueError(f"The data module lacks the pool's task(s) {missing}; give it the pool's tasks.")
    datamodule.check(("train",))
    cache = Cache(cache_dir, kind, TITLES[kind])
    sources = {}
    for task in pool.tasks:
        title = f"{TITLES[kind]} of {task}"
        dataset = datamodule.train_dataset(task)
        exclude = datamodule.held_out_rows(task, GLUE_TASKS[task].train_split)
        indices = draw_examples(len(dataset), num_examples, seed, exclude=exclude)
        if len(indices) < num_examples:
            rank_zero_warn(f"{title}: asked for {num_examples} examples but its train split has {len(indices)} usable "
                           f"rows; using all of them.")
        batches = batches_of(indices, batch_size)
        if len(batches) < trainer.world_size:
            raise ValueError(f"{title}: {len(indices)} examples in batches of {batch_size} make {len(batches)} "
                             f"batch(es), fewer than the {trainer.world_size} processes; each process needs one. Lower "
                             f"batch_size or use fewer devices.")
        fields = {"task": task, "model": pool.fingerprint(task), "data": _rows_fingerprint(dataset, indices),
                  "num_examples": len(indices), "seed": seed, "batch_size": batch_size, **key_fields}
        key, prefix = cache.key(fields), f"{task}-"
        path = cache.path(key, prefix=prefix)
        start = time.perf_counter()
        found = cache.read_tensors(key, prefix=prefix)  # the whole file once: the trust check reads every tensor
        if found is not None:
            peak = found[1].get("peak_gb", "")
            costs.note_cached("prepare", seconds=float(found[1]["seconds"]), peak_gb=float(peak) if peak else None,
                              read_seconds=time.perf_counter() - start)
            rank_zero_info(f"{title}: loaded from the cache {path}")
            sources[task] = path
            continue
        rank_zero_info(f"{title}: {len(indices)} train examples (seed {seed}) in {len(batches)} batches of "
                       f"{batch_size}")
        loop = module(task, functools.partial(statistics_loader, dataset, batches, collate, datamodule.num_workers))
        with warnings.catch_warnings(), costs.measured() as cost:
            # Lightning cannot check a custom batch sampler's drop_last (ours drops nothing), and
            # asks whether returning None was meant (it was: the statistics stay in the module).
            warnings.filterwarnings("ignore", message=".*custom batch sampler.*")
            warnings.filterwarnings("ignore", message=".*predict returned None.*")
            trainer.predict(loop, return_predictions=False)
        tensors = result(loop)
        if loop.num_examples() != len(indices):  # fast_dev_run, limit_predict_batches: a smoke test, never cached
            rank_zero_warn(f"{title}: the predict loop saw {loop.num_examples()} of {len(indices)} examples; "
                           f"not caching them.")
            sources[task] = tensors
            continue
        if trainer.is_global_zero:  # the other ranks hold the same all-reduced statistics
            metadata = {"fields": json.dumps(fields, sort_keys=True), "indices": json.dumps(indices),
                        "seconds": repr(cost.seconds), "peak_gb": "" if cost.peak_gb is None else repr(cost.peak_gb)}
            cache.write_tensors(key, tensors, metadata, prefix=prefix)
            rank_zero_info(f"{title}: written to {path}")
        trainer.strategy.barrier("statistics written")
        sources[task] = path if path.is_file() else tensors
    return StoredStatistics(sources)


def _rows_fingerprint(dataset, indices: Sequence[int]) -> str:
    """A hash of the drawn rows' token ids, in drawn order: exactly what the statistics read."""
    digest = hashlib.sha256(f"rows={len(dataset)}|".encode())
    for row in dataset.select(indices)["input_ids"]:
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()

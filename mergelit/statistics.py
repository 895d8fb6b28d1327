"""Per-task statistics for the data-driven merges, computed by ``Trainer.predict``, and their cache.

Fisher Merging needs each fine-tuned model's diagonal Fisher information, RegMean the Gram
matrix of every Conv1D input. Both come from a few hundred **train** examples of the task, run
through that task's own fine-tuned body (and head, for Fisher) in eval mode:

- ``fisher_statistics(trainer, datamodule, pool, ...)`` -> ``{task: {body tensor name: F}}``
- ``gram_statistics(trainer, datamodule, pool, ...)``   -> ``{task: {Conv1D module name: G}}``

Each loads a task's statistics from the cache when everything they depend on is unchanged, and
otherwise runs ``trainer.predict`` over ``FisherStatistics`` / ``GramStatistics`` (one predict
call per task, with Lightning's progress bar) and writes the result to the cache.

Sampling: ``draw_examples`` permutes the train split with an explicit seed and keeps the first
``num_examples`` rows; consecutive groups of ``batch_size`` of them, in that drawn order, are the
batches (Fisher squares the gradient of a batch *sum*, so the grouping changes the result). The
drawn indices are stored beside the statistics (``read_statistics(path)[1]["indices"]``).
Under the data's ``hold_out_dev`` (a sweep that selects on the dev split) the rows of the dev
split are skipped in that same permuted order (``exclude``), so dev and statistics rows are
disjoint; without it (the default) the draw is exactly the plain one, numbers and cache unchanged.

Why the merge methods call these in ``prepare`` and not in ``setup`` (the design):
``trainer.predict`` cannot run inside a running ``trainer.test``, and ``setup`` runs inside it.
So the CLI's ``before_test`` hook calls ``method.prepare(trainer, datamodule)``, which runs the
predict loops on the *same* Trainer, then ``trainer.test`` merges in ``setup`` and scores, all in
one command. A private second Trainer inside ``setup`` would be unsound under DDP: it would launch
(or fail to launch) its own processes inside a running distributed job. With one Trainer, each
process runs the same hooks in the same order, so the predict calls line up across ranks.
Without ``prepare`` (a programmatic ``trainer.test(method)``), ``merge`` raises and names the call.

Gradients: Lightning predicts under ``torch.inference_mode`` (or ``no_grad`` with
``Trainer(inference_mode=False)``). ``FisherStatistics.predict_step`` leaves it locally
(``torch.inference_mode(False)`` + ``torch.enable_grad()``) and clones the batch, whose tensors
were made in inference mode and so cannot be saved for backward: it works under either setting,
without touching the Trainer that ``test`` uses next.

Several processes (DDP, next issue): each rank takes every ``world_size``-th batch (disjoint,
nothing repeated), sums its per-batch contributions, and ``on_predict_epoch_end`` all-reduces the
sums and the counts (``trainer.strategy.reduce(..., "sum")``, a no-op on one process) before
dividing, so every rank ends with the same statistics as one process would. Only rank 0 writes
the cache, then all ranks meet at a barrier. The cache folder must be shared by all ranks.

Cache: ``cache_dir/<kind>/<task>-<key>.safetensors``, key = hash of the model's tensors (body +
head), the drawn rows' token ids, the indices, seed, batch size, and for Grams the padding mode
and ``max_length``. Writes go to a temporary file renamed into place (atomic), with a checksum
of the tensors in the header; a file that fails to open, has another key or a wrong checksum is
not trusted (a warning, then the statistics are recomputed).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from mergelit.glue import GLUEDataModule
from mergelit.gpt2 import build_body, build_head, last_non_pad_index
from mergelit.pool import ModelPool
from mergelit.state_dict import atomic_save_safetensors, tensors_fingerprint

# Bump when what a statistics file holds changes, so that older files are not trusted.
_CACHE_FORMAT = 1

DEFAULT_CACHE_DIR = "lightning_logs/cache/statistics"

# Statistics kind (the cache sub-folder) -> how the log names it.
_TITLES = {"fisher": "Fisher statistics", "regmean": "RegMean Gram matrices"}


# ---- sampling -----------------------------------------------------------------------------
def draw_examples(num_rows: int, num_examples: int, seed: int, exclude: Sequence[int] = ()) -> list[int]:
    """The first ``num_examples`` of a seeded random permutation of ``range(num_rows)``, skipping ``exclude``.

    Asking for more rows than the split has gives every row (in shuffled order), as
    FusionBench's loop stops at the end of the data. ``exclude`` (the dev rows) leaves the
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
class FisherStatistics(L.LightningModule):
    """Diagonal Fisher information of one task's fine-tuned classifier, as a predict loop.

    Per batch: p = softmax(logits) (detached), S = Σ_batch Σ_class √p · log_softmax(logits),
    F += (∂S/∂θ)² for every body tensor; at the end F /= number of examples. No labels are used.
    ``fisher()`` returns F (float32, on the CPU) after ``trainer.predict(module)``.

    Args:
        body: the task's fine-tuned ``GPT2Model`` (its parameters get ``requires_grad``).
        head: the task's ``score`` weight, [num_labels, n_embd].
        pad_token_id: the head config's pad id (read-out at the last non-pad token).
        loader: ``loader(rank=, world_size=)`` gives that process's DataLoader (``statistics_loader``);
            called once the processes exist.
    """

    def __init__(self, body: nn.Module, head: Tensor, pad_token_id: int, loader: Callable[..., DataLoader]):
        super().__init__()
        self.body = body.requires_grad_(True)
        self.head = build_head(head)
        self.pad_token_id = pad_token_id
        self.loader = loader
        self.sums: dict[str, Tensor] = {}
        self.count: Tensor | None = None

    def predict_dataloader(self) -> DataLoader:
        return self.loader(rank=self.trainer.global_rank, world_size=self.trainer.world_size)

    def on_predict_start(self) -> None:
        # Created here (on the module's device, outside inference mode) and not lazily, so that
        # a rank's tensors exist for the all-reduce whatever it saw.
        with torch.inference_mode(False):
            self.sums = {name: torch.zeros_like(p) for name, p in self.body.named_parameters()}
            self.count = torch.zeros((), dtype=torch.float64, device=self.device)

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
            self.count += len(input_ids)

    def on_predict_epoch_end(self) -> None:
        with torch.inference_mode(False):
            reduce = functools.partial(self.trainer.strategy.reduce, reduce_op="sum")
            self.sums = {name: reduce(total) for name, total in self.sums.items()}
            self.count = reduce(self.count)

    def fisher(self) -> dict[str, Tensor]:
        """F = (Σ_batches (∂S/∂θ)²) / number of examples, per body tensor (CPU, float32)."""
        return {name: (total / self.count).float().cpu() for name, total in self.sums.items()}

    def num_examples(self) -> int:
        return int(self.count.item())


def conv1d_modules(body: nn.Module) -> dict[str, nn.Module]:
    """The body's Conv1D modules by name (per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)."""
    from transformers.pytorch_utils import Conv1D

    return {name: module for name, module in body.named_modules() if isinstance(module, Conv1D)}


class GramStatistics(L.LightningModule):
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
        super().__init__()
        self.body = body.requires_grad_(False)
        self.count_padding = count_padding
        self.loader = loader
        self.modules_by_name = conv1d_modules(self.body)
        if not self.modules_by_name:
            raise ValueError("The body has no Conv1D module: RegMean's statistics are defined for GPT-2 bodies.")
        for name, module in self.modules_by_name.items():
            module.register_forward_hook(self._accumulate(name))
        self._rows: Tensor | None = None  # the counted positions of the current batch (flattened mask)
        self.sums: dict[str, Tensor] = {}
        self.positions: Tensor | None = None
        self.count: Tensor | None = None

    def predict_dataloader(self) -> DataLoader:
        return self.loader(rank=self.trainer.global_rank, world_size=self.trainer.world_size)

    def on_predict_start(self) -> None:
        with torch.inference_mode(False):
            self.sums = {
                name: torch.zeros(m.weight.shape[0], m.weight.shape[0], dtype=torch.float64, device=self.device)
                for name, m in self.modules_by_name.items()  # Conv1D weight: [in, out]
            }
            self.positions = torch.zeros((), dtype=torch.float64, device=self.device)
            self.count = torch.zeros((), dtype=torch.float64, device=self.device)

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
            self.positions += attention_mask.numel() if self.count_padding else attention_mask.sum()
            self.count += len(attention_mask)

    def on_predict_epoch_end(self) -> None:
        with torch.inference_mode(False):
            reduce = functools.partial(self.trainer.strategy.reduce, reduce_op="sum")
            self.sums = {name: reduce(total) for name, total in self.sums.items()}
            self.positions = reduce(self.positions)
            self.count = reduce(self.count)

    def grams(self) -> dict[str, Tensor]:
        """G = XᵀX / T per Conv1D module name (CPU, float64)."""
        return {name: (total / self.positions).cpu() for name, total in self.sums.items()}

    def num_examples(self) -> int:
        return int(self.count.item())


# ---- cache --------------------------------------------------------------------------------
def _data_fingerprint(dataset, indices: Sequence[int]) -> str:
    # The token ids of the drawn rows, in drawn order: exactly what the statistics read.
    digest = hashlib.sha256(f"rows={len(dataset)}|".encode())
    for row in dataset.select(indices)["input_ids"]:
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()


def cache_key(fields: dict[str, Any]) -> str:
    """A short hash of ``fields`` (JSON, keys sorted): the name of one statistics file."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def write_statistics(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` + ``metadata`` (and a checksum) to ``path`` atomically (temporary file + rename)."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    metadata = {**metadata, "format": str(_CACHE_FORMAT), "checksum": tensors_fingerprint(tensors)}
    return atomic_save_safetensors(path, tensors, metadata)


def read_statistics(path: str | os.PathLike, key: str | None = None) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    """``(tensors, metadata)`` of a statistics file, or ``None`` if it is missing or not trusted.

    Not trusted (warned about): unreadable or truncated, another format, another ``key`` (when
    given), or tensors whose checksum differs from the one written with them.
    ``metadata["indices"]`` holds the drawn train rows as JSON.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # safetensors raises several types for a damaged file
        rank_zero_warn(f"Statistics file {path} is unreadable ({type(error).__name__}: {error}); recomputing it.")
        return None
    problem = None
    if metadata.get("format") != str(_CACHE_FORMAT):
        problem = f"format {metadata.get('format')!r}, expected {_CACHE_FORMAT}"
    elif key is not None and metadata.get("key") != key:
        problem = f"key {metadata.get('key')!r}, expected {key!r}"
    elif metadata.get("checksum") != tensors_fingerprint(tensors):
        problem = "its tensors do not match their checksum"
    if problem:
        rank_zero_warn(f"Statistics file {path} is not trusted ({problem}); recomputing it.")
        return None
    return tensors, metadata


# ---- orchestration ------------------------------------------------------------------------
def _collect(
    kind: str,
    trainer: L.Trainer,
    datamodule: GLUEDataModule,
    pool: ModelPool,
    num_examples: int,
    batch_size: int,
    seed: int,
    cache_dir: str | os.PathLike,
    collate: Callable,
    make_module: Callable[[str, Callable[..., DataLoader]], L.LightningModule],
    read_result: Callable[[L.LightningModule], dict[str, Tensor]],
    key_extra: dict[str, Any],
) -> dict[str, dict[str, Tensor]]:
    """One task after another: load from the cache, or run ``trainer.predict`` and write it."""
    title = _TITLES[kind]
    if not isinstance(datamodule, GLUEDataModule):
        raise TypeError(
            f"{title} need the GLUEDataModule (for the tasks' train splits), got {type(datamodule).__name__}; "
            f"pass `datamodule=GLUEDataModule(...)` (the CLI's `data:` group)."
        )
    missing = [task for task in pool.tasks if task not in datamodule.tasks]
    if missing:
        raise ValueError(f"The data module lacks the pool's task(s) {missing}; give it the pool's tasks.")
    datamodule.check(("train",))
    results: dict[str, dict[str, Tensor]] = {}
    for task in pool.tasks:
        dataset = datamodule.train_dataset(task)
        excluded = datamodule.statistics_excluded(task)  # the dev rows under data.hold_out_dev, else none
        indices = draw_examples(len(dataset), num_examples, seed, exclude=excluded)
        if len(indices) < num_examples:
            rank_zero_warn(
                f"{title} of {task}: asked for {num_examples} examples but its train split has "
                f"{len(dataset)} rows; using all of them."
            )
        batches = batches_of(indices, batch_size)
        if len(batches) < trainer.world_size:
            raise ValueError(
                f"{title} of {task}: {len(indices)} examples in batches of {batch_size} make {len(batches)} batch(es), "
                f"fewer than the {trainer.world_size} processes; each process needs one. "
                f"Lower batch_size or use fewer devices."
            )
        fields = {
            "format": _CACHE_FORMAT,
            "kind": kind,
            "task": task,
            "model": pool.fingerprint(task),
            "data": _data_fingerprint(dataset, indices),
            "num_examples": len(indices),
            "seed": seed,
            "batch_size": batch_size,
            **key_extra,
        }
        key = cache_key(fields)
        path = Path(cache_dir) / kind / f"{task}-{key}.safetensors"
        cached = read_statistics(path, key)
        if cached is not None:
            rank_zero_info(f"{title} of {task}: loaded from the cache {path}")
            results[task] = cached[0]
            continue
        rank_zero_info(
            f"{title} of {task}: {len(indices)} train examples (seed {seed}) in {len(batches)} batches of {batch_size}"
        )
        loader = functools.partial(statistics_loader, dataset, batches, collate, datamodule.num_workers)
        module = make_module(task, loader)
        with warnings.catch_warnings():
            # Lightning cannot check a custom batch sampler's drop_last (ours drops nothing), and
            # asks whether returning None was meant (it was: the statistics stay in the module).
            warnings.filterwarnings("ignore", message=".*custom batch sampler.*")
            warnings.filterwarnings("ignore", message=".*predict returned None.*")
            trainer.predict(module, return_predictions=False)
        results[task] = read_result(module)
        seen = module.num_examples()
        if seen != len(indices):
            # e.g. fast_dev_run or limit_predict_batches: usable for a smoke test, never cached.
            rank_zero_warn(f"{title} of {task}: the predict loop saw {seen} of {len(indices)} examples; not caching them.")
            continue
        if trainer.is_global_zero:
            metadata = {"key": key, "fields": json.dumps(fields, sort_keys=True), "indices": json.dumps(indices)}
            write_statistics(path, results[task], metadata)
            rank_zero_info(f"{title} of {task}: written to {path}")
        # The other ranks hold the same (all-reduced) statistics; they wait for the file all the same.
        trainer.strategy.barrier("statistics written")
    return results


def fisher_statistics(
    trainer: L.Trainer,
    datamodule: GLUEDataModule,
    pool: ModelPool,
    num_examples: int = 256,
    batch_size: int = 32,
    seed: int = 42,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
) -> dict[str, dict[str, Tensor]]:
    """Each task's diagonal Fisher (``{task: {body tensor name: F}}``), from the cache or ``trainer.predict``.

    Rows are padded per batch (the DataModule's setting): GPT-2's read-out at the last real
    token does not depend on the padding.
    """
    config = pool.body_config()

    def make_module(task: str, loader: Callable) -> FisherStatistics:
        body = build_body(config, pool.finetuned_body(task))
        return FisherStatistics(body, pool.head(task), pool.task_config(task).pad_token_id, loader)

    return _collect(
        "fisher", trainer, datamodule, pool, num_examples, batch_size, seed, cache_dir,
        collate=datamodule.collate, make_module=make_module, read_result=FisherStatistics.fisher, key_extra={},
    )


def gram_statistics(
    trainer: L.Trainer,
    datamodule: GLUEDataModule,
    pool: ModelPool,
    num_examples: int = 256,
    batch_size: int = 32,
    seed: int = 42,
    count_padding: bool = True,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
) -> dict[str, dict[str, Tensor]]:
    """Each task's Conv1D input Grams (``{task: {module name: G}}``), from the cache or ``trainer.predict``.

    ``count_padding``: rows padded to the data's ``max_length`` and every position counted
    (FusionBench); otherwise rows padded per batch and only real tokens counted.
    """
    config = pool.body_config()

    def make_module(task: str, loader: Callable) -> GramStatistics:
        return GramStatistics(build_body(config, pool.finetuned_body(task)), count_padding, loader)

    # Padding changes these statistics: pad to max_length when it is counted, whatever evaluation does.
    collate = functools.partial(datamodule.collate, pad_to_max_length=True) if count_padding else datamodule.collate
    extra = {"count_padding": count_padding, "max_length": datamodule.max_length if count_padding else None}
    return _collect(
        "regmean", trainer, datamodule, pool, num_examples, batch_size, seed, cache_dir,
        collate=collate, make_module=make_module, read_result=GramStatistics.grams, key_extra=extra,
    )

"""GLUE: the evaluation/statistics DataModule (the task table is ``mergelit.tasks``).

Tokenization is the spec's (plain GPT-2 BPE, a pair is ``tokenizer(a, b)``, pad 50256 on the right,
``longest_first`` truncation); batches are length-sorted and padded to their longest row unless
``pad_to_max_length`` (same predictions). See docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from mergelit.cache import Cache, content_key
from mergelit.errors import BadData, FileMissing, KeyMissing, MergelitError, check_choice, check_number
from mergelit.tasks import GLUE_TASKS, TASKS, ordered_tasks

# `datasets` (≈ 0.4 s) is imported in `raw`, so `--help` never pays for it. The `datasets.Dataset`
# annotations are never evaluated; not under `if TYPE_CHECKING:`, which jsonargparse executes.

_TOKENIZED_LAYOUT = 2  # bump when the tokenized layout changes (2: the row's ``idx`` is kept)
DEV_SOURCES = ("validation", "train")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
# Settings an export records from the tokenizer's last call: they do not change a row's token ids.
_CALL_SETTINGS = ("max_length", "stride", "truncation_side", "truncation_strategy", "model_max_length", "name_or_path",
                  "padding_side", "pad_to_multiple_of", "padding_strategy")
_fingerprints: weakref.WeakKeyDictionary[Any, tuple[Any, str]] = weakref.WeakKeyDictionary()


# ---- tokenizer ---------------------------------------------------------------------------------
def has_tokenizer_files(folder: str) -> bool:
    """Whether ``folder`` holds a GPT-2 tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``)."""
    return os.path.isfile(os.path.join(folder, "tokenizer.json")) or (
        os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt"))
    )


def load_tokenizer(path: str):
    """The GPT-2 tokenizer at ``path`` with the spec's padding: pad = eos (50256), on the right."""
    from transformers import GPT2Tokenizer
    if os.path.isdir(os.path.expanduser(path)) and not has_tokenizer_files(os.path.expanduser(path)):
        raise FileMissing(f"The tokenizer folder {path!r} holds no tokenizer files (tokenizer.json, or vocab.json + "
                          f"merges.txt); point data.tokenizer / pool.tokenizer at a folder that has them.")
    # GPT2Tokenizer also reads a folder of only vocab.json + merges.txt, where AutoTokenizer cannot
    # tell the class. The real `gpt2` tokenizer has no pad token; the spec pads with <|endoftext|>.
    tokenizer = GPT2Tokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids (vocabulary, merges, normalizer, pad), once per tokenizer and pad
    id; not the truncation/padding the backend keeps from its last call (same hash before and after use)."""
    known = _fingerprints.get(tokenizer)
    if known is not None and known[0] == tokenizer.pad_token_id:
        return known[1]
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode())
    digest.update(f"pad={tokenizer.pad_token_id}".encode())
    _fingerprints[tokenizer] = (tokenizer.pad_token_id, digest.hexdigest()[:16])
    return _fingerprints[tokenizer][1]


def tokenizer_files_digest(folder: str) -> Optional[str]:
    """A hash of a folder's tokenizer files without ``_CALL_SETTINGS`` (None if it has none): equal
    digests mean the same tokenizer, found without loading either (different ones prove nothing)."""
    if not os.path.isdir(folder) or not has_tokenizer_files(folder):
        return None
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as file:
            content = file.read()
        if name == "tokenizer_config.json":
            try:
                settings = json.loads(content)
            except ValueError:
                return None
            if not isinstance(settings, dict):
                return None
            kept = {k: v for k, v in settings.items() if k not in _CALL_SETTINGS}
            content = json.dumps(kept, sort_keys=True).encode()
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


# ---- rows --------------------------------------------------------------------------------------
def rows_hash(rows: Sequence[int]) -> str:
    """A short hash of a list of row numbers (the dev rows, recorded in reports and ``selection.json``)."""
    return hashlib.sha256(json.dumps(list(rows)).encode()).hexdigest()[:16]


def data_fingerprint(dataset: datasets.Dataset) -> str:
    """A hash of a raw split's content: its Arrow files' bytes (or, in memory, its rows) and features."""
    digest = hashlib.sha256(f"rows={len(dataset)}|{dataset.features}".encode())
    for entry in dataset.cache_files:
        with open(entry["filename"], "rb") as file:
            for chunk in iter(lambda: file.read(1 << 22), b""):
                digest.update(chunk)
    if not dataset.cache_files:
        digest.update(repr(dataset.to_dict()).encode())
    return digest.hexdigest()[:20]


def check_split(dataset: datasets.Dataset, task: str, split: str, path: str) -> None:
    """The one data check of every split a run reads (docs/data.md); errors name the first bad row."""
    where = f"Task {task!r} split {split!r} in {path!r}"
    if len(dataset) == 0:
        raise BadData(f"{where} is empty; nothing to score or to draw from.")
    info = GLUE_TASKS[task]
    columns = {}
    for field in info.text_fields:
        dtype = getattr(dataset.features[field], "dtype", type(dataset.features[field]).__name__)
        if dtype not in ("string", "large_string"):
            raise BadData(f"{where}: column {field!r} holds {dtype} values, not text; every {field} must be a string.")
        columns[field] = dataset[field]
        for row, value in enumerate(columns[field]):
            if not isinstance(value, str):
                raise BadData(f"{where}: column {field!r} row {row} holds {type(value).__name__} {value!r:.40}, not "
                              f"text; every {field} must be a string.")
    for row, texts in enumerate(zip(*columns.values())):
        if not any(text.strip() for text in texts):
            raise BadData(f"{where}: row {row} has no text ({' and '.join(repr(f) for f in columns)} empty); GPT-2 "
                          f"reads a prediction at the last token, so every row needs one. Remove the row.")
    for row, label in enumerate(dataset["label"]):
        bad = None
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            bad = f"{type(label).__name__} {label!r:.40}"
        elif isinstance(label, float) and (label != label or not label.is_integer()):
            bad = f"{label!r} (not a whole class number)"
        elif not 0 <= int(label) < info.num_labels:
            unlabelled = " (-1 marks GLUE's unlabelled test rows: score the validation split)"
            bad = f"{int(label)}" + (unlabelled if int(label) == -1 else "")
        if bad is not None:
            raise BadData(f"{where}: column 'label' row {row} is {bad}; {task} labels are the integers "
                          f"0..{info.num_labels - 1} ({', '.join(info.label_names)}).")


# ---- batching ----------------------------------------------------------------------------------
def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int, width: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``: the lists right-padded to ``width`` (default: the longest)."""
    width = width or max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, tokens in enumerate(sequences):
        input_ids[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        attention_mask[i, : len(tokens)] = 1
    return input_ids, attention_mask


class FixedBatches(Sampler[list[int]]):
    """Given batches of indices, as they are (a DataLoader's ``batch_sampler``)."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LengthSortedBatches(FixedBatches):
    """Batches of indices sorted by length (longest first), so padding per batch is small. Each rank takes
    every ``num_replicas``-th batch: nothing is repeated (``DistributedSampler``'s padding changes accuracy)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0,
                 max_tokens: int = 0, width: int | None = None):
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if max_tokens > 0:
            # Rows (longest first) while rows × padded width (``width`` if fixed) fit max_tokens; one at least.
            batches, start = [], 0
            while start < len(order):
                longest = width or lengths[order[start]]
                size = max(1, max_tokens // max(1, longest))
                batches.append(order[start : start + size])
                start += size
        else:
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        super().__init__(batches[rank::num_replicas])


class GLUEDataModule(L.LightningDataModule):
    """GLUE validation sets (one test loader per task, in task order) and train splits.

    Args:
        tasks: GLUE tasks to load; linked from ``pool.finetuned`` by the CLI.
        tokenizer: tokenizer path or hub id; linked from ``pool.tokenizer`` (or ``pool.pretrained``).
        path: hub dataset name (``glue``) or a folder of one ``save_to_disk`` DatasetDict per task (``cola/``, ...).
        batch_size: evaluation rows per batch, unless ``max_tokens`` is set.
        num_workers: DataLoader worker processes.
        max_length: truncation length in tokens (``longest_first``).
        pad_to_max_length: pad every batch to ``max_length`` (FusionBench's layout), not to its longest row.
            Predictions are the same either way.
        cache_dir: where tokenized splits are cached, keyed by the tokenizer, ``max_length`` and the raw data.
        extra_eval_splits: also score the extra evaluation splits the data has (MNLI ``validation_mismatched``)
            as separate entries (``mnli_mismatched``) outside the average.
        dev_source: where the labeled dev split (``mergelit sweep --sweep.select_on dev|agreement``) comes from:
            ``validation`` (default; out of sample) or ``train`` (in-sample for the experts). See docs/data.md.
        dev_fraction: the dev share of each evaluation split under ``dev_source: validation`` (0.1, as MergeLM).
        dev_size: dev rows per task under ``dev_source: train`` (at most half the split).
        dev_seed: seed of the dev draw.
        hold_out_dev: hold the dev rows out of everything else that reads their split (scoring, statistics,
            adaptation). Off by default; a sweep that selects turns it on.
        max_tokens: if > 0, evaluation batches are filled up to this many padded tokens instead of
            ``batch_size`` rows (same predictions). 0 (default): ``batch_size`` rows per batch.
    """

    def __init__(self, tasks: list[str] = list(TASKS), tokenizer: str = "gpt2", path: str = "glue",
                 batch_size: int = 32, num_workers: int = 0, max_length: int = 512, pad_to_max_length: bool = False,
                 cache_dir: str = "lightning_logs/cache/tokenized", extra_eval_splits: bool = True,
                 dev_source: Literal["validation", "train"] = "validation", dev_fraction: float = 0.1,
                 dev_size: int = 500, dev_seed: int = 0, hold_out_dev: bool = False, max_tokens: int = 0):
        super().__init__()
        self.tasks = ordered_tasks(tasks)
        check_choice(dev_source, "dev_source", DEV_SOURCES)
        check_number(dev_fraction, "dev_fraction", 0.0, 1.0, low_open=True, high_open=True)
        if dev_size < 0:
            raise ValueError(f"dev_size must be >= 0 (0: no dev split), got {dev_size}.")
        if hold_out_dev and dev_source == "train" and dev_size == 0:
            raise ValueError("hold_out_dev needs a dev split: set dev_size > 0, or hold_out_dev false.")
        if batch_size < 1:
            raise MergelitError(f"batch_size must be >= 1, got {batch_size}.")
        if max_length < 1:
            raise MergelitError(f"max_length must be >= 1, got {max_length}.")
        if max_tokens < 0:
            raise MergelitError(f"max_tokens must be >= 0 (0: batch by batch_size), got {max_tokens}.")
        self.dev_source = dev_source
        self.dev_fraction = dev_fraction
        self.dev_size = dev_size
        self.dev_seed = dev_seed
        self.hold_out_dev = hold_out_dev
        self.max_tokens = max_tokens
        self.tokenizer_path = tokenizer
        self.path = path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length
        self.cache_dir = cache_dir
        self.extra_eval_splits = extra_eval_splits
        self._tokenizer = None
        self._raw: dict[str, datasets.DatasetDict] = {}
        self._tokenized: dict[tuple[str, str], datasets.Dataset] = {}
        self._checked: set[tuple[str, str]] = set()  # (task, split) that passed check_split
        self._dev: dict[str, datasets.Dataset] = {}

    # ---- raw data -------------------------------------------------------------------------
    def check(self, splits: Sequence[str] = ("eval",)) -> None:
        """``check_split`` every split of the roles ``splits`` (``eval``, ``train``), before any tokenizing."""
        for task in self.tasks:
            info = GLUE_TASKS[task]
            for role in splits:
                names = [{"eval": info.eval_split, "train": info.train_split}[role]]
                if role == "eval":  # the extra evaluation splits (MNLI mismatched) are scored too
                    names += [split for t, split in self.extra_test_splits() if t == task]
                if self.hold_out_dev:  # selection reads the dev rows
                    names.append(self.dev_split(task))
                for split in dict.fromkeys(names):
                    if (task, split) not in self._checked:
                        check_split(self.raw(task, split), task, split, self.path)
                        self._checked.add((task, split))

    def raw(self, task: str, split: str) -> datasets.Dataset:
        """One raw split, from the local folder or the hub, with a clear error if missing."""
        import datasets
        if task not in self._raw:
            if os.path.isdir(self.path):
                folder = Path(self.path) / task
                if not folder.is_dir():
                    raise FileMissing(f"Data folder {self.path!r} has no {task!r} task folder ({folder}); write one "
                                      f"with DatasetDict.save_to_disk, or use mergelit.synthetic to make one.")
                try:
                    loaded = datasets.load_from_disk(str(folder))
                except Exception as error:  # datasets' own errors for a damaged folder have no common base
                    raise BadData(f"Task {task!r} data folder {str(folder)!r} cannot be read ({type(error).__name__}: "
                                  f"{error}): a damaged folder, or an empty split (datasets cannot reload those)? "
                                  f"Rewrite it with DatasetDict.save_to_disk.") from None
                if not isinstance(loaded, datasets.DatasetDict):
                    raise MergelitError(f"{folder} holds a single Dataset; save a DatasetDict with the GLUE splits.")
            else:
                loaded = datasets.load_dataset(self.path, task)
            self._raw[task] = loaded
        splits = self._raw[task]
        if split not in splits:
            raise KeyMissing(f"Task {task!r} in {self.path!r} has no {split!r} split (it has {', '.join(splits)}).")
        dataset = splits[split]
        missing = [c for c in (*GLUE_TASKS[task].text_fields, "label") if c not in dataset.column_names]
        if missing:
            raise KeyMissing(f"Task {task!r} split {split!r} in {self.path!r} lacks column(s) {missing}.")
        return dataset

    # ---- tokenization ---------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def tokenized(self, task: str, split: str) -> datasets.Dataset:
        """``split`` of ``task`` as ``input_ids`` + ``label`` (+ ``length``, ``idx``), cached in ``cache_dir``."""
        if (task, split) not in self._tokenized:
            self._tokenized[(task, split)] = self._tokenize(task, split)
        return self._tokenized[(task, split)]

    def _tokenize(self, task: str, split: str) -> datasets.Dataset:
        """Tokenize one split, or read ``cache_dir/<task>-<split>-<key>.arrow`` (written by ``datasets``), trusted
        if it has the raw row count (a truncated Arrow stream reads as fewer rows, no error)."""
        raw = self.raw(task, split)
        fields = GLUE_TASKS[task].text_fields
        tokenizer = self.tokenizer
        key = content_key({
            "kind": "tokenized", "layout": _TOKENIZED_LAYOUT, "task": task, "split": split,
            "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": self.max_length, "data": data_fingerprint(raw),
        })

        def tokenize(batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
            # Pairs: tokenizer(a, b) concatenates the two token lists, no separator. The row's id
            # (GLUE's `idx`, else its row number) travels to per-example predictions.
            ids = tokenizer(*[batch[f] for f in fields], truncation=True, max_length=self.max_length)["input_ids"]
            return {"input_ids": ids, "length": [len(x) for x in ids], "idx": list(batch.get("idx", rows))}

        cache = path = None
        if self.cache_dir:
            cache = Cache(Path(self.cache_dir).parent, Path(self.cache_dir).name, "Tokenized data")
            path = cache.path(key, ".arrow", prefix=f"{task}-{split}-")
            path.parent.mkdir(parents=True, exist_ok=True)

        def tokenize_split() -> datasets.Dataset:
            return raw.map(
                tokenize, batched=True, with_indices=True,
                remove_columns=[c for c in raw.column_names if c != "label"],
                cache_file_name=None if path is None else str(path),
                new_fingerprint=key, desc=f"Tokenizing {task}/{split}",
            )

        if path is not None and path.exists():
            try:
                tokenized = tokenize_split()
                rows = len(tokenized["length"])
                problem = None if rows == len(raw) else f"damaged: {rows} rows for {len(raw)} raw rows"
            except Exception as error:  # pyarrow's errors for a damaged file share no narrower base
                problem = f"damaged: {type(error).__name__}: {error}"
            if problem is None:
                return tokenized
            cache.distrust(path, problem)
            path.unlink()
        return tokenize_split()

    def eval_dataset(self, task: str) -> datasets.Dataset:
        return self.tokenized(task, GLUE_TASKS[task].eval_split)

    def train_dataset(self, task: str) -> datasets.Dataset:
        return self.tokenized(task, GLUE_TASKS[task].train_split)

    # ---- the dev split ----------------------------------------------------------------------
    def dev_split(self, task: str) -> str:
        """The split ``task``'s dev rows come from."""
        info = GLUE_TASKS[task]
        return info.eval_split if self.dev_source == "validation" else info.train_split

    def dev_indices(self, task: str) -> list[int]:
        """The sorted row numbers of ``task``'s dev rows in ``dev_split(task)`` (docs/data.md, "The dev split")."""
        n = len(self.raw(task, self.dev_split(task)))
        if self.dev_source == "validation":
            size = min(max(1, int(n * self.dev_fraction)), n - 1)
        else:
            size = min(self.dev_size, n // 2)
        generator = torch.Generator().manual_seed(self.dev_seed)
        return sorted(torch.randperm(n, generator=generator)[:size].tolist())

    def held_out_rows(self, task: str, split: str) -> list[int]:
        """Rows of ``task``'s ``split`` that only selection may read: the dev rows under ``hold_out_dev``."""
        if self.hold_out_dev and split == self.dev_split(task):
            return self.dev_indices(task)
        return []

    def statistics_excluded(self, task: str) -> list[int]:
        """Train rows that statistics must not draw: ``held_out_rows`` of the train split."""
        return self.held_out_rows(task, GLUE_TASKS[task].train_split)

    def evaluation_record(self) -> dict[str, Any] | None:
        """The report's ``protocol.evaluation`` when dev rows are held out of scoring, else None."""
        held = {task: self.held_out_rows(task, GLUE_TASKS[task].eval_split) for task in self.tasks}
        if not any(held.values()):
            return None
        tasks = {}
        for task, rows in held.items():
            total = len(self.raw(task, GLUE_TASKS[task].eval_split))
            tasks[task] = {"split": GLUE_TASKS[task].eval_split, "rows": total, "held_out": len(rows),
                           "scored": total - len(rows), "held_out_sha256": rows_hash(rows)}
        return {"scored": "the rows of each evaluation split that are not dev rows", "dev_source": self.dev_source,
                "dev_fraction": self.dev_fraction, "dev_seed": self.dev_seed, "tasks": tasks}

    def dev_dataset(self, task: str) -> datasets.Dataset:
        """The dev rows of ``task``, tokenized, in ``dev_indices`` order."""
        if task not in self._dev:  # a sweep scores the same dev rows at every point: select them once
            indices = self.dev_indices(task)
            if not indices:
                split = self.dev_split(task)
                hint = "; set data.dev_size > 0." if self.dev_source == "train" and not self.dev_size else "."
                raise BadData(f"Task {task!r} split {split!r} in {self.path!r} gives no dev rows "
                              f"({len(self.raw(task, split))} rows, dev_source {self.dev_source}, dev_size "
                              f"{self.dev_size}): a dev split needs a split of at least 2 rows{hint}")
            self._dev[task] = self.tokenized(task, self.dev_split(task)).select(indices)
        return self._dev[task]

    def dev_dataloader(self, task: str) -> DataLoader:
        """The dev rows of ``task`` in length-sorted batches, all of them on every rank."""
        dataset = self.dev_dataset(task)
        sampler = LengthSortedBatches(dataset["length"], self.batch_size)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers)

    # ---- batching -------------------------------------------------------------------------
    def collate(self, rows: list[dict[str, Any]], pad_to_max_length: bool | None = None) -> dict[str, torch.Tensor]:
        """Right-pad ``input_ids``; ``pad_to_max_length`` overrides the DataModule's (RegMean's counted padding)."""
        if pad_to_max_length is None:
            pad_to_max_length = self.pad_to_max_length
        width = self.max_length if pad_to_max_length else None
        input_ids, attention_mask = pad_right([r["input_ids"] for r in rows], self.pad_token_id, width)
        labels = torch.as_tensor([r["label"] for r in rows], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if all("idx" in r for r in rows):
            batch["idx"] = torch.as_tensor([r["idx"] for r in rows], dtype=torch.long)
        return batch

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)

    def eval_dataloader(self, task: str, split: str | None = None) -> DataLoader:
        """``split`` (default: the evaluation split) of ``task`` without its ``held_out_rows``, in
        length-sorted batches, this process's share of them."""
        split = split or GLUE_TASKS[task].eval_split
        dataset = self.tokenized(task, split)
        held_out = set(self.held_out_rows(task, split))
        if held_out:
            dataset = dataset.select([i for i in range(len(self.raw(task, split))) if i not in held_out])
        num_replicas, rank = self._world()
        width = self.max_length if self.pad_to_max_length else None
        sampler = LengthSortedBatches(dataset["length"], self.batch_size, num_replicas, rank, self.max_tokens, width)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers)

    # ---- Lightning hooks ------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.check(("eval",))  # every task and split before tokenizing anything, then fill the cache
        for task, split in self.test_splits():
            self.tokenized(task, split)

    def setup(self, stage: str | None = None) -> None:
        self.check(("eval",))

    def extra_test_splits(self) -> list[tuple[str, str]]:
        """``(task, split)`` of the extra evaluation splits the data has, when ``extra_eval_splits``."""
        if not self.extra_eval_splits:
            return []
        found = []
        for task in self.tasks:
            for split in GLUE_TASKS[task].extra_eval_splits:
                try:
                    self.raw(task, split)
                except KeyError:  # the data has no such split (or lacks a column): scored without it
                    continue
                found.append((task, split))
        return found

    def test_splits(self) -> list[tuple[str, str]]:
        """``(task, split)`` of every test loader: dataloader_idx i < len(tasks) is tasks[i]'s, then the extras."""
        return [(task, GLUE_TASKS[task].eval_split) for task in self.tasks] + self.extra_test_splits()

    def test_dataloader(self) -> list[DataLoader]:
        return [self.eval_dataloader(task, split) for task, split in self.test_splits()]

"""GLUE: the evaluation/statistics DataModule (the task table is ``mergelit.tasks``).

Tokenization follows the spec exactly (what "the same experiment" means): GPT-2 BPE,
no template, prompt, separator, BOS or EOS; a pair is ``tokenizer(a, b)`` (the two
token lists concatenated); pad = ``<|endoftext|>`` (50256) on the right; truncation
``longest_first`` at ``max_length`` (512).

FusionBench pads every example to 512. With right padding and an attention mask GPT-2's
outputs at the real tokens do not depend on the padding, so by default batches are padded
to their own longest row and built from length-sorted examples (same predictions, far less
compute); ``pad_to_max_length: true`` gives the exact 512 layout.
"""

from __future__ import annotations

import hashlib
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

# `datasets` (with pandas and pyarrow, ≈ 0.4 s) is imported in `raw`, where data is read, not here:
# `mergelit test --help` never reads data. The `datasets.Dataset` annotations are never evaluated
# (postponed annotations); not under `if TYPE_CHECKING:`, which jsonargparse executes when it
# introspects this module's classes.

# Bump when the tokenized layout changes, so that old cache files are not found.
_TOKENIZED_LAYOUT = 2  # 2: the row's ``idx`` is kept


def has_tokenizer_files(folder: str) -> bool:
    """Whether ``folder`` holds a GPT-2 tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``)."""
    return os.path.isfile(os.path.join(folder, "tokenizer.json")) or (
        os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt"))
    )


DEV_SOURCES = ("validation", "train")
"""Where the dev split comes from (``data.dev_source``)."""


def rows_hash(rows: Sequence[int]) -> str:
    """A short hash of a list of row numbers (the dev rows, recorded in reports and ``selection.json``)."""
    import json

    return hashlib.sha256(json.dumps(list(rows)).encode()).hexdigest()[:16]


def load_tokenizer(path: str):
    """The GPT-2 tokenizer at ``path`` with the spec's padding: pad = eos (50256), on the right."""
    from transformers import GPT2Tokenizer

    if os.path.isdir(os.path.expanduser(path)) and not has_tokenizer_files(os.path.expanduser(path)):
        raise FileMissing(
            f"The tokenizer folder {path!r} holds no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
            f"point data.tokenizer / pool.tokenizer at a folder that has them."
        )
    # GPT2Tokenizer (tokenizers-backed in transformers 5) also reads a folder holding only
    # vocab.json + merges.txt, where AutoTokenizer cannot tell the tokenizer class.
    tokenizer = GPT2Tokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # The real `gpt2` tokenizer has no pad token; the spec pads with <|endoftext|>.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

_fingerprints: "weakref.WeakKeyDictionary[Any, tuple[Any, str]]" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: vocabulary, merges, normalizer, pad.

    Not the truncation and padding settings the backend keeps from its last call (``tokenizer(...,
    truncation=True)`` writes them): the same tokenizer must hash the same before and after use.
    Computed once per tokenizer object and pad id (serialising the vocabulary takes about a second)."""
    import json

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


# Settings a tokenizer export records from its last call, which do not change token ids of a row.
_CALL_SETTINGS = ("max_length", "stride", "truncation_side", "truncation_strategy", "model_max_length", "name_or_path",
                  "padding_side", "pad_to_multiple_of", "padding_strategy")


def tokenizer_files_digest(folder: str) -> Optional[str]:
    """A hash of a folder's tokenizer files (None when it is not a folder with them), without the
    per-call settings an export records in ``tokenizer_config.json``: two folders with the same
    digest hold the same tokenizer, found without loading either (different digests prove nothing)."""
    import json

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
            content = json.dumps({k: v for k, v in settings.items() if k not in _CALL_SETTINGS}, sort_keys=True).encode()
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def data_fingerprint(dataset: datasets.Dataset) -> str:
    """A hash of a raw split's content: its Arrow files' bytes (or, in memory, its rows) and features."""
    digest = hashlib.sha256(f"rows={len(dataset)}|{dataset.features}".encode())
    files = [entry["filename"] for entry in dataset.cache_files]
    if files:
        for name in files:
            with open(name, "rb") as file:
                for chunk in iter(lambda: file.read(1 << 22), b""):
                    digest.update(chunk)
    else:
        digest.update(repr(dataset.to_dict()).encode())
    return digest.hexdigest()[:20]


def check_split(dataset: datasets.Dataset, task: str, split: str, path: str) -> None:
    """The one data check, for every split a run reads, before the run: the split is not empty, every
    text column holds text (no ``None``, bytes or numbers; not every segment of a row empty), and
    every label is an integer class of the task (no NaN, fraction, string or GLUE's ``-1`` of
    unlabelled test rows). Errors name the task, the split, the column and the first bad row."""
    if len(dataset) == 0:
        raise BadData(f"Task {task!r} split {split!r} in {path!r} is empty; nothing to score or to draw from.")
    info = GLUE_TASKS[task]
    where = f"Task {task!r} split {split!r} in {path!r}"
    columns = {}
    for field in info.text_fields:
        dtype = getattr(dataset.features[field], "dtype", type(dataset.features[field]).__name__)
        if dtype not in ("string", "large_string"):
            raise BadData(f"{where}: column {field!r} holds {dtype} values, not text; every {field} must be a string.")
        values = dataset[field]
        for row, value in enumerate(values):
            if not isinstance(value, str):
                raise BadData(
                    f"{where}: column {field!r} row {row} holds {type(value).__name__} {value!r:.40}, not text; "
                    f"every {field} must be a string."
                )
        columns[field] = values
    for row, texts in enumerate(zip(*columns.values())):
        if not any(text.strip() for text in texts):
            raise BadData(
                f"{where}: row {row} has no text ({' and '.join(repr(f) for f in columns)} empty); "
                f"GPT-2 reads a prediction at the last token, so every row needs one. Remove the row."
            )
    num_labels = info.num_labels
    for row, label in enumerate(dataset["label"]):
        bad = None
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            bad = f"{type(label).__name__} {label!r:.40}"
        elif isinstance(label, float) and (label != label or not label.is_integer()):
            bad = f"{label!r} (not a whole class number)"
        elif not 0 <= int(label) < num_labels:
            bad = f"{int(label)}" + (" (-1 marks GLUE's unlabelled test rows: score the validation split)" if int(label) == -1 else "")
        if bad is not None:
            raise BadData(
                f"{where}: column 'label' row {row} is {bad}; {task} labels are the integers 0..{num_labels - 1} "
                f"({', '.join(info.label_names)})."
            )


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``: the token lists right-padded with ``pad_token_id`` to ``width``
    (default: the longest), the mask 1 on real tokens."""
    width = width or max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, tokens in enumerate(sequences):
        input_ids[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        attention_mask[i, : len(tokens)] = 1
    return input_ids, attention_mask


class LengthSortedBatches(Sampler[list[int]]):
    """Batches of indices sorted by length (longest first), so padding per batch is small.

    Under several processes each rank takes every ``num_replicas``-th batch: each example is
    scored by exactly one process and nothing is repeated (unlike ``DistributedSampler``,
    which pads the last shard with duplicates and so changes the accuracy).
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0,
        max_tokens: int = 0, width: int | None = None,
    ):
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if max_tokens > 0:
            # Token budget: each batch takes rows (longest first) while rows × padded width stays
            # within max_tokens (one row at least); ``width`` fixes the padded width (pad to max).
            batches, start = [], 0
            while start < len(order):
                longest = width or lengths[order[start]]
                size = max(1, max_tokens // max(1, longest))
                batches.append(order[start : start + size])
                start += size
        else:
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.batches = batches[rank::num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class GLUEDataModule(L.LightningDataModule):
    """GLUE validation sets (one test loader per task, in task order) and train splits.

    Args:
        tasks: GLUE tasks to load; linked from ``pool.finetuned`` by the CLI.
        tokenizer: tokenizer path or hub id; linked from ``pool.tokenizer`` (or ``pool.pretrained``).
        path: hub dataset name (``glue``) or a local folder holding one ``save_to_disk``
            DatasetDict per task, named by task (``cola/``, ``mnli/``, ...).
        batch_size: evaluation batch size (rows per batch), unless ``max_tokens`` is set.
        max_tokens: if > 0, evaluation batches are filled up to this many (padded) tokens instead
            of ``batch_size`` rows: short rows go in large batches, long rows in small ones (same
            predictions). 0 (default): ``batch_size`` rows per batch.
        num_workers: DataLoader worker processes.
        max_length: truncation length in tokens (``longest_first``).
        pad_to_max_length: pad every batch to ``max_length`` (FusionBench's exact layout)
            instead of to the batch's longest row. Predictions are the same either way.
        cache_dir: where tokenized splits are cached. The key includes the tokenizer, the
            max length and the raw data's fingerprint.
        extra_eval_splits: also score the extra evaluation splits the data has (MNLI
            ``validation_mismatched``, with the MNLI head), as separate report entries
            (``mnli_mismatched``) outside the 7-task average.
        dev_source: where the labeled **dev split** (for choosing hyperparameters without the
            reported labels: ``mergelit sweep --sweep.select_on dev|agreement``) comes from.
            ``validation`` (default): a seeded ``dev_fraction`` of each task's evaluation split,
            held out of scoring under ``hold_out_dev``, so selection is out of sample for the
            experts and the reported numbers are on the remaining rows. ``train``: ``dev_size``
            rows of the train split, the data the experts were fine-tuned on: in-sample for them.
        dev_fraction: the fraction of each evaluation split that is the dev split under
            ``dev_source: validation`` (0.1, as MergeLM's protocol): ``int(n * dev_fraction)``
            rows, at least one, at most ``n - 1``.
        dev_size: rows per task of the dev split under ``dev_source: train``: ``min(dev_size,
            n // 2)`` of the ``n`` train rows, so that at least half is left for statistics.
        dev_seed: seed of the dev draw: the dev rows are the first rows of ``torch.randperm(n)``
            under this seed (``dev_indices``, recorded in ``selection.json``).
        hold_out_dev: hold the dev rows out of everything else that reads rows of their split
            (``held_out_rows``): under ``dev_source: validation`` scoring (the test loaders) and
            AdaMerging's validation inputs; under ``dev_source: train`` the statistics (Fisher,
            RegMean) and train-split adaptation. Off by default: every row is used exactly as
            before (same rows, same numbers, same cache). A sweep with ``select_on`` other than
            ``none`` turns it on (as ``--data.hold_out_dev true``, so each point's report equals
            a ``mergelit test`` run with that flag).
    """

    def __init__(
        self,
        tasks: list[str] = list(TASKS),
        tokenizer: str = "gpt2",
        path: str = "glue",
        batch_size: int = 32,
        num_workers: int = 0,
        max_length: int = 512,
        pad_to_max_length: bool = False,
        cache_dir: str = "lightning_logs/cache/tokenized",
        extra_eval_splits: bool = True,
        dev_source: Literal["validation", "train"] = "validation",
        dev_fraction: float = 0.1,
        dev_size: int = 500,
        dev_seed: int = 0,
        hold_out_dev: bool = False,
        max_tokens: int = 0,
    ):
        super().__init__()
        self.tasks = ordered_tasks(tasks)
        check_choice(dev_source, "dev_source", DEV_SOURCES)
        check_number(dev_fraction, "dev_fraction", 0.0, 1.0, low_open=True, high_open=True)
        if dev_size < 0:
            raise ValueError(f"dev_size must be >= 0 (0: no dev split), got {dev_size}.")
        if hold_out_dev and dev_source == "train" and dev_size == 0:
            raise ValueError("hold_out_dev needs a dev split: set dev_size > 0, or hold_out_dev false.")
        self.dev_source = dev_source
        self.dev_fraction = dev_fraction
        self.dev_size = dev_size
        self.dev_seed = dev_seed
        self.hold_out_dev = hold_out_dev
        if batch_size < 1:
            raise MergelitError(f"batch_size must be >= 1, got {batch_size}.")
        if max_length < 1:
            raise MergelitError(f"max_length must be >= 1, got {max_length}.")
        if max_tokens < 0:
            raise MergelitError(f"max_tokens must be >= 0 (0: batch by batch_size), got {max_tokens}.")
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
    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.path)

    def check(self, splits: Sequence[str] = ("eval",)) -> None:
        """Fail fast, before any tokenizing, if a task folder or a split is missing.

        ``splits`` names roles: ``eval`` (validation / validation_matched) and ``train``.
        """
        for task in self.tasks:
            for role in splits:
                names = [self._split_name(task, role)]
                if role == "eval":  # the extra evaluation splits (MNLI mismatched) are scored too
                    names += [split for t, split in self.extra_test_splits() if t == task]
                if self.hold_out_dev:  # selection reads the dev rows
                    names.append(self.dev_split(task))
                for split in dict.fromkeys(names):
                    if (task, split) not in self._checked:
                        check_split(self.raw(task, split), task, split, self.path)
                        self._checked.add((task, split))

    def _split_name(self, task: str, role: str) -> str:
        info = GLUE_TASKS[task]
        return {"eval": info.eval_split, "train": info.train_split}[role]

    def raw(self, task: str, split: str) -> datasets.Dataset:
        """One raw split, from the local folder or the hub, with a clear error if missing."""
        import datasets  # here, not at module import: `mergelit test --help` never reads data

        if task not in self._raw:
            if self.is_local:
                folder = Path(self.path) / task
                if not folder.is_dir():
                    raise FileMissing(
                        f"Data folder {self.path!r} has no {task!r} task folder ({folder}); write one with "
                        f"DatasetDict.save_to_disk, or use mergelit.synthetic to make one."
                    )
                try:
                    loaded = datasets.load_from_disk(str(folder))
                except Exception as error:  # datasets' own errors for a damaged folder have no common base
                    raise BadData(
                        f"Task {task!r} data folder {str(folder)!r} cannot be read ({type(error).__name__}: {error}): "
                        f"a damaged folder, or an empty split (datasets cannot reload those)? Rewrite it with "
                        f"DatasetDict.save_to_disk."
                    ) from None
                if not isinstance(loaded, datasets.DatasetDict):
                    raise MergelitError(f"{folder} holds a single Dataset; save a DatasetDict with the GLUE splits.")
            else:
                loaded = datasets.load_dataset(self.path, task)
            self._raw[task] = loaded
        splits = self._raw[task]
        if split not in splits:
            raise KeyMissing(
                f"Task {task!r} in {self.path!r} has no {split!r} split (it has {', '.join(splits)})."
            )
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
        """``split`` of ``task`` as ``input_ids`` + ``label`` (+ ``length``, ``idx``), kept in the
        tokenized-data cache (``cache_dir``)."""
        if (task, split) not in self._tokenized:
            self._tokenized[(task, split)] = self._tokenize(task, split)
        return self._tokenized[(task, split)]

    def _token_cache(self) -> Cache | None:
        """The tokenized-data cache: ``cache_dir`` is its folder (files ``<task>-<split>-<key>.arrow``)."""
        if not self.cache_dir:
            return None
        folder = Path(self.cache_dir)
        return Cache(folder.parent, folder.name, "Tokenized data")

    def _tokenize(self, task: str, split: str) -> datasets.Dataset:
        """Tokenize one split, or read it from the cache. The key is the content of everything that
        decides the token ids; ``datasets`` writes the Arrow file (atomically) and reads it back, and
        the trust check is its row count (a truncated Arrow stream reads as fewer rows, no error)."""
        raw = self.raw(task, split)
        fields = GLUE_TASKS[task].text_fields
        tokenizer = self.tokenizer
        key = content_key({
            "kind": "tokenized", "layout": _TOKENIZED_LAYOUT, "task": task, "split": split,
            "tokenizer": tokenizer_fingerprint(tokenizer), "max_length": self.max_length, "data": data_fingerprint(raw),
        })

        def tokenize(batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
            texts = [batch[f] for f in fields]
            # Pairs: tokenizer(a, b) concatenates the two token lists, no separator.
            encoded = tokenizer(*texts, truncation=True, max_length=self.max_length)
            ids = encoded["input_ids"]
            # The row's id (GLUE's `idx`, else its row number) travels to per-example predictions.
            return {"input_ids": ids, "length": [len(x) for x in ids], "idx": list(batch.get("idx", rows))}

        cache = self._token_cache()
        path = None
        if cache is not None:
            path = cache.path(key, ".arrow", prefix=f"{task}-{split}-")
            path.parent.mkdir(parents=True, exist_ok=True)

        def tokenize_split() -> datasets.Dataset:
            return raw.map(
                tokenize,
                batched=True,
                with_indices=True,
                remove_columns=[c for c in raw.column_names if c != "label"],
                cache_file_name=None if path is None else str(path),
                new_fingerprint=key,
                desc=f"Tokenizing {task}/{split}",
            )

        if path is None or not path.exists():
            return tokenize_split()
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
        """The split ``task``'s dev rows come from: its evaluation split, or its train split."""
        info = GLUE_TASKS[task]
        return info.eval_split if self.dev_source == "validation" else info.train_split

    def dev_indices(self, task: str) -> list[int]:
        """The row numbers of ``task``'s dev rows in ``dev_split(task)``, sorted: the first rows of a
        ``dev_seed`` permutation of its ``n`` rows, ``int(n * dev_fraction)`` of them (at least one,
        at most ``n - 1``) from validation, ``min(dev_size, n // 2)`` from train."""
        n = len(self.raw(task, self.dev_split(task)))
        if self.dev_source == "validation":
            size = min(max(1, int(n * self.dev_fraction)), n - 1)
        else:
            size = min(self.dev_size, n // 2)
        generator = torch.Generator().manual_seed(self.dev_seed)
        return sorted(torch.randperm(n, generator=generator)[:size].tolist())

    def held_out_rows(self, task: str, split: str) -> list[int]:
        """Rows of ``task``'s ``split`` that nothing but selection may read (sorted row numbers): the
        dev rows under ``hold_out_dev`` when ``split`` is the dev split, else none. Scoring
        (``eval_dataloader``), statistics and adaptation skip them."""
        if self.hold_out_dev and split == self.dev_split(task):
            return self.dev_indices(task)
        return []

    def statistics_excluded(self, task: str) -> list[int]:
        """Train rows that statistics must not draw: ``held_out_rows`` of the train split."""
        return self.held_out_rows(task, GLUE_TASKS[task].train_split)

    def scored_rows(self, task: str, split: str) -> list[int]:
        """Row numbers of ``split`` that the test loader scores: every row but ``held_out_rows``."""
        held_out = set(self.held_out_rows(task, split))
        return [i for i in range(len(self.raw(task, split))) if i not in held_out]

    def evaluation_record(self) -> dict[str, Any] | None:
        """What the report's ``protocol.evaluation`` says when dev rows are held out of scoring: the
        split, its rows, how many were held out and scored, and a hash of the held-out row numbers
        (None when every row is scored)."""
        held = {task: self.held_out_rows(task, GLUE_TASKS[task].eval_split) for task in self.tasks}
        if not any(held.values()):
            return None
        return {
            "scored": "the rows of each evaluation split that are not dev rows",
            "dev_source": self.dev_source,
            "dev_fraction": self.dev_fraction,
            "dev_seed": self.dev_seed,
            "tasks": {
                task: {
                    "split": GLUE_TASKS[task].eval_split,
                    "rows": len(self.raw(task, GLUE_TASKS[task].eval_split)),
                    "held_out": len(rows),
                    "scored": len(self.raw(task, GLUE_TASKS[task].eval_split)) - len(rows),
                    "held_out_sha256": rows_hash(rows),
                }
                for task, rows in held.items()
            },
        }

    def dev_dataset(self, task: str) -> datasets.Dataset:
        """The dev rows of ``task``, tokenized (``input_ids``, ``label``, ``length``, ``idx``), in
        ``dev_indices`` order."""
        if task not in self._dev:  # a sweep scores the same dev rows at every point: select them once
            indices = self.dev_indices(task)
            if not indices:
                split = self.dev_split(task)
                raise BadData(
                    f"Task {task!r} split {split!r} in {self.path!r} gives no dev rows ({len(self.raw(task, split))} rows, "
                    f"dev_source {self.dev_source}, dev_size {self.dev_size}): a dev split needs a split of at least 2 rows"
                    + ("; set data.dev_size > 0." if self.dev_source == "train" and not self.dev_size else ".")
                )
            self._dev[task] = self.tokenized(task, self.dev_split(task)).select(indices)
        return self._dev[task]

    def dev_dataloader(self, task: str) -> DataLoader:
        """The dev rows of ``task`` in length-sorted batches, on one process (every rank sees all of them)."""
        dataset = self.dev_dataset(task)
        sampler = LengthSortedBatches(dataset["length"], self.batch_size)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers)

    # ---- batching -------------------------------------------------------------------------
    def collate(self, rows: list[dict[str, Any]], pad_to_max_length: bool | None = None) -> dict[str, torch.Tensor]:
        """Right-pad ``input_ids`` with the pad id; ``attention_mask`` marks real tokens.

        ``pad_to_max_length`` overrides the DataModule's setting for one loader (RegMean's
        statistics pad to ``max_length`` when they count padding, whatever evaluation does).
        """
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
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def eval_dataloader(self, task: str, split: str | None = None) -> DataLoader:
        """``split`` (default: the evaluation split) of ``task`` without its ``held_out_rows``, in
        length-sorted batches, this process's share of them."""
        split = split or GLUE_TASKS[task].eval_split
        dataset = self.tokenized(task, split)
        if self.held_out_rows(task, split):
            dataset = dataset.select(self.scored_rows(task, split))
        num_replicas, rank = self._world()
        width = self.max_length if self.pad_to_max_length else None
        sampler = LengthSortedBatches(dataset["length"], self.batch_size, num_replicas, rank, self.max_tokens, width)
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers
        )

    # ---- Lightning hooks ------------------------------------------------------------------
    def prepare_data(self) -> None:
        # Check every task and split before tokenizing anything, then fill the cache.
        self.check(("eval",))
        for task in self.tasks:
            self.eval_dataset(task)
        for task, split in self.extra_test_splits():
            self.tokenized(task, split)

    def setup(self, stage: str | None = None) -> None:
        self.check(("eval",))

    def extra_test_splits(self) -> list[tuple[str, str]]:
        """``(task, split)`` of the extra evaluation splits the data has (``extra_eval_splits``:
        MNLI ``validation_mismatched``), in task order; none when ``extra_eval_splits`` is off."""
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
        """``(task, split)`` of every test loader: dataloader_idx i < len(tasks) is tasks[i]'s
        evaluation split; the extra splits come after them."""
        return [(task, GLUE_TASKS[task].eval_split) for task in self.tasks] + self.extra_test_splits()

    def test_dataloader(self) -> list[DataLoader]:
        """The validation loaders of ``tasks``, in task order (dataloader_idx i = tasks[i]), then
        the extra splits' loaders (``test_splits``)."""
        return [self.eval_dataloader(task) for task in self.tasks] + [
            self.eval_dataloader(task, split) for task, split in self.extra_test_splits()
        ]

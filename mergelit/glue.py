"""GLUE: the task table and the evaluation/statistics DataModule.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")
"""Every task, in the one order used everywhere: pools, loaders, reports, tables."""


@dataclass(frozen=True)
class GLUETask:
    text_fields: tuple[str, ...]
    num_labels: int
    eval_split: str = "validation"
    train_split: str = "train"


GLUE_TASKS: dict[str, GLUETask] = {
    "cola": GLUETask(("sentence",), 2),
    "mnli": GLUETask(("premise", "hypothesis"), 3, eval_split="validation_matched"),
    "mrpc": GLUETask(("sentence1", "sentence2"), 2),
    "qnli": GLUETask(("question", "sentence"), 2),
    "qqp": GLUETask(("question1", "question2"), 2),
    "rte": GLUETask(("sentence1", "sentence2"), 2),
    "sst2": GLUETask(("sentence",), 2),
}

# Bump when the tokenized layout changes, so that old cache files are not trusted.
_CACHE_FORMAT = 1


def ordered_tasks(tasks: Sequence[str]) -> list[str]:
    """Check task names and return them in the canonical order (``TASKS``)."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in GLUE_TASKS]
    if unknown:
        raise ValueError(f"Unknown GLUE task {unknown[0]!r}; the tasks are {', '.join(TASKS)}.")
    if not tasks:
        raise ValueError(f"No task given; choose among {', '.join(TASKS)}.")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"Task listed twice in {tasks}.")
    return [t for t in TASKS if t in tasks]


def load_tokenizer(path: str):
    """The GPT-2 tokenizer at ``path`` with the spec's padding: pad = eos (50256), on the right."""
    from transformers import GPT2Tokenizer

    # GPT2Tokenizer (tokenizers-backed in transformers 5) also reads a folder holding only
    # vocab.json + merges.txt, where AutoTokenizer cannot tell the tokenizer class.
    tokenizer = GPT2Tokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # The real `gpt2` tokenizer has no pad token; the spec pads with <|endoftext|>.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: vocabulary, merges, normalizer, pad."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(f"pad={tokenizer.pad_token_id}".encode())
    return digest.hexdigest()[:16]


class LengthSortedBatches(Sampler[list[int]]):
    """Batches of indices sorted by length (longest first), so padding per batch is small.

    Under several processes each rank takes every ``num_replicas``-th batch: each example is
    scored by exactly one process and nothing is repeated (unlike ``DistributedSampler``,
    which pads the last shard with duplicates and so changes the accuracy).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0):
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
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
        batch_size: evaluation batch size.
        num_workers: DataLoader worker processes.
        max_length: truncation length in tokens (``longest_first``).
        pad_to_max_length: pad every batch to ``max_length`` (FusionBench's exact layout)
            instead of to the batch's longest row. Predictions are the same either way.
        cache_dir: where tokenized splits are cached. The key includes the tokenizer, the
            max length and the raw data's fingerprint.
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
    ):
        super().__init__()
        self.tasks = ordered_tasks(tasks)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}.")
        self.tokenizer_path = tokenizer
        self.path = path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length
        self.cache_dir = cache_dir
        self._tokenizer = None
        self._raw: dict[str, datasets.DatasetDict] = {}
        self._tokenized: dict[tuple[str, str], datasets.Dataset] = {}

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
                self._split_name(task, role)
                self.raw(task, self._split_name(task, role))

    def _split_name(self, task: str, role: str) -> str:
        info = GLUE_TASKS[task]
        return {"eval": info.eval_split, "train": info.train_split}[role]

    def raw(self, task: str, split: str) -> datasets.Dataset:
        """One raw split, from the local folder or the hub, with a clear error if missing."""
        if task not in self._raw:
            if self.is_local:
                folder = Path(self.path) / task
                if not folder.is_dir():
                    raise FileNotFoundError(
                        f"Data folder {self.path!r} has no {task!r} task folder ({folder}); write one with "
                        f"DatasetDict.save_to_disk, or use mergelit.synthetic to make one."
                    )
                loaded = datasets.load_from_disk(str(folder))
                if not isinstance(loaded, datasets.DatasetDict):
                    raise ValueError(f"{folder} holds a single Dataset; save a DatasetDict with the GLUE splits.")
            else:
                loaded = datasets.load_dataset(self.path, task)
            self._raw[task] = loaded
        splits = self._raw[task]
        if split not in splits:
            raise KeyError(
                f"Task {task!r} in {self.path!r} has no {split!r} split (it has {', '.join(splits)})."
            )
        dataset = splits[split]
        missing = [c for c in (*GLUE_TASKS[task].text_fields, "label") if c not in dataset.column_names]
        if missing:
            raise KeyError(f"Task {task!r} split {split!r} in {self.path!r} lacks column(s) {missing}.")
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
        """``split`` of ``task`` as ``input_ids`` + ``label`` (+ ``length``), cached on disk."""
        key = (task, split)
        if key not in self._tokenized:
            raw = self.raw(task, split)
            fields = GLUE_TASKS[task].text_fields
            tokenizer = self.tokenizer
            cache_key = hashlib.sha256(
                "|".join(
                    map(
                        str,
                        (_CACHE_FORMAT, task, split, tokenizer_fingerprint(tokenizer), self.max_length, raw._fingerprint),
                    )
                ).encode()
            ).hexdigest()[:20]

            def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
                texts = [batch[f] for f in fields]
                # Pairs: tokenizer(a, b) concatenates the two token lists, no separator.
                encoded = tokenizer(*texts, truncation=True, max_length=self.max_length)
                ids = encoded["input_ids"]
                return {"input_ids": ids, "length": [len(x) for x in ids]}

            cache_file = None
            if self.cache_dir:
                os.makedirs(self.cache_dir, exist_ok=True)
                cache_file = os.path.join(self.cache_dir, f"{task}-{split}-{cache_key}.arrow")
            self._tokenized[key] = raw.map(
                tokenize,
                batched=True,
                remove_columns=[c for c in raw.column_names if c != "label"],
                cache_file_name=cache_file,
                new_fingerprint=cache_key,
                desc=f"Tokenizing {task}/{split}",
            )
        return self._tokenized[key]

    def eval_dataset(self, task: str) -> datasets.Dataset:
        return self.tokenized(task, GLUE_TASKS[task].eval_split)

    def train_dataset(self, task: str) -> datasets.Dataset:
        return self.tokenized(task, GLUE_TASKS[task].train_split)

    # ---- batching -------------------------------------------------------------------------
    def collate(self, rows: list[dict[str, Any]], pad_to_max_length: bool | None = None) -> dict[str, torch.Tensor]:
        """Right-pad ``input_ids`` with the pad id; ``attention_mask`` marks real tokens.

        ``pad_to_max_length`` overrides the DataModule's setting for one loader (RegMean's
        statistics pad to ``max_length`` when they count padding, whatever evaluation does).
        """
        if pad_to_max_length is None:
            pad_to_max_length = self.pad_to_max_length
        width = self.max_length if pad_to_max_length else max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
        labels = torch.as_tensor([r["label"] for r in rows], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def eval_dataloader(self, task: str) -> DataLoader:
        dataset = self.eval_dataset(task)
        num_replicas, rank = self._world()
        sampler = LengthSortedBatches(dataset["length"], self.batch_size, num_replicas, rank)
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers
        )

    # ---- Lightning hooks ------------------------------------------------------------------
    def prepare_data(self) -> None:
        # Check every task and split before tokenizing anything, then fill the cache.
        self.check(("eval",))
        for task in self.tasks:
            self.eval_dataset(task)

    def setup(self, stage: str | None = None) -> None:
        self.check(("eval",))

    def test_dataloader(self) -> list[DataLoader]:
        """The validation loaders of ``tasks``, in task order (dataloader_idx i = tasks[i])."""
        return [self.eval_dataloader(task) for task in self.tasks]

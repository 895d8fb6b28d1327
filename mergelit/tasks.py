"""The GLUE task table: every per-task fact mergelit uses, in one place.

The order of ``TASKS`` is the one order used everywhere (pools, loaders, reports, tables):
FusionBench's ``model_names``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mergelit.errors import DuplicateName

PAD_TOKEN_ID = 50256  # <|endoftext|>: GPT-2's bos = eos, and the spec's pad (the real `gpt2` has none)


@dataclass(frozen=True)
class GLUETask:
    """One GLUE task as the hub's ``nyu-mll/glue`` holds it.

    Args:
        title: the name the published tables print (``CoLA``, ``SST-2``).
        text_fields: the text column(s), in the hub's order; two make a pair ``tokenizer(a, b)``.
        label_names: the ``ClassLabel`` names in label-id order (a head's ``id2label``).
        eval_split: the split results are reported on (MNLI: ``validation_matched``).
        train_split: the split statistics, adaptation and fine-tuning read.
        extra_eval_splits: further labelled evaluation splits, scored beside the main one.
    """

    title: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    eval_split: str = "validation"
    train_split: str = "train"
    extra_eval_splits: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


GLUE_TASKS: dict[str, GLUETask] = {
    "cola": GLUETask("CoLA", ("sentence",), ("unacceptable", "acceptable")),
    "mnli": GLUETask("MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                     eval_split="validation_matched", extra_eval_splits=("validation_mismatched",)),
    "mrpc": GLUETask("MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "qnli": GLUETask("QNLI", ("question", "sentence"), ("entailment", "not_entailment")),
    "qqp": GLUETask("QQP", ("question1", "question2"), ("not_duplicate", "duplicate")),
    "rte": GLUETask("RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "sst2": GLUETask("SST-2", ("sentence",), ("negative", "positive")),
}

TASKS: tuple[str, ...] = tuple(GLUE_TASKS)


def ordered_tasks(tasks: Sequence[str]) -> list[str]:
    """Check task names and return them in the canonical order (``TASKS``)."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in GLUE_TASKS]
    if unknown:
        raise ValueError(f"Unknown GLUE task {unknown[0]!r}; the tasks are {', '.join(TASKS)}.")
    if not tasks:
        raise ValueError(f"No task given; choose among {', '.join(TASKS)}.")
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        raise DuplicateName(f"Task {twice[0]!r} is listed twice in {tasks}; give each task once.")
    return [t for t in TASKS if t in tasks]


def task_title(task: str) -> str:
    """The published tables' name of ``task`` (``sst2`` -> ``SST-2``); other labels unchanged."""
    return GLUE_TASKS[task].title if task in GLUE_TASKS else task

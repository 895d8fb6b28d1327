"""GLUE-like data for the benchmarks: the real validation sizes × a fraction, GLUE's GPT-2 token lengths.

    python benchmarks/glue_like.py --root /tmp/mergelit_bench/glue_like --fraction 0.05

Writes ``root/<task>/`` as a ``DatasetDict.save_to_disk`` in the hub layout (the task table's text
columns, ``label`` as a ClassLabel with the task's label names, ``idx``; a small ``train`` split and
the evaluation split, MNLI's ``validation_matched``). Each row's GPT-2 token count (text + pair, no
separator, as the spec tokenizes it) is drawn first, then the texts are made of that many words
that are each exactly one GPT-2 token (with and without a leading space), so the count is exact;
``main`` re-tokenizes every row to check it. Per-task mean lengths follow GLUE (CoLA ≈ 11, SST-2 ≈ 25,
QQP ≈ 30, MNLI ≈ 40, QNLI ≈ 50, MRPC ≈ 53, RTE ≈ 70), right-skewed (log-normal), and about 1 % of
QQP / QNLI / MNLI / RTE rows are 120–450 tokens long. Labels are uniform: the pool is random, so
only lengths matter for speed. Each row is drawn from its own seeded generator, so the rows of a
smaller fraction are the first rows (same ``idx``, same text) of a larger fraction's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

VALIDATION_SIZES = {"cola": 1043, "mnli": 9815, "mrpc": 408, "qnli": 5463, "qqp": 40430, "rte": 277, "sst2": 872}
MEAN_TOKENS = {"cola": 11, "sst2": 25, "qqp": 30, "mnli": 40, "qnli": 50, "mrpc": 53, "rte": 70}
LONG_TAIL = {"qqp", "qnli", "mnli", "rte"}  # ~1 % of rows of 120-450 tokens
TAIL_FRACTION, TAIL_RANGE = 0.01, (120, 450)
SIGMA = 0.45  # log-normal spread of the bulk
DEFAULT_FRACTION = 1 / 20


def one_token_words(tokenizer_folder: str | None = None) -> list[str]:
    """Lower-case words that GPT-2 encodes as one token both alone and after a space."""
    if tokenizer_folder is None:
        from mergelit.synthetic.fixtures import tokenizer_files

        encoder = json.loads(tokenizer_files()[0].read_text())
    else:
        encoder = json.loads((Path(tokenizer_folder) / "vocab.json").read_text())
    words = [t[1:] for t in encoder if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha() and t[1:].islower()]
    return sorted(w for w in words if len(w) >= 3 and w in encoder)


def length(task: str, rng: random.Random) -> int:
    """One row's token count for ``task``: log-normal bulk at the task's mean, plus the long tail."""
    mean = MEAN_TOKENS[task]
    tail = task in LONG_TAIL
    bulk_mean = (mean - TAIL_FRACTION * sum(TAIL_RANGE) / 2) / (1 - TAIL_FRACTION) if tail else mean
    if tail and rng.random() < TAIL_FRACTION:
        return rng.randint(*TAIL_RANGE)
    return max(2, round(bulk_mean * math.exp(rng.gauss(0, SIGMA) - SIGMA**2 / 2)))


def _text(words: list[str], count: int, rng: random.Random) -> str:
    return " ".join(rng.choice(words) for _ in range(count))


def rows_of(task: str, rows: int, seed: int, words: list[str]) -> dict[str, list]:
    from mergelit.tasks import GLUE_TASKS

    info = GLUE_TASKS[task]
    columns: dict[str, list] = {field: [] for field in info.text_fields}
    columns["label"], columns["idx"] = [], []
    for index in range(rows):
        # One generator per row: the first k rows are the same at every fraction, so a smaller
        # fraction's data is a subset (same idx, same text) of a larger one's.
        rng = random.Random(f"glue_like|{task}|{seed}|{index}")
        count = length(task, rng)
        if len(info.text_fields) == 2:
            first = min(count - 1, max(1, round(count * rng.uniform(0.3, 0.7))))
            parts = (first, count - first)
        else:
            parts = (count,)
        for field, part in zip(info.text_fields, parts):
            columns[field].append(_text(words, part, rng))
        columns["label"].append(rng.randrange(info.num_labels))
        columns["idx"].append(index)
    return columns


def write(root: str | Path, fraction: float = DEFAULT_FRACTION, seed: int = 0, train_rows: int = 8) -> dict[str, int]:
    """Write the data under ``root``; return task -> evaluation rows."""
    import datasets

    from mergelit.tasks import GLUE_TASKS, TASKS

    datasets.disable_progress_bars()
    root = Path(root)
    words = one_token_words()
    sizes = {}
    for task in TASKS:
        info = GLUE_TASKS[task]
        features = datasets.Features(
            {
                **{field: datasets.Value("string") for field in info.text_fields},
                "label": datasets.ClassLabel(names=list(info.label_names)),
                "idx": datasets.Value("int32"),
            }
        )
        sizes[task] = n = max(1, round(VALIDATION_SIZES[task] * fraction))
        splits = {
            info.eval_split: datasets.Dataset.from_dict(rows_of(task, n, seed, words), features=features),
            "train": datasets.Dataset.from_dict(rows_of(task, train_rows, seed + 1, words), features=features),
        }
        datasets.DatasetDict(splits).save_to_disk(str(root / task))
    return sizes


def token_counts(root: str | Path, tokenizer_folder: str) -> dict[str, list[int]]:
    """Re-tokenize every evaluation row as the spec does (``tokenizer(a, b)``, no truncation)."""
    import datasets

    from mergelit.glue import load_tokenizer
    from mergelit.tasks import GLUE_TASKS, TASKS

    tokenizer = load_tokenizer(tokenizer_folder)
    counts = {}
    for task in TASKS:
        info = GLUE_TASKS[task]
        split = datasets.load_from_disk(str(Path(root) / task))[info.eval_split]
        texts = [list(split[field]) for field in info.text_fields]
        encoded = tokenizer(*texts)["input_ids"]
        counts[task] = [len(ids) for ids in encoded]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/mergelit_bench/glue_like")
    parser.add_argument("--fraction", type=float, default=DEFAULT_FRACTION)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = write(args.root, args.fraction, args.seed)
    import tempfile

    from mergelit.synthetic.fixtures import write_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        counts = token_counts(args.root, str(write_tokenizer(folder)))
    print(f"{'task':6} {'rows':>6} {'mean tokens':>11} {'target':>6} {'max':>4} {'>=120':>5}")
    for task, c in counts.items():
        print(f"{task:6} {sizes[task]:6d} {sum(c) / len(c):11.1f} {MEAN_TOKENS[task]:6d} {max(c):4d} {sum(x >= 120 for x in c):5d}")
    print(f"total rows {sum(sizes.values())}, real tokens {sum(map(sum, counts.values()))}")


if __name__ == "__main__":
    main()

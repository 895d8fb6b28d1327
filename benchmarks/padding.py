"""Dynamic padding (length-sorted batches) vs FusionBench's pad-to-512, measured in one run.

    python benchmarks/padding.py [--rows 200]

Writes fixtures to a temp dir, scores Task Arithmetic on every task both ways, checks the
predictions are identical and prints the wall-time ratio. A ratio, not seconds: this host
is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mergelit.glue import TASKS, GLUEDataModule  # noqa: E402
from mergelit.methods import TaskArithmetic  # noqa: E402
from mergelit.pool import ModelPool  # noqa: E402
from mergelit.synthetic import write_fixtures  # noqa: E402


def score(model: TaskArithmetic, data: GLUEDataModule) -> tuple[float, list[torch.Tensor]]:
    predictions = []
    start = time.perf_counter()
    with torch.no_grad():
        for task in TASKS:
            for batch in data.eval_dataloader(task):
                predictions.append(model(batch["input_ids"], batch["attention_mask"], task).argmax(-1))
    return time.perf_counter() - start, predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200, help="validation rows per task")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        import yaml

        config = yaml.safe_load(write_fixtures(Path(root), num_validation=args.rows).read_text())
        pool = ModelPool(**config["pool"])
        model = TaskArithmetic(pool, scaling_factor=0.5)
        model.setup("test")
        common = dict(tokenizer=pool.tokenizer_path, path=config["data"]["path"], batch_size=32, cache_dir=None)
        dynamic = GLUEDataModule(**common)
        padded = GLUEDataModule(**common, pad_to_max_length=True)
        for data in (dynamic, padded):  # tokenize outside the timing
            for task in TASKS:
                data.eval_dataset(task)
        t_dynamic, p_dynamic = score(model, dynamic)
        t_padded, p_padded = score(model, padded)
        same = all(torch.equal(a, b) for a, b in zip(p_dynamic, p_padded))
        print(f"{args.rows} rows x {len(TASKS)} tasks, 2-layer 64-wide GPT-2, batch 32")
        print(f"identical predictions: {same}")
        print(f"pad-to-512 time / dynamic-padding time: {t_padded / t_dynamic:.1f}x")


if __name__ == "__main__":
    main()

"""Statistics cost: Fisher and RegMean statistics time per 256 train examples, as a ratio to a plain forward pass.

    python benchmarks/statistics_cost.py

(Not ``statistics.py``: a script's folder comes first on ``sys.path``, so that name would hide the
standard library's ``statistics`` module from every script here, e.g. ``startup.py``, and from lightning.)

Pool: ``benchmarks/eval.py``'s (GPT-2, 4 layers × 256 wide, real vocabulary); data:
``benchmarks/glue_like.py`` with 256 train rows per task (GLUE-like lengths). For every task, timed
in this one process, in this order:

- **plain forward**: the task's fine-tuned body + head over the same 256 rows, in the same batches
  (``draw_examples`` / ``batches_of``, the DataModule's per-batch padding), under ``torch.inference_mode``;
- **Fisher**: ``mergelit.statistics.fisher_statistics(trainer, datamodule, pool, num_examples=256)``;
- **RegMean**: ``gram_statistics(..., count_padding=False)`` (real tokens only, per-batch padding) and
  ``count_padding=True`` (rows padded to 512, every position counted: FusionBench's setting).

The public functions run as ``mergelit test`` runs them: a Lightning ``Trainer`` on the CPU (one
``trainer.predict`` per task), the cache in a fresh temporary folder (so everything is computed;
the cache key, the pool's fingerprint and the file write are included). Tokenization and the first
read of each body happen before any timing. The plain forward pass is timed before and after the
statistics; the ratios use the faster of the two. Printed per 256 examples (the mean over the 7 tasks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import eval as eval_bench  # noqa: E402  (benchmarks/eval.py: the pool)
import glue_like  # noqa: E402

NUM_EXAMPLES, BATCH_SIZE, SEED = 256, 32, 42  # the statistics functions' defaults


def plain_forward(pool, datamodule) -> float:
    """Seconds of one inference forward pass (body + head) over every task's 256 drawn rows."""
    import torch

    from mergelit.gpt2 import build_body, build_head, last_non_pad_index
    from mergelit.statistics import batches_of, draw_examples

    total = 0.0
    for task in pool.tasks:
        dataset = datamodule.train_dataset(task)
        batches = [datamodule.collate([dataset[i] for i in b])
                   for b in batches_of(draw_examples(len(dataset), NUM_EXAMPLES, SEED), BATCH_SIZE)]
        body, head = build_body(pool.body_config(), pool.finetuned_body(task)).eval(), build_head(pool.head(task))
        pad = pool.task_config(task).pad_token_id
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
                last = last_non_pad_index(batch["input_ids"], pad)
                head(hidden[torch.arange(len(hidden)), last]).argmax(-1)
        total += time.perf_counter() - start
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/mergelit_bench/eval", help="shared with eval.py (the pool is reused)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import lightning as L

    from mergelit.glue import GLUEDataModule
    from mergelit.pool import ModelPool
    from mergelit.statistics import fisher_statistics, gram_statistics

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    config, _ = eval_bench.prepare(root, 0.001)  # the pool (its evaluation data is not used)
    paths = json.loads(config.read_text())["pool"]
    data = root / "statistics_data"
    if not (data / "sst2").exists():
        glue_like.write(data, fraction=0.001, train_rows=NUM_EXAMPLES)
    pool = ModelPool(**paths)
    with tempfile.TemporaryDirectory() as folder:
        datamodule = GLUEDataModule(tokenizer=paths["tokenizer"], path=str(data), batch_size=BATCH_SIZE,
                                    cache_dir=os.path.join(folder, "tokenized"))
        for task in pool.tasks:  # tokenize, read every body, before timing
            datamodule.train_dataset(task)
            pool.finetuned_body(task)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False)
        seconds = {"plain forward (before)": plain_forward(pool, datamodule)}
        runs = {
            "Fisher": (fisher_statistics, {}),
            "RegMean, count_padding false": (gram_statistics, {"count_padding": False}),
            "RegMean, count_padding true": (gram_statistics, {"count_padding": True}),
        }
        for name, (function, options) in runs.items():
            cache = os.path.join(folder, "statistics", name)  # empty: computed, not loaded
            start = time.perf_counter()
            function(trainer, datamodule, pool, NUM_EXAMPLES, BATCH_SIZE, SEED, cache_dir=cache, **options)
            seconds[name] = time.perf_counter() - start
        seconds["plain forward (after)"] = plain_forward(pool, datamodule)
    tasks = len(pool.tasks)
    forward = min(seconds["plain forward (before)"], seconds["plain forward (after)"])
    print(f"{tasks} tasks × {NUM_EXAMPLES} train examples, batch {BATCH_SIZE}, {args.threads} thread(s); "
          f"seconds per {NUM_EXAMPLES} examples (mean over the tasks)")
    print(f"\n| run | s per {NUM_EXAMPLES} examples | / plain forward |\n|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s / tasks:.3f} | {s / forward:.1f}× |")
    ratio = seconds["RegMean, count_padding true"] / seconds["RegMean, count_padding false"]
    print(f"\nRegMean count_padding true / false: {ratio:.1f}×")


if __name__ == "__main__":
    main()

"""``mergelit check -c ...``: every input check of ``mergelit test`` (``mergelit.run.check_inputs``), no merge,
then a summary: the models, each task's rows and token lengths per split, the estimated cost of the run.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from mergelit.tasks import GLUE_TASKS


def percentile(values: list[int], q: float) -> int:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return int(ordered[int(rank) - 1])


def data_summary(datamodule, roles: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per task and split the run reads: rows, token lengths (p50, p95, max, total) and rows at ``max_length``."""
    rows = []
    for task in datamodule.tasks:
        info = GLUE_TASKS[task]
        splits = [info.eval_split, *(s for t, s in datamodule.extra_test_splits() if t == task)]
        if "train" in roles:
            splits.append(info.train_split)
        for split in splits:
            lengths = list(datamodule.tokenized(task, split)["length"])
            rows.append({
                "task": task, "split": split, "rows": len(lengths), "p50": percentile(lengths, 50),
                "p95": percentile(lengths, 95), "max": max(lengths), "tokens": sum(lengths),
                "at_max_length": sum(1 for n in lengths if n >= datamodule.max_length),
            })
    return rows


def forward_flops(config, tokens: int, squared_lengths: int) -> float:
    """Forward FLOPs (multiply and add counted apart) of a GPT-2 body on rows with ``tokens`` real
    tokens in all and Σ L² = ``squared_lengths``: 2 × the Conv1D weights per token, and for attention
    4 · width per layer and (query, key) pair (QKᵀ and the weighted sum), ≈ L² / 2 pairs per row."""
    width, layers = config.n_embd, config.n_layer
    inner = config.n_inner or 4 * width
    per_token = 2 * layers * (width * 3 * width + width * width + 2 * width * inner)
    attention = 4 * layers * width * (squared_lengths / 2)
    return float(per_token * tokens + attention)


def run_check(trainer, method, datamodule, report_save_path: Optional[str] = None, merged_model_save_path: Optional[str] = None) -> str:
    """Every input check of ``mergelit test`` on these objects, then the summary text."""
    from safetensors import safe_open

    from mergelit.run import check_inputs

    check_inputs(trainer, method, datamodule, report_save_path, merged_model_save_path)
    pool = method.pool
    lines = [f"Everything {method.display_name} needs is usable.", "", "| model | source | parameters | dtypes |", "|---|---|---|---|"]
    for name in ["pretrained", *pool.tasks]:  # parameters (body and head) and dtypes, from the files' headers
        checkpoint = pool._pretrained_checkpoint() if name == "pretrained" else pool._finetuned_checkpoint(name)
        numbers, dtypes = 0, set()
        for file in sorted(set(checkpoint.files.values())):
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    if key.endswith((".attn.bias", ".attn.masked_bias")):
                        continue
                    view = handle.get_slice(key)
                    numbers += math.prod(view.get_shape())
                    dtypes.add(view.get_dtype())
        source = pool.pretrained_path if name == "pretrained" else pool.finetuned_paths[name]
        lines.append(f"| {name} | {source} | {numbers:,} | {', '.join(sorted(dtypes))} |")
    if datamodule is None:
        return "\n".join(lines)
    data = data_summary(datamodule, ("eval", "train") if "train" in str(method.data) else ("eval",))
    lines += ["", f"| task | split | rows | tokens p50 | p95 | max | at max_length ({datamodule.max_length}) |", "|---|---|---|---|---|---|---|"]
    for row in data:
        lines.append(f"| {row['task']} | {row['split']} | {row['rows']:,} | {row['p50']} | {row['p95']} | {row['max']} | {row['at_max_length']} |")
    scored = [row for row in data if row["split"] != GLUE_TASKS[row["task"]].train_split]
    tokens = sum(row["tokens"] for row in scored)
    squared = sum(n * n for row in scored for n in datamodule.tokenized(row["task"], row["split"])["length"])
    bodies = method.bodies_at_inference() if method.kind == "ensemble" else 1
    flops = forward_flops(pool.body_config(), tokens, squared) * bodies
    lines += ["", f"Estimated cost: one evaluation scores {sum(r['rows'] for r in scored):,} rows, {tokens:,} real tokens, "
              f"≈ {flops / 1e12:.3g} TFLOP of forward passes (fp32, no padding counted)."]
    examples = {name: getattr(method, name) for name in ("num_fisher_examples", "num_regmean_examples") if hasattr(method, name)}
    if examples:
        lines.append(f"Statistics: {', '.join(f'{k} = {v}' for k, v in examples.items())} train examples per task "
                     f"({len(pool.tasks)} tasks), each a forward (and for Fisher a backward) pass.")
    if hasattr(method, "max_steps") and hasattr(method, "batch_size"):
        per_step = getattr(method, "batches_per_step", 1) * method.batch_size
        lines.append(f"Adaptation: {method.max_steps} steps × {per_step} inputs per task × {len(pool.tasks)} tasks, "
                     f"each a forward and backward pass.")
    return "\n".join(lines)


def check_command(args: Optional[list[str]] = None) -> None:
    """``mergelit check ARGS`` (the arguments of ``mergelit test``)."""
    from mergelit.cli import MergeCLI

    cli = MergeCLI(args)
    config = cli.config
    print(run_check(cli.trainer, cli.model, cli.datamodule, config.get("report_save_path"), config.get("merged_model_save_path")))

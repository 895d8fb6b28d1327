"""Merge scale: peak memory and seconds of a streamed merge at N = 2 and N = 14 models, GPT-2-small shapes.

    OMP_NUM_THREADS=1 nice python benchmarks/merge_scale.py                      # every method, N = 2 14, 2 blocks
    OMP_NUM_THREADS=1 nice python benchmarks/merge_scale.py --n 2 7 14 --methods task_arithmetic ties --n-layer 12

Checkpoints: random weights with GPT-2 small's tensor shapes (width 768, 12 heads' layout, the
50,257-token vocabulary, 1,024 positions) and ``--n-layer`` blocks (default 2, so that the SVD
methods' N = 14 points fit in minutes: every tensor has its GPT-2-small shape, only the number of
blocks is smaller; wte is then 71 % of a body instead of 31 %). θ0 = 0.02·N(0, 1), θi = θ0 +
0.001·i·N(0, 1). Written once under ``--root``; task i is called ``t00``, ``t01``, ... (a pool
subclass, because GLUE has 7 tasks and the point is N = 14).

Each point runs in a fresh process: it builds the method on a ``ModelPool`` over the first N
checkpoints and runs ``method.merge()`` (``prepare_merge``, then ``merge_tensor`` key by key from
the memory-mapped safetensors, as ``mergelit test`` does) inside ``mergelit.costs.recording`` +
``costs.phase("merge")``: **peak** = the largest resident memory during the merge minus the resident
memory when it started (the pool's headers and the runtime are not counted), printed in bodies
(one fp32 body of these shapes); **seconds**: the merge's CPU seconds (one thread: what it computed,
whatever else the shared host runs) and wall seconds, and the costs record's merge and load (reading
tensors) wall seconds. Flat in N means the N = 14 peak is the N = 2 one, within noise.

Methods (their configs' defaults): Task Arithmetic and TIES (reference), TSV-M, Iso-C, CART,
Breadcrumbs, Fisher. Fisher needs statistics: each task gets a **random but plausible** diagonal
Fisher file (squared N(0, 1)·1e-3 entries, one per body tensor, written with safetensors), read
through ``StoredStatistics`` one tensor at a time, as the statistics cache's files are; no
statistics are computed here (``benchmarks/statistics_cost.py`` times those).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "task_arithmetic": ("TaskArithmetic", {"scaling_factor": 0.3}),
    "ties": ("TiesMerging", {"scaling_factor": 0.3, "threshold": 20, "merge_func": "sum"}),
    "tsv_m": ("TaskSingularVectorMerging", {"alpha": 1.0}),
    "iso_c": ("IsoC", {"scaling_factor": 1.0}),
    "cart": ("CART", {"scaling_factor": 2.0, "rank_ratio": 0.12}),
    "breadcrumbs": ("Breadcrumbs", {"scaling_factor": 0.3, "keep_fraction": 0.15, "outlier_fraction": 0.006}),
    "fisher": ("FisherMerging", {}),
}
TASK_NAMES = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")


def write_checkpoints(root: Path, n: int, n_layer: int, n_embd: int = 768, fisher: bool = False) -> dict[int, str]:
    """θ0 (``root/pretrained``), θ1..θn (``root/model_i``, GPT2ForSequenceClassification layout, the
    head sized for GLUE task ``TASK_NAMES[(i - 1) % 7]`` so that a GLUE pool over the first 7 passes
    its checks: ``benchmarks/frontier2_cost.py`` uses them) and, with ``fisher``, Fisher statistics per
    model (``root/fisher/model_i.safetensors``); each written once. Returns index -> folder (0: θ0)."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64, bos_token_id=50256, eos_token_id=50256)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT2Model(config).state_dict().items()}
    pretrained = root / "pretrained"
    if not (pretrained / "model.safetensors").exists():
        pretrained.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(0)
        state = {"transformer." + k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}
        save_file(state, str(pretrained / "model.safetensors"), metadata={"format": "pt"})
        (pretrained / "config.json").write_text(json.dumps(config.to_dict() | {"architectures": ["GPT2LMHeadModel"]}))
    theta0 = None
    (root / "fisher").mkdir(exist_ok=True)
    paths = {0: str(pretrained)}
    for index in range(1, n + 1):
        folder = root / f"model_{index}"
        paths[index] = str(folder)
        statistics_file = root / "fisher" / f"model_{index}.safetensors"
        if (folder / "model.safetensors").exists() and (statistics_file.exists() or not fisher):
            continue
        if theta0 is None:
            from safetensors.torch import load_file

            theta0 = load_file(str(pretrained / "model.safetensors"))
        folder.mkdir(exist_ok=True)
        generator = torch.Generator().manual_seed(index)
        if not (folder / "model.safetensors").exists():
            state = {k: v + torch.randn(v.shape, generator=generator) * (0.001 * index) for k, v in theta0.items()}
            count = 3 if TASK_NAMES[(index - 1) % len(TASK_NAMES)] == "mnli" else 2
            state["score.weight"] = torch.randn(count, n_embd, generator=generator) * 0.02
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
            labels = {"id2label": {str(i): f"LABEL_{i}" for i in range(count)}, "label2id": {f"LABEL_{i}": i for i in range(count)}}
            (folder / "config.json").write_text(json.dumps(
                config.to_dict() | {"architectures": ["GPT2ForSequenceClassification"], "pad_token_id": 50256} | labels))
            del state
        if fisher:
            statistics = {k: (torch.randn(s, generator=generator) * 1e-3).square_() for k, s in shapes.items()}
            save_file(statistics, str(statistics_file))
            del statistics
    return paths


def scale_pool(root: Path, n: int):
    """A ``ModelPool`` over ``model_1..model_n`` with tasks ``t00..`` (GLUE's names allow only 7 models)."""
    from mergelit.pool import ModelPool

    class ScalePool(ModelPool):
        def __init__(self):
            super().__init__(str(root / "pretrained"), {"cola": str(root / "model_1")})
            self.tasks = [f"t{i:02d}" for i in range(n)]
            self.finetuned_paths = {task: str(root / f"model_{i + 1}") for i, task in enumerate(self.tasks)}

        def _head_and_config(self, task):  # heads are not merged: skip GLUE's label checks
            self._check_task(task)
            return (None, None)

    return ScalePool()


def measure(root: Path, n: int, method_name: str) -> dict:
    """In a fresh process: one streamed merge; its costs record."""
    import torch

    import mergelit.methods as methods
    from mergelit import costs
    from mergelit.statistics import StoredStatistics

    pool = scale_pool(root, n)
    class_name, args = METHODS[method_name]
    method = getattr(methods, class_name)(pool, **args)
    if method_name == "fisher":
        method.statistics = StoredStatistics({task: root / "fisher" / f"model_{i + 1}.safetensors" for i, task in enumerate(pool.tasks)})
    body_bytes = sum(s.numel() * 4 for s in pool.body_shapes().values())
    record = costs.CostRecord()
    start, start_cpu = time.perf_counter(), time.process_time()
    with costs.recording(record), costs.phase("merge"), torch.no_grad():
        merged = method.merge()
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    figures = record.as_dict()
    assert all(torch.isfinite(t).all() for t in merged.values())
    return {"wall": wall, "cpu": cpu, "merge_seconds": figures["merge_seconds"], "load_seconds": figures["load_seconds"],
            "peak_gb": figures["merge_peak_gb"], "body_gb": body_bytes / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/mergelit_bench/merge_scale")
    parser.add_argument("--n", type=int, nargs="+", default=[2, 14])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.root) / f"layers_{args.n_layer}"
    if args.child:
        print(json.dumps(measure(root, int(args.child[0]), args.child[1])))
        return
    root.mkdir(parents=True, exist_ok=True)
    write_checkpoints(root, max(args.n), args.n_layer, fisher=True)
    print(f"GPT-2-small shapes, {args.n_layer} block(s), vocabulary 50,257; threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'method':16} {'N':>3} {'CPU s':>7} {'wall s':>7} {'merge s':>8} {'load s':>7} {'peak GB':>8} {'peak (bodies)':>14}")
    peaks: dict[str, dict[int, float]] = {}
    for method in args.methods:
        for n in args.n:
            command = [sys.executable, __file__, "--root", args.root, "--n-layer", str(args.n_layer), "--child", str(n), method]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            r = json.loads(output.strip().splitlines()[-1])
            bodies = r["peak_gb"] / r["body_gb"]
            peaks.setdefault(method, {})[n] = bodies
            print(f"{method:16} {n:>3} {r['cpu']:7.1f} {r['wall']:7.1f} {r['merge_seconds']:8.1f} {r['load_seconds']:7.1f} "
                  f"{r['peak_gb']:8.2f} {bodies:14.2f}", flush=True)
    if len(args.n) > 1:
        low, high = min(args.n), max(args.n)
        print(f"\npeak at N = {high} / peak at N = {low}: " + ", ".join(f"{m} {p[high] / p[low]:.2f}" for m, p in peaks.items()))


if __name__ == "__main__":
    main()

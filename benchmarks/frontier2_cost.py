"""Merge cost of ACE-Merging, SVC, Subspace Boosting, MagMax, Consensus and TALL masks at GPT-2-small
size (N = 7 random fine-tunes), on this CPU, beside Task Arithmetic and TIES.

    OMP_NUM_THREADS=1 nice python benchmarks/frontier2_cost.py                    # every config, one run each
    python benchmarks/frontier2_cost.py --configs magmax consensus_ta             # some of them
    python benchmarks/frontier2_cost.py --n-layer 2 --root /tmp/frontier2_small   # a reduced pool: a quick look

The pool is written by ``benchmarks/merge_scale.py``'s ``write_checkpoints`` (random weights with
GPT-2 small's shapes: θ0 ~ 0.02·N(0, 1), θi = θ0 + 0.001·i·N(0, 1); 124 M parameters, vocabulary
50,257), once under --root (merge_scale.py itself writes under ``--root``/layers_N). Each method runs
in a fresh process, as ``mergelit test`` builds its body: the config
file's ``model.init_args`` (a wrapper's ``base:`` included), then ``body_for(task)`` inside a
``mergelit.costs`` record, which gives the **merge seconds** (reading the checkpoints excluded: that is
the load phase, printed apart) and the **peak memory above the resident memory when the merge
started** (the merged body itself included). A task-aware method (TALL masks) is measured for its first
task's body, which includes τ_MTL and every mask.

One run, not a distribution: the host is shared and noisy, so read the figures as orders of magnitude
and the ratios to Task Arithmetic as the comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")
REFERENCES = {
    "task_arithmetic": ("configs/methods/task_arithmetic.yaml", {}),
    "ties_merging": ("configs/methods/ties_merging.yaml", {}),
}
CONFIGS = {
    "magmax": ("configs/methods/magmax.yaml", {}),
    "consensus_ta": ("configs/methods/consensus_ta.yaml", {}),
    "consensus_ties": ("configs/methods/consensus_ta.yaml", {"base": "ties"}),
    "tall_mask_ta": ("configs/methods/tall_mask_ta.yaml", {}),
    "subspace_boosting_ta": ("configs/methods/subspace_boosting_ta.yaml", {}),
    "subspace_boosting_ties": ("configs/methods/subspace_boosting_ties.yaml", {}),
    "svc_task_arithmetic": ("configs/methods/svc_task_arithmetic.yaml", {}),
    "svc_ties_merging": ("configs/methods/svc_ties_merging.yaml", {}),
    "ace_merging": ("configs/methods/ace_merging.yaml", {}),
}


def write_pool(root: Path, n: int, n_layer: int, n_embd: int) -> dict:
    """``ModelPool`` arguments of merge_scale.py's random pool (written if missing), tasks in GLUE order."""
    spec = importlib.util.spec_from_file_location("merge_scale", Path(__file__).with_name("merge_scale.py"))
    merge_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_scale)
    paths = merge_scale.write_checkpoints(root, n, n_layer, n_embd)
    return {"pretrained": paths[0], "finetuned": {TASKS[i - 1]: paths[i] for i in range(1, n + 1)}}


def measure(pool_args: dict, config: str, overrides: dict) -> dict:
    """In a fresh process: build the method from its config and time its first body's merge."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import yaml

    from mergelit import costs
    from mergelit.methods import method_classes
    from mergelit.pool import ModelPool

    model = yaml.safe_load((ROOT / config).read_text())["model"]
    cls = {c.__name__: c for c in method_classes()}[model["class_path"].rsplit(".", 1)[-1]]
    pool = ModelPool(**pool_args)
    pool.check()  # headers and heads: not what is measured
    record = costs.CostRecord()
    start = time.perf_counter()
    with costs.recording(record):
        method = cls(pool, **{**(model.get("init_args") or {}), **overrides})
        method.body_for(pool.tasks[0])  # merges inside costs.phase("merge"), as `mergelit test` does
    wall = time.perf_counter() - start
    figures = record.as_dict()
    body_gb = sum(shape.numel() for shape in pool.body_shapes().values()) * 4 / 1e9
    return {"merge_seconds": figures["merge_seconds"], "merge_peak_gb": figures["merge_peak_gb"],
            "load_seconds": figures["load_seconds"], "wall_seconds": wall, "kind": method.kind, "body_gb": body_gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/mergelit_bench/merge_scale", help="the pool's folder (merge_scale.py's default)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--n", type=int, default=7)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(measure(job["pool"], job["config"], job["overrides"])))
        return
    if not 1 <= args.n <= len(TASKS):
        parser.error(f"--n must be in [1, {len(TASKS)}] (one GLUE task per fine-tuned model)")
    pool = write_pool(Path(args.root), args.n, args.n_layer, args.n_embd)
    print(f"pool: {args.root} (N = {args.n}, {args.n_layer} layers, width {args.n_embd})", flush=True)
    print(f"{'config':24} {'kind':11} {'merge s':>8} {'peak GB':>8} {'bodies':>7} {'load s':>7} {'× TA time':>10} {'× TA peak':>10}", flush=True)
    reference = None
    for name in [*REFERENCES, *args.configs]:
        config, overrides = {**REFERENCES, **CONFIGS}[name]
        job = json.dumps({"pool": pool, "config": config, "overrides": overrides})
        done = subprocess.run([sys.executable, __file__, "--child", job], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name:24} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        reference = reference or r
        peak = r["merge_peak_gb"]
        ratio_peak = f"{peak / reference['merge_peak_gb']:10.2f}" if peak is not None and reference["merge_peak_gb"] else f"{'-':>10}"
        peak = float("nan") if peak is None else peak
        print(f"{name:24} {r['kind']:11} {r['merge_seconds']:8.1f} {peak:8.2f} {peak / r['body_gb']:7.2f} "
              f"{r['load_seconds']:7.1f} {r['merge_seconds'] / reference['merge_seconds']:10.1f} {ratio_peak}", flush=True)


if __name__ == "__main__":
    main()

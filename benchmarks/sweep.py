"""Sweep: an 11-point λ sweep of Task Arithmetic in one process vs 11 separate `mergelit test` processes.

    python benchmarks/sweep.py --fraction 0.005        # 1/200 of the GLUE validation sizes (default)

Same pool and data as ``benchmarks/eval.py`` (GPT-2 with 4 layers × 256 wide and the real vocabulary;
``benchmarks/glue_like.py`` data), whose helpers write them. Timed, each a fresh process, start-up
included:

- **sweep**: ``mergelit sweep -c CONFIG -c configs/methods/task_arithmetic.yaml
  -c configs/sweeps/scaling_factor.yaml --output_dir DIR`` (λ = 0.0, 0.1, ..., 1.0; one process).
- **FusionBench layout**: 11 × ``mergelit test -c CONFIG -c configs/methods/task_arithmetic.yaml
  --model.init_args.scaling_factor λ --data.pad_to_max_length true --data.batch_size 8``
  (every row padded to 512, batch 8, one process per λ, as FusionBench runs a λ grid).
- **dynamic padding** (second baseline): the same 11 processes without the two ``--data`` flags.

The sweep runs first on a cold tokenization cache (it pays the tokenization, once); the separate
processes run after it and find the cache warm, so the ratios are lower bounds. Printed: the wall
seconds of each, the ratios, and whether every point's accuracies (each task's, and the average)
equal those of the separate runs, exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import eval as eval_bench  # noqa: E402  (benchmarks/eval.py: pool, data, config, one `mergelit test`)

LAMBDAS = [round(0.1 * i, 1) for i in range(11)]  # configs/sweeps/scaling_factor.yaml's grid
PADDED = ("--data.pad_to_max_length", "true", "--data.batch_size", "8")


def run_sweep(config: Path, out: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    command = [sys.executable, "-m", "mergelit", "sweep", "-c", str(config),
               "-c", str(REPO / "configs" / "methods" / "task_arithmetic.yaml"),
               "-c", str(REPO / "configs" / "sweeps" / "scaling_factor.yaml"), "--output_dir", str(out / "points")]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=out, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def accuracies(report: Path) -> dict[str, float]:
    """Every entry's accuracy (the tasks, extra splits, the average); the protocol entry has none."""
    found = json.loads(report.read_text())
    return {name: entry["accuracy"] for name, entry in found.items() if isinstance(entry, dict) and "accuracy" in entry}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/mergelit_bench/eval", help="shared with eval.py (the pool is reused)")
    parser.add_argument("--fraction", type=float, default=1 / 200)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--skip-padded", action="store_true", help="only the dynamic-padding baseline")
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    config, sizes = eval_bench.prepare(root, args.fraction)
    shutil.rmtree(root / "cache" / f"{args.fraction:g}", ignore_errors=True)  # the sweep starts cold
    print(f"data: fraction {args.fraction:g}, {sum(sizes.values())} rows ({sizes}); {len(LAMBDAS)} λ points; "
          f"{args.threads} thread(s)", flush=True)

    out = root / f"sweep_{args.fraction:g}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    seconds = {"sweep (one process)": run_sweep(config, out, args.threads)}
    print(f"{'sweep (one process)':34} {seconds['sweep (one process)']:7.1f} s", flush=True)
    swept = {lam: accuracies(out / "points" / f"scaling_factor={lam}.json") for lam in LAMBDAS}

    layouts = {"dynamic padding, 11 processes": ()}
    if not args.skip_padded:
        layouts["FusionBench layout, 11 processes"] = PADDED
    same = {}
    for name, extra in layouts.items():
        total, same[name] = 0.0, True
        for lam in LAMBDAS:
            run = out / f"{'padded' if extra else 'dynamic'}_{lam}"
            run.mkdir()
            total += eval_bench.run_test(config, run, args.threads, "--model.init_args.scaling_factor", str(lam), *extra)
            same[name] &= accuracies(run / "report.json") == swept[lam]
        seconds[name] = total
        print(f"{name:34} {total:7.1f} s  ({total / len(LAMBDAS):.1f} s per process); "
              f"ratio {total / seconds['sweep (one process)']:.1f}x the sweep; every point's accuracies "
              f"{'equal' if same[name] else 'DIFFERENT'}", flush=True)
    print("\n| run | wall s | / sweep | accuracies equal the sweep's |\n|---|---|---|---|")
    for name, s in seconds.items():
        equal = "–" if name not in same else ("yes, all 11 points" if same[name] else "**no**")
        print(f"| {name} | {s:.1f} | {s / seconds['sweep (one process)']:.1f}× | {equal} |")


if __name__ == "__main__":
    main()

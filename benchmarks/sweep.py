"""Sweeps that score only what they need: an 11-point λ sweep of Task Arithmetic, three ways, one script.

    OMP_NUM_THREADS=1 nice python benchmarks/sweep.py                   # fraction 0.006 of the GLUE sizes (348 rows)

(0.006 is about the smallest fraction that works: a dev split needs 2 validation rows per task, and
RTE has 277.)

Pool and data: ``benchmarks/eval.py``'s (GPT-2-small shape, random weights, the real vocabulary;
``benchmarks/glue_like.py`` rows at ``--fraction``). Each run is one fresh process, timed in CPU
seconds (one thread: what it computed, whatever else the shared host runs) and wall seconds:

- **select on dev**: ``mergelit sweep -c CONFIG -c configs/methods/task_arithmetic.yaml
  -c configs/sweeps/scaling_factor.yaml --sweep.select_on dev``: the 11 λ scored on the dev rows
  (``data.dev_fraction`` 0.1 of each validation set, at least one row), then the selected λ merged
  again and scored on the other rows (11 dev evaluations + 1 full one).
- **oracle**: the same with ``--sweep.oracle true``: every λ also scored on the validation rows.
- **no selection**: ``--sweep.select_on none`` (every λ scored on every validation row: 11 full ones).

Then a plain ``mergelit test ... --model.init_args.scaling_factor λ* --data.hold_out_dev true`` of
the selected λ*: its accuracies (every task's and the average) must equal those of the selecting
sweep's report of that point, exactly.
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

WAYS = {
    "select on dev": ("--sweep.select_on", "dev"),
    "select on dev + oracle": ("--sweep.select_on", "dev", "--sweep.oracle", "true"),
    "no selection": ("--sweep.select_on", "none"),
}


def run_sweep(config: Path, grid: Path, out: Path, threads: int, *extra: str) -> tuple[float, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    command = [sys.executable, "-m", "mergelit", "sweep", "-c", str(config),
               "-c", str(REPO / "configs" / "methods" / "task_arithmetic.yaml"),
               "-c", str(grid), "--output_dir", str(out), *extra]
    before, start = eval_bench._children_cpu(), time.perf_counter()
    subprocess.run(command, check=True, cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, eval_bench._children_cpu() - before


def accuracies(report: Path) -> dict[str, float]:
    """Every entry's accuracy (the tasks, extra splits, the average); the protocol entry has none."""
    found = json.loads(report.read_text())
    return {name: entry["accuracy"] for name, entry in found.items() if isinstance(entry, dict) and "accuracy" in entry}


def check_selected(config: Path, folder: Path, plain: Path, threads: int) -> tuple[float, float]:
    """A plain ``mergelit test`` of the selecting sweep's selected point; its accuracies must equal the sweep's report's."""
    selected = json.loads((folder / "selection.json").read_text())["selected_points"][0]
    lam = selected.split("=", 1)[1]
    shutil.rmtree(plain, ignore_errors=True)
    wall, cpu = eval_bench.run_test(config, plain, threads, "--model.init_args.scaling_factor", lam, "--data.hold_out_dev", "true")
    swept = accuracies(folder / f"{selected}.json")
    equal = accuracies(plain / "report.json") == swept
    print(f"selected {selected}; plain `mergelit test` of it ({cpu:.1f} s CPU, {wall:.1f} s wall): accuracies "
          f"{'EQUAL' if equal else 'DIFFERENT'} to the sweep's report of it (average {swept.get('average')})", flush=True)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/mergelit_bench/eval", help="shared with eval.py (the pool is reused)")
    parser.add_argument("--fraction", type=float, default=0.006, help="at least 0.0055: RTE needs 2 validation rows for a dev split")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    parser.add_argument("--points", type=int, default=11, help="λ points (below 11: evenly spaced, the CPU time extrapolated to 11)")
    args = parser.parse_args()
    if not 2 <= args.points <= 11:
        parser.error("--points must be in [2, 11]")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    config, sizes = eval_bench.prepare(root, args.fraction)
    dev_rows = sum(min(max(1, int(n * 0.1)), n - 1) for n in sizes.values())
    print(f"data: fraction {args.fraction:g}, {sum(sizes.values())} validation rows ({sizes}), about {dev_rows} of them dev rows; "
          f"{args.threads} thread(s)", flush=True)
    shutil.rmtree(root / "cache" / f"{args.fraction:g}", ignore_errors=True)  # the first run (select on dev) tokenizes, cold

    grid = REPO / "configs" / "sweeps" / "scaling_factor.yaml"
    if args.points != 11:  # the first, last and evenly spaced λ of the 11
        lambdas = [round(i / (args.points - 1), 1) for i in range(args.points)]
        grid = root / f"grid_{args.points}.yaml"
        grid.write_text(json.dumps({"sweep": {"grid": {"model.init_args.scaling_factor": lambdas}}}))
        startup_config, _ = eval_bench.prepare(root, eval_bench.STARTUP_FRACTION)
        startup = eval_bench.run_test(startup_config, root / "run_startup_sweep", args.threads)[1]
        print(f"{args.points} λ points {lambdas}; start-up of one process (one row per task): {startup:.1f} s CPU", flush=True)

    seconds: dict[str, tuple[float, float]] = {}
    folders: dict[str, Path] = {}
    plain_wall = plain_cpu = None
    for name in args.ways:
        folders[name] = out = root / f"sweep_{args.fraction:g}_{args.points}" / name.replace(" ", "_").replace("+", "and")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        seconds[name] = run_sweep(config, grid, out, args.threads, *WAYS[name])
        print(f"{name:24} {seconds[name][1]:7.1f} s CPU ({seconds[name][0]:.1f} s wall)", flush=True)
        if args.points != 11:
            wall, cpu = seconds[name]
            print(f"{'':24} extrapolated to 11 points: {startup + (cpu - startup) * 11 / args.points:7.1f} s CPU "
                  f"(start-up + its {args.points} points' share × 11 / {args.points})", flush=True)
        if name == "select on dev":  # checked at once: the other two ways take far longer
            plain_wall, plain_cpu = check_selected(config, folders[name], root / f"sweep_{args.fraction:g}" / "plain_test", args.threads)

    print("\n| run | CPU s | wall s |\n|---|---|---|")
    for name, (wall, cpu) in seconds.items():
        print(f"| {name} ({args.points} points) | {cpu:.1f} | {wall:.1f} |")
    if plain_cpu is not None:
        print(f"| plain `mergelit test` of the selected point | {plain_cpu:.1f} | {plain_wall:.1f} |")


if __name__ == "__main__":
    main()

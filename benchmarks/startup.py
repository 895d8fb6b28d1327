"""Start-up: `mergelit --help`, `mergelit test --help` and the time to the first merged tensor,
each as a ratio to `python -c "import torch"` measured in the same run (fresh processes, median of --repeat).

    python benchmarks/startup.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

FIRST_MERGE = (
    "import sys; from mergelit.pool import ModelPool; "
    "from mergelit.methods.task_arithmetic import TaskArithmetic; "
    "import json; p = json.load(open(sys.argv[1] + '/paths.json')); "
    "m = TaskArithmetic(ModelPool(**p), scaling_factor=0.3); s = m.merge(); next(iter(s.values()))"
)


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "mergelit_bench", "startup_pool"))
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    if not os.path.exists(os.path.join(args.root, "paths.json")):
        import json

        from mergelit.synthetic.fixtures import write_pool

        paths = write_pool(args.root)
        with open(os.path.join(args.root, "paths.json"), "w") as file:
            json.dump({k: paths[k] for k in ("pretrained", "finetuned", "tokenizer")}, file)
    commands = {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "mergelit --help": [sys.executable, "-m", "mergelit", "--help"],
        "mergelit test --help": [sys.executable, "-m", "mergelit", "test", "--help"],
        "first merged tensor (TA, tiny pool)": [sys.executable, "-c", FIRST_MERGE, args.root],
    }
    times = {name: statistics.median(timed(c, env) for _ in range(args.repeat)) for name, c in commands.items()}
    base = times['python -c "import torch"']
    for name, seconds in times.items():
        print(f"{name:38} {seconds:6.2f} s   {seconds / base:5.2f}x import torch", flush=True)


if __name__ == "__main__":
    main()

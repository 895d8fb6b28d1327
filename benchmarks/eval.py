"""Eval end to end: `mergelit test` (Task Arithmetic) vs FusionBench's layout, same pool and data.

    python benchmarks/eval.py --fraction 0.01          # 1/100 of the GLUE validation sizes
    python benchmarks/eval.py                          # 1/20 (the padded baseline is slow)

Pool: GPT-2 with 4 layers × 256 wide and the real 50,257-token vocabulary
(``mergelit.synthetic.write_pool``); data: ``benchmarks/glue_like.py``. Each run is one fresh
process (``python -m mergelit test``, start-up included). Baseline: the same command with
``--data.pad_to_max_length true --data.batch_size 8`` (FusionBench's every-row-to-512, batch 8).
Both save predictions; the predicted classes must be identical. Printed: wall seconds, examples/s,
real tokens/s, the ratio, and the fraction of this machine's fp32 matmul throughput (``torch.mm``
1024 × 1024, measured in the same run, same thread count) achieved counting real tokens only:
FLOPs ≈ 2 × (matmul parameters) × tokens + 4 × n_layer × n_embd × Σ length².
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import glue_like  # noqa: E402

N_LAYER, N_EMBD, N_HEAD = 4, 256, 4


def matmul_flops(threads: int, size: int = 1024, seconds: float = 2.0) -> float:
    """fp32 ``torch.mm`` throughput (FLOP/s) of this machine now, best of a few timed loops."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def prepare(root: Path, fraction: float) -> tuple[Path, dict[str, int]]:
    from mergelit.synthetic.fixtures import write_pool

    pool_root = root / "pool"
    if not (pool_root / "sst2" / "model.safetensors").exists():
        write_pool(pool_root, n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD)
    pool = {"pretrained": str(pool_root / "pretrained"),
            "finetuned": {t: str(pool_root / t) for t in glue_like.VALIDATION_SIZES},
            "tokenizer": str(pool_root / "pretrained")}
    data = root / f"data_{fraction:g}"
    sizes = glue_like.write(data, fraction)
    config = root / f"config_{fraction:g}.yaml"
    config.write_text(json.dumps({
        "seed_everything": 0, "pool": pool,
        "data": {"path": str(data), "batch_size": 32, "cache_dir": str(root / "cache" / f"{fraction:g}")},
        "trainer": {"accelerator": "cpu", "devices": 1},
    }))
    return config, sizes


def run_test(config: Path, out: Path, threads: int, *extra: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    command = [sys.executable, "-m", "mergelit", "test", "-c", str(config),
               "-c", str(REPO / "configs" / "methods" / "task_arithmetic.yaml"),
               "--report_save_path", str(out / "report.json"), "--save_predictions", "true", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=out, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def predicted(out: Path) -> dict[str, list[tuple[int, int]]]:
    found = {}
    for file in sorted((out / "predictions").glob("*.jsonl")):
        rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        found[file.stem] = [(r["idx"], r["prediction"]) for r in rows]
    return found


def model_flops(counts: dict[str, list[int]]) -> float:
    matmul_params = N_LAYER * 12 * N_EMBD**2  # c_attn 3d², attn c_proj d², c_fc 4d², mlp c_proj 4d² per block
    tokens = sum(map(sum, counts.values()))
    attention = 4 * N_LAYER * N_EMBD * sum(n * n for c in counts.values() for n in c)
    return 2 * matmul_params * tokens + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/mergelit_bench/eval")
    parser.add_argument("--fraction", type=float, default=glue_like.DEFAULT_FRACTION)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    config, sizes = prepare(root, args.fraction)
    counts = glue_like.token_counts(root / f"data_{args.fraction:g}", str(root / "pool" / "pretrained"))
    rows, tokens = sum(sizes.values()), sum(map(sum, counts.values()))
    flops = model_flops(counts)
    peak = matmul_flops(args.threads)
    print(f"data: fraction {args.fraction:g}, {rows} rows, {tokens} real tokens; model {flops / 1e9:.1f} GFLOP on real tokens")
    print(f"torch.mm 1024x1024 fp32, {args.threads} thread(s): {peak / 1e9:.1f} GFLOP/s")
    layouts = {"mergelit": ()}
    if not args.skip_baseline:
        layouts["fusionbench_layout"] = ("--data.pad_to_max_length", "true", "--data.batch_size", "8")
    seconds, predictions = {}, {}
    for name, extra in layouts.items():
        out = root / f"run_{name}_{args.fraction:g}"
        out.mkdir(exist_ok=True)
        for old in (out / "predictions").glob("*.jsonl"):
            old.unlink()
        seconds[name] = s = run_test(config, out, args.threads, *extra)
        predictions[name] = predicted(out)
        print(f"{name:20} {s:7.1f} s  {rows / s:8.1f} examples/s  {tokens / s:9.0f} real tokens/s  "
              f"{flops / s / peak:6.1%} of torch.mm throughput (end to end, start-up included)", flush=True)
    if len(seconds) == 2:
        same = predictions["mergelit"] == predictions["fusionbench_layout"] and predictions["mergelit"]
        print(f"ratio fusionbench_layout / mergelit: {seconds['fusionbench_layout'] / seconds['mergelit']:.1f}x; "
              f"predictions {'identical' if same else 'DIFFERENT'} ({sum(map(len, predictions['mergelit'].values()))} rows)")


if __name__ == "__main__":
    main()

"""Eval at the real shape: `mergelit test` (Task Arithmetic) on a GPT-2-small-shaped pool, GLUE-like data.

    OMP_NUM_THREADS=1 nice python benchmarks/eval.py        # fraction 1/10; variants on 1/50, FusionBench layout on 1/500
    OMP_NUM_THREADS=1 nice python benchmarks/eval.py --fraction 0.004 --variants-fraction 0.002 --baseline-fraction 0.001   # a quick check

Pool: random weights of GPT-2 small's shape (12 layers, 768 wide, 12 heads, the real 50,257-token
vocabulary; ``mergelit.synthetic.write_pool``), written once under ``--root``. Data:
``benchmarks/glue_like.py`` (the real validation sizes × ``--fraction``, GLUE's GPT-2 token lengths).
Every run is one fresh process (``python -m mergelit test ... --save_predictions true``), timed in
CPU seconds of that process (``RUSAGE_CHILDREN``; one thread, so CPU seconds are the seconds it
computed, whatever else the shared host runs; wall seconds are printed beside), in this order:

1. **start-up**: the same command on one row per task (imports, reading the 8 checkpoints, the
   merge, building the body, tokenizing 7 rows): what a run pays besides scoring.
2. **mergelit**: the default layout (length-sorted batches of 32 rows, dynamic padding) on the
   whole ``--fraction`` (cold tokenization cache). Scoring = CPU − start-up; start-up share = start-up / CPU.
3. **variants** (``--repeat R`` times each, in turn; ``--only-variants``: start-up and these only) on ``--variants-fraction`` of the sizes (each row drawn from its own seed, so these
   are the first rows, same idx and text, of run 2's): ``--fused_gelu true``, ``--data.max_tokens T``
   and the default, in that order (the first tokenizes, cold). Scoring-time ratios to the default;
   predicted classes must equal run 2's on the same rows (the largest |Δ logit| is printed).
4. **FusionBench layout** (``--data.pad_to_max_length true --data.batch_size 8``: every row padded
   to 512, batch 8) on ``--baseline-fraction`` of the sizes (again a subset of run 2's rows). The
   ratio is **per row** (scoring CPU seconds per row, start-up subtracted on both sides), because
   padding every row to 512 would take hours on the whole fraction; predictions must equal run 2's.

Throughput: real tokens/s (tokens the rows really have, no padding), and the fraction of this
machine's fp32 ``torch.mm`` throughput per CPU second (1024 × 1024 × 1024, best of a 2 s loop, measured
at the start and at the end of the run on the same thread count; the mean of the two is the reference) reached
counting real tokens only:

    FLOP = 2 × P × T + 4 × L × d × Σ_rows n²

P = 12·L·d² (the four Conv1D weights of each block: c_attn 3d², attn.c_proj d², c_fc 4d², mlp.c_proj 4d²),
T = real tokens, n = a row's real length (QKᵀ and AV, 2·n²·d multiply-adds each per layer). Embeddings,
layer norms, GELU and the head are not counted (elementwise or negligible), so the fraction is what
the matrix products alone would allow.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import glue_like  # noqa: E402

N_LAYER, N_EMBD, N_HEAD = 12, 768, 12
STARTUP_FRACTION = 1e-9  # one row per task (glue_like keeps at least one)
PADDED = ("--data.pad_to_max_length", "true", "--data.batch_size", "8")


def matmul_flops(threads: int, size: int = 1024, seconds: float = 2.0) -> float:
    """fp32 ``torch.mm`` throughput (FLOP per CPU second) of this machine now, best of a few timed loops."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = 0.0
    end = time.process_time() + seconds
    while time.process_time() < end:
        start = time.process_time()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * size**3 / (time.process_time() - start))
    return best


def write_gpt2_small_pool(pool_root: Path) -> dict:
    from mergelit.synthetic.fixtures import write_pool

    if not (pool_root / "sst2" / "model.safetensors").exists():
        write_pool(pool_root, n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD)
    return {"pretrained": str(pool_root / "pretrained"),
            "finetuned": {t: str(pool_root / t) for t in glue_like.VALIDATION_SIZES},
            "tokenizer": str(pool_root / "pretrained")}


def prepare(root: Path, fraction: float) -> tuple[Path, dict[str, int]]:
    """The pool (once), the data at ``fraction`` and a config naming both; returns (config, rows per task)."""
    pool = write_gpt2_small_pool(root / "pool")
    data = root / f"data_{fraction:g}"
    if (data / "sizes.json").exists():
        sizes = json.loads((data / "sizes.json").read_text())
    else:
        sizes = glue_like.write(data, fraction)
        (data / "sizes.json").write_text(json.dumps(sizes))
    config = root / f"config_{fraction:g}.yaml"
    config.write_text(json.dumps({
        "seed_everything": 0, "pool": pool,
        "data": {"path": str(data), "batch_size": 32, "cache_dir": str(root / "cache" / f"{fraction:g}")},
        "trainer": {"accelerator": "cpu", "devices": 1},
    }))
    return config, sizes


def run_test(config: Path, out: Path, threads: int, *extra: str) -> tuple[float, float]:
    """One fresh ``mergelit test`` process (Task Arithmetic, predictions saved): (wall, CPU) seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    command = [sys.executable, "-m", "mergelit", "test", "-c", str(config),
               "-c", str(REPO / "configs" / "methods" / "task_arithmetic.yaml"),
               "--report_save_path", str(out / "report.json"), "--save_predictions", "true", *extra]
    out.mkdir(parents=True, exist_ok=True)
    before, start = _children_cpu(), time.perf_counter()
    subprocess.run(command, check=True, cwd=out, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, _children_cpu() - before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def predicted(out: Path) -> dict[tuple[str, int], tuple[int, list[float]]]:
    """(entry, idx) -> (predicted class, logits) from a run's saved predictions."""
    found = {}
    for file in sorted((out / "predictions").glob("*.jsonl")):
        for line in file.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                found[(file.stem, row["idx"])] = (row["prediction"], row["logits"])
    return found


def compare(reference: dict, other: dict) -> tuple[bool, float, int]:
    """(classes identical on the other's rows, largest |Δ logit|, rows compared)."""
    if not other or any(key not in reference for key in other):
        return False, float("nan"), len(other)
    same = all(reference[key][0] == value[0] for key, value in other.items())
    delta = max(abs(a - b) for key, value in other.items() for a, b in zip(reference[key][1], value[1]))
    return same, delta, len(other)


def model_flops(counts: dict[str, list[int]]) -> float:
    matmul_params = N_LAYER * 12 * N_EMBD**2
    tokens = sum(map(sum, counts.values()))
    attention = 4 * N_LAYER * N_EMBD * sum(n * n for c in counts.values() for n in c)
    return 2 * matmul_params * tokens + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/mergelit_bench/eval")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--baseline-fraction", type=float, default=0.002, help="rows the FusionBench layout scores (0: skip it)")
    parser.add_argument("--variants-fraction", type=float, default=0.02, help="rows the fused-GELU / max_tokens comparison scores (0: skip it)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="the token budget of the max_tokens variant")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant, in turn")
    parser.add_argument("--only-variants", action="store_true", help="only start-up and the variants (an earlier main run's predictions are the reference)")
    args = parser.parse_args()
    if max(args.baseline_fraction, args.variants_fraction) > args.fraction:
        parser.error("--baseline-fraction and --variants-fraction must not exceed --fraction (their rows are a subset)")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    config, sizes = prepare(root, args.fraction)
    tokenizer = str(root / "pool" / "pretrained")
    counts = glue_like.token_counts(root / f"data_{args.fraction:g}", tokenizer)
    rows, tokens = sum(sizes.values()), sum(map(sum, counts.values()))
    flops = model_flops(counts)
    peaks = [matmul_flops(args.threads)]
    print(f"pool: GPT-2 small shape ({N_LAYER} layers, {N_EMBD} wide, {N_HEAD} heads, vocabulary 50,257), random weights")
    print(f"data: fraction {args.fraction:g}, {rows} rows, {tokens} real tokens (mean {tokens / rows:.1f}); "
          f"{flops / 1e12:.2f} TFLOP on real tokens; {args.threads} thread(s)")
    print(f"torch.mm 1024³ fp32 at the start: {peaks[0] / 1e9:.1f} GFLOP per CPU second", flush=True)

    startup_config, _ = prepare(root, STARTUP_FRACTION)
    startup_wall, startup = run_test(startup_config, root / "run_startup", args.threads)
    print(f"start-up (one row per task, same command): {startup:.1f} s CPU ({startup_wall:.1f} s wall)", flush=True)

    main_out = root / f"run_mergelit_{args.fraction:g}"
    if args.only_variants:
        reference = predicted(main_out)
        if not reference:
            parser.error(f"--only-variants needs the predictions of an earlier main run in {main_out}")
    else:
        wall, cpu = run_test(config, main_out, args.threads)
        reference = predicted(main_out)
        scoring = cpu - startup
        print(f"mergelit           {cpu:7.1f} s CPU ({wall:.1f} s wall), start-up share {startup / cpu:5.1%}; scoring {scoring:7.1f} s CPU: "
              f"{tokens / scoring:6.0f} real tokens/s, {rows / scoring:6.1f} rows/s (per CPU second)", flush=True)

    if args.variants_fraction > 0:
        small_config, small_sizes = prepare(root, args.variants_fraction)
        small_rows = sum(small_sizes.values())
        # The first run tokenizes (cold cache): the variants go first, so that cost counts against them.
        # With --repeat R the three runs are repeated R times in turn (the host's load drifts).
        variants = {"fused GELU": ("--fused_gelu", "true"),
                    f"max_tokens {args.max_tokens}": ("--data.max_tokens", str(args.max_tokens)), "mergelit": ()}
        small: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeat):
            for name, extra in variants.items():
                out = root / f"run_{name.replace(' ', '_')}_{args.variants_fraction:g}"
                v_wall, v_cpu = run_test(small_config, out, args.threads, *extra)
                small[name].append(v_cpu - startup)
                same, delta, n = compare(reference, predicted(out))
                print(f"{name:18} on fraction {args.variants_fraction:g} ({small_rows} rows): scoring {small[name][-1]:6.1f} s CPU "
                      f"({v_wall:.1f} s wall); predictions "
                      f"{'identical' if same else 'DIFFERENT'} to the main run's ({n} rows), max |Δ logit| {delta:.1e}", flush=True)
        for name in variants:
            ratios = [a / b for a, b in zip(small[name], small["mergelit"])]
            print(f"{name:18} scoring time / mergelit's (same rows, run by run): " + ", ".join(f"{r:.3f}" for r in ratios)
                  + f"; best / best {min(small[name]) / min(small['mergelit']):.3f}")
    if args.only_variants:
        return

    if args.baseline_fraction > 0:
        base_config, base_sizes = prepare(root, args.baseline_fraction)
        base_rows = sum(base_sizes.values())
        out = root / f"run_fusionbench_layout_{args.baseline_fraction:g}"
        b_wall, b_cpu = run_test(base_config, out, args.threads, *PADDED)
        same, delta, n = compare(reference, predicted(out))
        per_row, ours = (b_cpu - startup) / base_rows, scoring / rows
        print(f"FusionBench layout {b_cpu:7.1f} s CPU ({b_wall:.1f} s wall) on {base_rows} rows (fraction {args.baseline_fraction:g}): "
              f"{per_row:.3f} s CPU per row vs mergelit's {ours:.4f}: {per_row / ours:.1f}x per row (scoring only); "
              f"predictions {'identical' if same else 'DIFFERENT'} to the main run's on the {n} shared rows, max |Δ logit| {delta:.1e}", flush=True)

    peaks.append(matmul_flops(args.threads))
    peak = sum(peaks) / 2
    print(f"torch.mm 1024³ fp32 at the end: {peaks[1] / 1e9:.1f} GFLOP per CPU second; reference (mean) {peak / 1e9:.1f}")
    print(f"mergelit: {flops / scoring / 1e9:.1f} GFLOP per CPU second on real tokens = {flops / scoring / peak:.1%} of torch.mm "
          f"(scoring); {flops / cpu / peak:.1%} end to end (start-up included)")


if __name__ == "__main__":
    main()

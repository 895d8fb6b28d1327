"""Merge time and peak RSS of the SVD methods (TSV-M, Iso-C, Iso-CTS, CART) at GPT-2-small size.

    python benchmarks/svd_method_cost.py                # GPT-2 small: 12 layers, N = 7 (≈ 10-15 min, ~5 GB)
    python benchmarks/svd_method_cost.py --layers 2     # a quick reduced run; prints a 12-layer extrapolation
    python benchmarks/svd_method_cost.py --layers 1 --svd-keys conv1d --methods tsv_merging cart

Measured here (2 shared CPU cores, OMP_NUM_THREADS=1, ``--layers 1``: wte + wpe + 1 block, a
186 MB body): TSV-M 61 s, Iso-C 7 s, Iso-CTS 85 s, CART 15 s wall (about twice the CPU time:
the host was busy), wte taking most of it for TSV-M and Iso-CTS (47 s, 63 s).

GPT-2 small has 12 layers; ``--layers L`` keeps wte [50257, 768] and wpe [1024, 768] and L of
the 12 blocks (``--no-wte`` drops wte too). The weights are random with GPT-2 small's shapes:
θ0 = 0.02·N(0, 1), θi = θ0 + 1e-3·N(0, 1), so every task vector is dense and of full rank (an
SVD's cost hardly depends on the spectrum; no rank-deficiency warnings). Each method runs in a
subprocess of its own so that its peak RSS is its own; the merge is the pure function of the
method file (the ``MergeMethod`` adds only θ0 + α τm). The four methods work key by key, so the
body is merged group by group (wte, wpe, each block, ln_f) with the same result as in one call:
that is what gives the per-group times and the extrapolation to 12 layers
(wte + wpe + ln_f + 12 × the mean block time), labelled as such.

Peak RSS is printed in units of one body of the size merged (fp32, 4 bytes a number) above the
process's footprint after ``import torch, mergelit``: the inputs are N + 1 bodies (θ0 and the θi),
the merged body is one more, and the rest is the largest key's working set (a task vector or
two, sums and SVD factors of one tensor: task vectors are computed when read; wte dominates).
Threads: torch's default, or ``OMP_NUM_THREADS``. The host is shared and noisy: read the times
as orders of magnitude, and the 'cpu s' column (the process's CPU time) beside the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

METHODS = ("tsv_merging", "iso_c", "iso_cts", "cart")
NAMES = {"tsv_merging": "TSV-M", "iso_c": "Iso-C", "iso_cts": "Iso-CTS", "cart": "CART"}
FULL_LAYERS = 12
WIDTH, VOCAB, POSITIONS = 768, 50257, 1024


def gpt2_small_shapes(layers: int, wte: bool = True) -> dict[str, tuple[int, ...]]:
    """GPT2Model's state-dict shapes (Conv1D weights [in, out]) for ``layers`` of GPT-2 small's blocks."""
    d = WIDTH
    shapes: dict[str, tuple[int, ...]] = {}
    if wte:
        shapes["wte.weight"] = (VOCAB, d)
    shapes["wpe.weight"] = (POSITIONS, d)
    for layer in range(layers):
        block = {
            "ln_1.weight": (d,), "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,), "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,),
            "mlp.c_proj.weight": (4 * d, d), "mlp.c_proj.bias": (d,),
        }  # fmt: skip
        shapes.update({f"h.{layer}.{name}": shape for name, shape in block.items()})
    shapes["ln_f.weight"], shapes["ln_f.bias"] = (d,), (d,)
    return shapes


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _groups(keys: list[str]) -> list[tuple[str, list[str]]]:
    """(name, keys) in state-dict order: wte, wpe, each block h.<l>, ln_f."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        name = key.split(".")[0] if not key.startswith("h.") else ".".join(key.split(".")[:2])
        groups.setdefault(name, []).append(key)
    return list(groups.items())


def run_one(method: str, layers: int, num_tasks: int, svd_keys: str, wte: bool, seed: int) -> dict:
    """Build the random bodies, merge them with ``method`` group by group, return times and RSS."""
    import torch

    from mergelit.methods.cart import cart_merge
    from mergelit.methods.iso import iso_c_merge, iso_cts_merge
    from mergelit.methods.tsv_merging import tsv_merge

    merge = {
        "tsv_merging": lambda p, f: tsv_merge(p, f, alpha=1.0, svd_keys=svd_keys),
        "iso_c": lambda p, f: iso_c_merge(p, f, scaling_factor=1.0, svd_keys=svd_keys),
        "iso_cts": lambda p, f: iso_cts_merge(p, f, scaling_factor=1.0, common_space_fraction=0.8, svd_keys=svd_keys),
        "cart": lambda p, f: cart_merge(p, f, scaling_factor=2.0, rank_ratio=0.12),  # no option: Conv1D only
    }[method]
    rss_start = _rss_bytes()
    shapes = gpt2_small_shapes(layers, wte)
    generator = torch.Generator().manual_seed(seed)
    pretrained = {key: torch.randn(shape, generator=generator).mul_(0.02) for key, shape in shapes.items()}
    finetuned = {
        f"task{i}": {key: torch.randn(t.shape, generator=generator).mul_(1e-3).add_(t) for key, t in pretrained.items()}
        for i in range(num_tasks)
    }
    body_bytes = sum(t.numel() for t in pretrained.values()) * 4
    rss_inputs = _rss_bytes()
    merged, times = {}, {}
    start, cpu_start = time.perf_counter(), time.process_time()
    for name, keys in _groups(list(shapes)):
        t0 = time.perf_counter()
        part = {task: {key: body[key] for key in keys} for task, body in finetuned.items()}
        merged.update(merge({key: pretrained[key] for key in keys}, part))
        times[name] = time.perf_counter() - t0
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "method": method,
        "seconds": total,
        "cpu_seconds": cpu,
        "group_seconds": times,
        "body_bytes": body_bytes,
        "rss_start": rss_start,
        "rss_inputs": rss_inputs,
        "peak_rss": _peak_rss_bytes(),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="blocks of GPT-2 small to keep (12: all)")
    parser.add_argument("--tasks", type=int, default=7, help="number of fine-tuned bodies N")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--svd-keys", choices=("all_2d", "conv1d"), default="all_2d",
                        help="TSV-M / Iso: SVD every 2-D tensor (FusionBench) or the Conv1D weights only")  # fmt: skip
    parser.add_argument("--no-wte", action="store_true", help="leave wte out of the body")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.layers <= FULL_LAYERS:
        parser.error(f"--layers must be in 1..{FULL_LAYERS}, got {args.layers}")
    if args.child:
        result = run_one(args.child, args.layers, args.tasks, args.svd_keys, not args.no_wte, args.seed)
        print(json.dumps(result))
        return

    body = sum(math.prod(s) for s in gpt2_small_shapes(args.layers, not args.no_wte).values())
    print(
        f"GPT-2 small shapes, {args.layers} of {FULL_LAYERS} layers{'' if not args.no_wte else ', no wte'}, "
        f"N = {args.tasks}, svd_keys {args.svd_keys}; one body = {body / 1e6:.1f} M numbers = {body * 4 / 1e6:.0f} MB"
    )
    header = (
        f"{'method':8} {'merge s':>8} {'cpu s':>7} {'wte s':>7} {'wpe s':>7} {'block s':>8} "
        f"{'peak RSS':>9} {'above inputs':>12}"
    )
    if args.layers < FULL_LAYERS:
        header += f" {'12-layer s (extrapolated)':>26}"
    print(header)
    for method in args.methods:
        command = [sys.executable, __file__, "--child", method, "--layers", str(args.layers),
                   "--tasks", str(args.tasks), "--svd-keys", args.svd_keys, "--seed", str(args.seed)]  # fmt: skip
        command += ["--no-wte"] if args.no_wte else []
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        groups = r["group_seconds"]
        blocks = [s for name, s in groups.items() if name.startswith("h.")]
        block = sum(blocks) / len(blocks)
        unit = r["body_bytes"]
        line = (
            f"{NAMES[method]:8} {r['seconds']:8.1f} {r['cpu_seconds']:7.1f} "
            f"{groups.get('wte', 0.0):7.1f} {groups['wpe']:7.1f} {block:8.1f} "
            f"{(r['peak_rss'] - r['rss_start']) / unit:8.1f}b {(r['peak_rss'] - r['rss_inputs']) / unit:11.1f}b"
        )
        if args.layers < FULL_LAYERS:
            rest = sum(s for name, s in groups.items() if not name.startswith("h."))
            line += f" {rest + FULL_LAYERS * block:26.0f}"
        print(line, flush=True)
    print(
        f"torch threads {r['threads']}; 'merge s' is wall time (wte, wpe, block: wall time of that part), 'cpu s' "
        f"the process's CPU time (less affected by other jobs on a shared host).\n"
        f"'b' = bodies of this size above the footprint after imports "
        f"(peak RSS) and above the {args.tasks + 1} input bodies (working set + the merged body)."
    )


if __name__ == "__main__":
    main()

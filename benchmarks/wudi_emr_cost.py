"""Merge time and peak memory of WUDI and EMR-Merging at GPT-2-small shapes (random weights), on this CPU.

    OMP_NUM_THREADS=1 python benchmarks/wudi_emr_cost.py emr                       # full GPT-2 small
    OMP_NUM_THREADS=1 python benchmarks/wudi_emr_cost.py wudi --layers 1 --steps 5  # reduced, extrapolated

Each method runs in its own Python process (so its peak RSS is its own). The process builds a
random pool with GPT-2 small's tensors (``--layers`` blocks; θ0 ~ 0.02·N(0, 1), θi = θ0 +
1e-3·N(0, 1), n = 7), then times the method's pure functions once.

- ``emr``: ``emr_merge`` (τuni, masks, rescalers) and one task's body (``modulated_body``).
- ``wudi``: ``wudi_merge`` key by key with ``--steps`` Adam steps (default 50), timing each key, so
  that the time of 400 steps at 12 layers can be extrapolated from a reduced run: per key,
  seconds × 400 / steps (an upper bound: the stacking, done once, is counted in every step's
  share), then wte + wpe + 12 × (mean block) + the rest. Adam's state does not grow with the
  steps, so the peak RSS of a short run is that of a long one (for the blocks built).

One run, not a distribution: this host is shared and noisy, so read the numbers as orders of
magnitude. Memory: the pool alone is (n + 1) bodies (≈ 4 GB at 12 layers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch import Tensor

StateDict = dict[str, Tensor]
FULL_LAYERS = 12
FULL_STEPS = 400  # FusionBench's wudi.yaml


def gpt2_shapes(layers: int, width: int = 768, vocab: int = 50257, positions: int = 1024) -> dict[str, tuple]:
    """A ``GPT2Model`` state dict's shapes in state-dict order (Conv1D weights [in, out])."""
    shapes: dict[str, tuple] = {"wte.weight": (vocab, width), "wpe.weight": (positions, width)}
    for layer in range(layers):
        p = f"h.{layer}."
        shapes.update({
            p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
            p + "attn.c_attn.weight": (width, 3 * width), p + "attn.c_attn.bias": (3 * width,),
            p + "attn.c_proj.weight": (width, width), p + "attn.c_proj.bias": (width,),
            p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
            p + "mlp.c_fc.weight": (width, 4 * width), p + "mlp.c_fc.bias": (4 * width,),
            p + "mlp.c_proj.weight": (4 * width, width), p + "mlp.c_proj.bias": (width,),
        })
    shapes.update({"ln_f.weight": (width,), "ln_f.bias": (width,)})
    return shapes


def random_pool(layers: int, n: int, seed: int = 0) -> tuple[StateDict, dict[str, StateDict]]:
    g = torch.Generator().manual_seed(seed)
    shapes = gpt2_shapes(layers)
    pretrained = {key: torch.randn(shape, generator=g).mul_(0.02) for key, shape in shapes.items()}
    finetuned = {
        f"task{i}": {key: torch.randn(s, generator=g).mul_(1e-3).add_(pretrained[key]) for key, s in shapes.items()}
        for i in range(n)
    }
    return pretrained, finetuned


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def measure_emr(pretrained: StateDict, finetuned: dict[str, StateDict]) -> dict:
    from mergelit.methods.emr import emr_merge, modulated_body

    start, start_cpu = time.perf_counter(), time.process_time()
    tau_uni, masks, rescalers = emr_merge(pretrained, finetuned)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    first = next(iter(finetuned))
    start = time.perf_counter()
    body = modulated_body(pretrained, tau_uni, masks[first], rescalers[first])
    body_seconds = time.perf_counter() - start
    assert list(body) == list(pretrained)
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
            "one_task_body_seconds": round(body_seconds, 2)}


def measure_wudi(pretrained: StateDict, finetuned: dict[str, StateDict], steps: int, side: str) -> dict:
    from mergelit.methods.wudi import wudi_merge

    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU time: less sensitive to other jobs on a shared host
    merged: StateDict = {}
    for key in pretrained:
        start, start_cpu = time.perf_counter(), time.process_time()
        merged.update(
            wudi_merge({key: pretrained[key]}, {t: {key: b[key]} for t, b in finetuned.items()},
                       iter_num=steps, side=side, progress=False)
        )
        wall[key], cpu[key] = time.perf_counter() - start, time.process_time() - start_cpu
    result = {"steps": steps, "side": side}
    for name, per_key in (("seconds", wall), ("cpu_seconds", cpu)):
        blocks = sorted({key.split(".")[1] for key in pretrained if key.startswith("h.")})
        block = [sum(s for k, s in per_key.items() if k.startswith(f"h.{b}.")) for b in blocks]
        rest = sum(s for k, s in per_key.items() if not k.startswith("h.") and k not in ("wte.weight", "wpe.weight"))
        mean_block = sum(block) / len(block) if blocks else float("nan")
        full = (per_key["wte.weight"] + per_key["wpe.weight"] + FULL_LAYERS * mean_block + rest) * FULL_STEPS / steps
        result.update({
            name: round(sum(per_key.values()), 2),
            f"wte_{name}": round(per_key["wte.weight"], 2),
            f"wpe_{name}": round(per_key["wpe.weight"], 2),
            f"mean_block_{name}": round(mean_block, 2),
            f"extrapolated_{name}_12_layers_400_steps": round(full),
        })
    return result


def measure(method: str, layers: int, n: int, steps: int, side: str) -> dict:
    pretrained, finetuned = random_pool(layers, n)
    if method == "wudi" and steps < 1:
        raise SystemExit("--steps must be at least 1 (the time per step is what is extrapolated)")
    before = _peak_rss_gib()
    if method == "emr":
        result = measure_emr(pretrained, finetuned)
    else:
        result = measure_wudi(pretrained, finetuned, steps, side)
    peak = _peak_rss_gib()
    return {
        "method": method, "layers": layers, "n": n, "threads": torch.get_num_threads(),
        "numbers_per_body": sum(t.numel() for t in pretrained.values()), **result,
        "peak_rss_gib": round(peak, 2), "above_pool_gib": round(peak - before, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="*", help="wudi and/or emr (default both)")
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="transformer blocks (GPT-2 small: 12)")
    parser.add_argument("--n", type=int, default=7, help="fine-tuned bodies (default 7)")
    parser.add_argument("--steps", type=int, default=50, help="WUDI Adam steps (default 50; extrapolated to 400)")
    parser.add_argument("--side", default="input", choices=["input", "fusionbench"],
                        help="WUDI side (fusionbench excludes nothing: its wte product is refused at full vocab)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure one, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.layers, args.n, args.steps, args.side)))
        return
    for method in args.methods or ["wudi", "emr"]:
        if method not in ("wudi", "emr"):
            parser.error(f"unknown method {method!r}; the methods are wudi, emr")
        out = subprocess.run(
            [sys.executable, __file__, "--one", method, "--layers", str(args.layers), "--n", str(args.n),
             "--steps", str(args.steps), "--side", args.side],
            check=True, capture_output=True, text=True, env=os.environ,
        ).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()

"""Merge time and peak memory of a method at GPT-2-small size (random weights), on this CPU.

    OMP_NUM_THREADS=2 python benchmarks/method_cost.py dare_task_arithmetic dare_ties_merging breadcrumbs
    python benchmarks/method_cost.py --list

Each method runs in its own Python process (so its peak RSS is its own): the process builds a
random pool of GPT-2-small bodies (the spec's 148 tensors, 124,439,808 numbers each; θ0 ~ 0.02·N(0, 1),
θi = θ0 + 1e-3·N(0, 1)), then times the method's pure merge function once. It prints one line per
method: seconds, peak RSS, and peak RSS above the pool already in memory (θ0 and the n bodies,
≈ 0.5 GB each). One run, not a distribution: this host is shared and noisy (an identical job once
took 7x longer), so read the numbers as orders of magnitude.

To add a method, add an entry to ``METHODS``: a name and a function ``(pretrained, finetuned) -> body``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def gpt2_small_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, positions: int = 1024) -> dict[str, tuple]:
    """The ``GPT2Model`` state dict's shapes, in state-dict order (Conv1D weights [in, out])."""
    shapes: dict[str, tuple] = {"wte.weight": (vocab, width), "wpe.weight": (positions, width)}
    for layer in range(layers):
        prefix = f"h.{layer}."
        shapes.update({
            prefix + "ln_1.weight": (width,), prefix + "ln_1.bias": (width,),
            prefix + "attn.c_attn.weight": (width, 3 * width), prefix + "attn.c_attn.bias": (3 * width,),
            prefix + "attn.c_proj.weight": (width, width), prefix + "attn.c_proj.bias": (width,),
            prefix + "ln_2.weight": (width,), prefix + "ln_2.bias": (width,),
            prefix + "mlp.c_fc.weight": (width, 4 * width), prefix + "mlp.c_fc.bias": (4 * width,),
            prefix + "mlp.c_proj.weight": (4 * width, width), prefix + "mlp.c_proj.bias": (width,),
        })
    shapes.update({"ln_f.weight": (width,), "ln_f.bias": (width,)})
    return shapes


def random_pool(n: int = 7, seed: int = 0) -> tuple[StateDict, dict[str, StateDict]]:
    """θ0 and n fine-tuned bodies θ0 + 1e-3·noise, fp32, at GPT-2-small size."""
    from mergelit.tasks import TASKS

    g = torch.Generator().manual_seed(seed)
    shapes = gpt2_small_shapes()
    pretrained = {key: torch.randn(shape, generator=g).mul_(0.02) for key, shape in shapes.items()}
    finetuned = {
        task: {key: torch.randn(shape, generator=g).mul_(1e-3).add_(pretrained[key]) for key, shape in shapes.items()}
        for task in (TASKS * ((n + len(TASKS) - 1) // len(TASKS)))[:n]
    }
    return pretrained, finetuned


def _dare_task_arithmetic(pretrained: StateDict, finetuned: dict[str, StateDict]) -> StateDict:
    from mergelit.methods.dare import dare_task_arithmetic_merge

    return dare_task_arithmetic_merge(pretrained, finetuned)


def _dare_ties_merging(pretrained: StateDict, finetuned: dict[str, StateDict]) -> StateDict:
    from mergelit.methods.dare import dare_ties_merge

    return dare_ties_merge(pretrained, finetuned)


def _breadcrumbs(pretrained: StateDict, finetuned: dict[str, StateDict]) -> StateDict:
    from mergelit.methods.breadcrumbs import breadcrumbs_merge

    return breadcrumbs_merge(pretrained, finetuned)


def _breadcrumbs_per_row(pretrained: StateDict, finetuned: dict[str, StateDict]) -> StateDict:
    from mergelit.methods.breadcrumbs import breadcrumbs_merge

    return breadcrumbs_merge(pretrained, finetuned, per_row=True)


# name -> (pretrained, finetuned) -> merged body, with the method's defaults.
METHODS: dict[str, Callable[[StateDict, dict[str, StateDict]], StateDict]] = {
    "dare_task_arithmetic": _dare_task_arithmetic,
    "dare_ties_merging": _dare_ties_merging,
    "breadcrumbs": _breadcrumbs,
    "breadcrumbs_per_row": _breadcrumbs_per_row,
}


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def measure(name: str, n: int = 7) -> dict:
    """Build the random pool and time ``METHODS[name]`` once, in this process."""
    pretrained, finetuned = random_pool(n)
    before = _peak_rss_gib()
    start = time.perf_counter()
    merged = METHODS[name](pretrained, finetuned)
    seconds = time.perf_counter() - start
    assert set(merged) == set(pretrained)
    peak = _peak_rss_gib()
    return {
        "method": name,
        "n": n,
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 2),
        "peak_rss_gib": round(peak, 2),
        "above_pool_gib": round(peak - before, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="*", help=f"some of: {', '.join(METHODS)}")
    parser.add_argument("--n", type=int, default=7, help="fine-tuned bodies in the pool (default 7)")
    parser.add_argument("--list", action="store_true", help="list the methods and exit")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure one, print JSON
    args = parser.parse_args()
    if args.list:
        print("\n".join(METHODS))
        return
    if args.one:
        print(json.dumps(measure(args.one, args.n)))
        return
    for name in args.methods or METHODS:
        if name not in METHODS:
            parser.error(f"unknown method {name!r}; the methods are {', '.join(METHODS)}")
        out = subprocess.run(
            [sys.executable, __file__, "--one", name, "--n", str(args.n)],
            check=True, capture_output=True, text=True, env=os.environ,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(
            f"{result['method']:24s} n={result['n']} threads={result['threads']}  {result['seconds']:8.2f} s  "
            f"peak RSS {result['peak_rss_gib']:6.2f} GiB ({result['above_pool_gib']:+.2f} above the pool)",
            flush=True,
        )


if __name__ == "__main__":
    main()

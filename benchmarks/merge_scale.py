"""Merge scale: time and peak RSS of Simple Average, Task Arithmetic and TIES at GPT-2-small size.

    python benchmarks/merge_scale.py                       # N = 2 4 7 14, all three methods
    python benchmarks/merge_scale.py --n 7 --methods ties  # TIES τm at N = 7 only

Random weights (GPT-2 small shapes: 124 M parameters, vocabulary 50,257) written once as
safetensors checkpoints under --root. Each measurement runs in a fresh process: it imports
mergelit, records its RSS (the runtime's footprint), merges, and reports the time and the peak
RSS above that footprint in units of one body (124 M fp32 = 498 MB). The baseline measured in the
same run is the in-memory merge (every body loaded with from_pretrained, then the pure function):
the script prints streamed / in-memory ratios and checks that both give the same bits.
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

TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")


def write_checkpoints(root: Path, n: int, n_layer: int, n_embd: int) -> dict:
    """θ0 and n fine-tuned classifiers (task names cycle through GLUE's; copies beyond 7 reuse a name)."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), bos_token_id=50256, eos_token_id=50256)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT2Model(config).state_dict().items()}
    paths = {}
    for index in range(n + 1):
        folder = root / ("pretrained" if index == 0 else f"model_{index}")
        paths[index] = str(folder)
        if (folder / "model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(index)
        scale = 0.02 if index == 0 else 0.001 * index
        state = {"transformer." + k: torch.randn(shape, generator=generator) * scale for k, shape in shapes.items()}
        if index:
            task = TASKS[(index - 1) % len(TASKS)]
            labels = 3 if task == "mnli" else 2
            state["score.weight"] = torch.randn(labels, n_embd, generator=generator) * 0.02
            cfg = config.to_dict() | {"architectures": ["GPT2ForSequenceClassification"], "pad_token_id": 50256,
                                      "id2label": {str(i): f"LABEL_{i}" for i in range(labels)},
                                      "label2id": {f"LABEL_{i}": i for i in range(labels)}}
        else:
            cfg = config.to_dict() | {"architectures": ["GPT2LMHeadModel"]}
        if index:  # fine-tuned: θ0 plus a task-specific delta
            base = _load_pretrained(root)
            for key, value in base.items():
                state[key] = state[key] + value
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(cfg))
    return paths


def _load_pretrained(root: Path):
    from safetensors.torch import load_file

    return load_file(str(root / "pretrained" / "model.safetensors"))


def measure(root: str, n: int, method: str, layout: str) -> dict:
    """Run in a fresh process: merge and report seconds, footprint and peak RSS (bytes)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import mergelit.methods.simple_average as sa
    import mergelit.methods.task_arithmetic as ta
    import mergelit.methods.ties as ties
    from mergelit.pool import ModelPool

    # Real task names for the first seven, then the same checkpoints' folders reused under a
    # name the pool knows is impossible: the pool is keyed by GLUE task, so N > 7 streams the
    # extra models through a pool subclass with synthetic task names.
    folders = [str(Path(root) / f"model_{i}") for i in range(1, n + 1)]
    pool = _pool_of(ModelPool, str(Path(root) / "pretrained"), folders)
    footprint = _rss()
    start = time.perf_counter()
    if layout == "streamed":
        if method == "simple_average":
            result = sa.simple_average_streamed(pool)
        elif method == "task_arithmetic":
            result = ta.add_scaled_streamed(pool, ta.task_vector_sum_streamed(pool), 0.3)
        else:
            tau = ties.ties_task_vector_streamed(pool, 20, "sum")
            tau_seconds = time.perf_counter() - start
            result = ta.add_scaled_streamed(pool, tau, 0.3)
    else:
        theta0 = pool.pretrained_body()
        bodies = pool.finetuned_bodies()
        if method == "simple_average":
            result = sa.simple_average_merge(bodies)
        elif method == "task_arithmetic":
            result = ta.task_arithmetic_merge(theta0, bodies, 0.3)
        else:
            tau = ties.ties_task_vector(theta0, bodies, 20, "sum")
            tau_seconds = time.perf_counter() - start
            from mergelit.state_dict import add_scaled

            result = add_scaled(theta0, tau, 0.3)
    seconds = time.perf_counter() - start
    peak = _peak()  # the merge's peak: before the digest below, which makes copies of its own
    body_bytes = sum(t.numel() * 4 for t in result.values())
    digest = _digest(result)
    out = {"seconds": seconds, "footprint": footprint, "peak": peak, "body_bytes": body_bytes, "digest": digest}
    if method == "ties":
        out["tau_seconds"] = tau_seconds
    return out


def _pool_of(ModelPool, pretrained: str, folders: list[str]):
    """A ModelPool over any number of classifier folders (tasks named t00, t01, ... beyond GLUE's)."""

    class ScalePool(ModelPool):
        def __init__(self):
            super().__init__(pretrained, {"cola": folders[0]}, None)
            self.tasks = [f"t{i:02d}" for i in range(len(folders))]
            self.finetuned_paths = dict(zip(self.tasks, folders))

        def _head_and_config(self, task):  # the heads are not what this benchmark measures
            self._check_task(task)
            return (None, None)

        def _load(self, task):
            self._check_task(task)
            if task not in self._finetuned:
                from transformers import GPT2ForSequenceClassification
                import torch

                model = GPT2ForSequenceClassification.from_pretrained(self.finetuned_paths[task], dtype=torch.float32)
                self._finetuned[task] = ({k: v.detach() for k, v in model.transformer.state_dict().items()}, None, None)
            return self._finetuned[task]

    return ScalePool()


def _digest(state) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(state[key].contiguous().view(-1).numpy().tobytes())
    return digest.hexdigest()


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/mergelit_bench/merge_scale")
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 7, 14])
    parser.add_argument("--methods", nargs="+", default=["simple_average", "task_arithmetic", "ties"])
    parser.add_argument("--layouts", nargs="+", default=["streamed", "in_memory"])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, n, method = args.child
        print(json.dumps(measure(root, int(n), method, args.layouts[0])))
        return
    root = Path(args.root)
    write_checkpoints(root, max(args.n), args.n_layer, args.n_embd)
    print(f"{'method':16} {'N':>3} {'layout':10} {'seconds':>8} {'τm s':>6} {'peak-footprint (bodies)':>24}")
    for method in args.methods:
        for n in args.n:
            results = {}
            for layout in args.layouts:
                command = [sys.executable, __file__, "--layouts", layout, "--child", str(root), str(n), method]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results[layout] = r = json.loads(output.strip().splitlines()[-1])
                bodies = (r["peak"] - r["footprint"]) / r["body_bytes"]
                tau = f"{r['tau_seconds']:6.1f}" if "tau_seconds" in r else "     -"
                print(f"{method:16} {n:>3} {layout:10} {r['seconds']:8.1f} {tau} {bodies:24.2f}", flush=True)
            if len(results) == 2:
                s, m = results["streamed"], results["in_memory"]
                same = "identical bits" if s["digest"] == m["digest"] else "DIFFERENT BITS"
                print(f"{'':16} {n:>3} ratio      time streamed/in-memory {s['seconds'] / m['seconds']:.2f}, "
                      f"memory {(s['peak'] - s['footprint']) / max(1, m['peak'] - m['footprint']):.2f}; {same}", flush=True)


if __name__ == "__main__":
    main()

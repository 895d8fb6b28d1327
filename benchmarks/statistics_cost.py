"""Statistics at GPT-2-small width: Fisher and RegMean statistics per example as a multiple of one
forward pass; and the streamed Fisher / RegMean merge's peak memory at N models (flat in N).

    OMP_NUM_THREADS=1 python benchmarks/statistics_cost.py                  # statistics, 4 layers
    OMP_NUM_THREADS=1 python benchmarks/statistics_cost.py --padded         # + RegMean count_padding true
    OMP_NUM_THREADS=1 python benchmarks/statistics_cost.py --memory 2 7 14  # + the merge's memory at N = 2, 7, 14

(Not ``statistics.py``: a script's folder comes first on ``sys.path``, so that name would hide the
standard library's ``statistics`` module from every script here, e.g. ``startup.py``, and from lightning.)

**Statistics.** A pool at GPT-2-small width (n_embd 768, 12 heads, GPT-2's vocabulary of 50,257;
``--n-layer`` blocks, 4 by default instead of 12 to fit a shared 2-core CPU: the per-block work is
GPT-2 small's, the embedding is the full one), ``mergelit.synthetic.write_pool``; GLUE-like train
rows (``benchmarks/glue_like.py``: GLUE's per-task GPT-2 token lengths), ``--examples`` per task.
For every task, in this one process, on the same drawn rows in the same batches of 32 (seed 42):

- **forward**: the task's fine-tuned body + head under ``torch.inference_mode``, collating each
  batch from the tokenized rows as the predict loop's DataLoader does (timed before and after the
  statistics; the ratios use the faster);
- **Fisher**: ``mergelit.statistics.fisher_statistics`` with a CPU Lightning ``Trainer``;
- **RegMean**: ``gram_statistics(count_padding=False)`` (real tokens, per-batch padding), and with
  ``--padded`` ``count_padding=True`` (rows padded to 512, every position counted: FusionBench's).

The statistics' own figure is the predict loop's time (what the cache stores and a cached run
reports as ``prepare_original_seconds``); the whole call adds drawing the rows, fingerprinting the
model and the rows, building the body and writing the cache file.

**No per-example loop in the Fisher estimator.** ``FisherStatistics.predict_step`` runs one forward
and one ``torch.autograd.grad`` per batch: the spec's (FusionBench's) estimator squares the gradient
of the batch *sum* S = Σ_batch Σ_class √p · log_softmax(logits), so there is no loop over examples
to vectorise with ``torch.func``. A per-example estimator (Σ over examples of squared per-example
gradients) would be another estimator with other numbers; none is offered.

**Memory flat in N** (``--memory N ...``). Random checkpoints at the same width (``--memory-layers``
blocks, 2 by default; ``benchmarks/merge_scale.py``'s writer) and random statistics files (a Fisher
per body tensor; a well-conditioned Gram per Conv1D), read through ``StoredStatistics`` as a merge
after ``prepare`` reads them. Each N runs in a fresh process: ``method.merge()`` under
``mergelit.costs.measured`` (peak resident memory above the resident memory at its start), printed
in units of one fp32 body; at the smallest N also the whole-body oracle (every body and statistic
in memory: ``fisher_merge`` / ``regmean_merge``), with a check that both give the same bits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import glue_like  # noqa: E402

N_EMBD, N_HEAD = 768, 12  # GPT-2 small's width
BATCH_SIZE, SEED = 32, 42  # the statistics functions' defaults
TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")


# ---- statistics per example / one forward pass ------------------------------------------------
def write_statistics_pool(root: Path, n_layer: int) -> dict:
    from mergelit.synthetic.fixtures import write_pool

    folder = root / f"pool_{n_layer}x{N_EMBD}"
    if (folder / "sst2" / "model.safetensors").exists():
        return {"pretrained": str(folder / "pretrained"), "finetuned": {t: str(folder / t) for t in TASKS},
                "tokenizer": str(folder / "pretrained")}
    return write_pool(folder, tasks=TASKS, n_layer=n_layer, n_embd=N_EMBD, n_head=N_HEAD)


def forward_seconds(pool, datamodule, num_examples: int) -> float:
    """Seconds of one inference forward pass (body + head) over every task's drawn rows, same batches."""
    import torch

    from mergelit.gpt2 import build_body, build_head, last_non_pad_index
    from mergelit.statistics import batches_of, draw_examples

    total = 0.0
    for task in pool.tasks:
        dataset = datamodule.train_dataset(task)
        batches = batches_of(draw_examples(len(dataset), num_examples, SEED), BATCH_SIZE)
        body, head = build_body(pool.body_config(), pool.finetuned_body(task)).eval(), build_head(pool.head(task))
        pad = pool.task_config(task).pad_token_id
        start = time.perf_counter()
        with torch.inference_mode():
            for indices in batches:
                batch = datamodule.collate([dataset[i] for i in indices])
                hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
                last = last_non_pad_index(batch["input_ids"], pad)
                head(hidden[torch.arange(len(hidden)), last]).argmax(-1)
        total += time.perf_counter() - start
    return total


def statistics_cost(args) -> None:
    import lightning as L
    import torch

    from mergelit.glue import GLUEDataModule
    from mergelit.pool import ModelPool
    from mergelit.statistics import draw_examples, fisher_statistics, gram_statistics, read_statistics

    root = Path(args.root)
    paths = write_statistics_pool(root, args.n_layer)
    data = root / f"train_rows_{args.examples}"
    if not (data / "sst2").exists():
        glue_like.write(data, fraction=0.001, train_rows=args.examples)
    pool = ModelPool(**paths)
    examples = len(pool.tasks) * args.examples
    with tempfile.TemporaryDirectory() as folder:
        datamodule = GLUEDataModule(tasks=list(pool.tasks), tokenizer=paths["tokenizer"], path=str(data),
                                    batch_size=BATCH_SIZE, cache_dir=os.path.join(folder, "tokenized"))
        tokens = 0
        for task in pool.tasks:  # tokenize and read every body once before any timing
            dataset = datamodule.train_dataset(task)
            tokens += sum(dataset.select(draw_examples(len(dataset), args.examples, SEED))["length"])
            pool.finetuned_body(task)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False)
        forward = [forward_seconds(pool, datamodule, args.examples)]
        runs = {"Fisher": (fisher_statistics, {}), "RegMean, count_padding false": (gram_statistics, {"count_padding": False})}
        if args.padded:
            runs["RegMean, count_padding true (pad to 512)"] = (gram_statistics, {"count_padding": True})
        measured = {}
        for name, (function, options) in runs.items():
            cache = Path(folder) / "statistics" / name.replace(" ", "_")  # empty: computed, not loaded
            start = time.perf_counter()
            function(trainer, datamodule, pool, args.examples, BATCH_SIZE, SEED, cache_dir=cache, **options)
            call = time.perf_counter() - start
            loop = sum(float(read_statistics(f)[1]["seconds"]) for f in cache.rglob("*.safetensors"))
            measured[name] = (loop, call)
        forward.append(forward_seconds(pool, datamodule, args.examples))
    base = min(forward)
    print(f"GPT-2 width {N_EMBD} ({N_HEAD} heads), {args.n_layer} layers; {len(pool.tasks)} tasks × {args.examples} "
          f"train examples ({tokens} real tokens, {tokens / examples:.1f} per example), batch {BATCH_SIZE}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"forward passes: {forward[0]:.2f} s before, {forward[1]:.2f} s after the statistics\n")
    print("| run | ms per example | / one forward pass |\n|---|---|---|")
    print(f"| forward (body + head, inference mode) | {1e3 * base / examples:.2f} | 1.0× |")
    for name, (loop, call) in measured.items():
        print(f"| {name}: predict loop | {1e3 * loop / examples:.2f} | **{loop / base:.2f}×** |")
        print(f"| {name}: whole call (draw, fingerprints, body, cache write) | {1e3 * call / examples:.2f} | {call / base:.2f}× |")


# ---- the streamed merge's memory at N models ----------------------------------------------------
def write_memory_pool(root: Path, n: int, n_layer: int) -> dict:
    """N random checkpoints (merge_scale.py's writer) and a Fisher and Grams file per model."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2Model

    from merge_scale import write_checkpoints

    folders = write_checkpoints(root, n, n_layer, N_EMBD)
    config = GPT2Config(n_layer=n_layer, n_embd=N_EMBD, n_head=N_HEAD)
    with torch.device("meta"):
        body = GPT2Model(config)
        shapes = {k: v.shape for k, v in body.state_dict().items()}
        inputs = {name: module.weight.shape[0] for name, module in body.named_modules() if type(module).__name__ == "Conv1D"}
    for index in range(1, n + 1):
        fisher, grams = root / "fisher" / f"model_{index}.safetensors", root / "regmean" / f"model_{index}.safetensors"
        if fisher.exists() and grams.exists():
            continue
        generator = torch.Generator().manual_seed(1000 + index)
        fisher.parent.mkdir(parents=True, exist_ok=True)
        grams.parent.mkdir(parents=True, exist_ok=True)
        scale = 10.0 ** (index % 3 - 1)  # Fishers of different sizes: the normalisation matters
        save_file({k: torch.randn(s, generator=generator).abs_() * scale for k, s in shapes.items()}, str(fisher))
        tensors = {}
        for name, width in inputs.items():  # low rank plus the identity: symmetric, well conditioned
            low = torch.randn(width, 64, generator=generator, dtype=torch.float64)
            tensors[name] = low @ low.T / 64 + torch.eye(width, dtype=torch.float64)
        save_file(tensors, str(grams))
    return {"root": str(root), "folders": folders}


def _pool_of(pretrained: str, folders: list[str]):
    """A ModelPool over any number of classifier folders (tasks t00, t01, ...: the pool is keyed by
    GLUE task, and N > 7 needs more names). The heads are not what this measures."""
    from mergelit.pool import ModelPool

    class ScalePool(ModelPool):
        def __init__(self):
            super().__init__(pretrained, {"cola": folders[0]}, None)
            self.tasks = [f"t{i:02d}" for i in range(len(folders))]
            self.finetuned_paths = dict(zip(self.tasks, folders))

        def _head_and_config(self, task):
            self._check_task(task)
            return (None, None)

    return ScalePool()


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_merge(root: str, n: int, method: str, oracle: bool) -> dict:
    """In a fresh process: merge N models streamed (and, with ``oracle``, with every body in memory)."""
    import hashlib

    import torch

    from mergelit import costs
    from mergelit.methods.fisher import FisherMerging, fisher_merge
    from mergelit.methods.regmean import RegMean, regmean_merge
    from mergelit.statistics import StoredStatistics

    def digest(state) -> str:
        hashed = hashlib.sha256()
        for key in sorted(state):
            hashed.update(state[key].contiguous().view(-1).numpy().tobytes())
        return hashed.hexdigest()

    folders = [str(Path(root) / f"model_{i}") for i in range(1, n + 1)]
    pool = _pool_of(str(Path(root) / "pretrained"), folders)
    kind = "fisher" if method == "fisher" else "regmean"
    stored = StoredStatistics({task: Path(root) / kind / f"model_{i}.safetensors" for i, task in enumerate(pool.tasks, 1)})
    pool.keys()  # headers read before measuring
    footprint = _rss_bytes()
    with costs.measured() as streamed:
        merger = FisherMerging(pool) if method == "fisher" else RegMean(pool)
        merger.statistics = stored
        merged = merger.merge()
    body_bytes = sum(t.numel() * 4 for t in merged.values())
    out = {"seconds": streamed.seconds, "peak_gb": streamed.peak_gb, "footprint": footprint, "body_bytes": body_bytes,
           "digest": digest(merged)}
    if oracle:
        del merged
        with costs.measured() as whole:
            statistics = {t: {name: stored.tensor(t, name) for name in stored.names(t)} for t in pool.tasks}
            if method == "fisher":
                merged = fisher_merge(pool.pretrained_body(), pool.finetuned_bodies(), statistics)
            else:
                merged = regmean_merge(pool.finetuned_bodies(), statistics)
        out.update(oracle_seconds=whole.seconds, oracle_peak_gb=whole.peak_gb, oracle_digest=digest(merged))
    return out


def memory_flat(args) -> None:
    root = Path(args.root) / f"memory_{args.memory_layers}x{N_EMBD}"
    write_memory_pool(root, max(args.memory), args.memory_layers)
    print(f"\nStreamed merge at GPT-2 width {N_EMBD}, {args.memory_layers} layers; peak above the resident memory "
          f"at the merge's start, in fp32 bodies\n")
    print("| method | N | merge s | peak (bodies) | whole-body oracle: s | oracle peak (bodies) | same bits |\n|---|---|---|---|---|---|---|")
    for method in ("fisher", "regmean"):
        for n in sorted(args.memory):
            oracle = n == min(args.memory)
            command = [sys.executable, __file__, "--child", str(root), str(n), method, str(int(oracle))]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            r = json.loads(output.strip().splitlines()[-1])
            body_gb = r["body_bytes"] / 1e9
            row = f"| {method} | {n} | {r['seconds']:.1f} | {r['peak_gb'] / body_gb:.2f} |"
            if oracle:
                same = "yes" if r["digest"] == r["oracle_digest"] else "**NO**"
                row += f" {r['oracle_seconds']:.1f} | {r['oracle_peak_gb'] / body_gb:.2f} | {same} |"
            else:
                row += " | | |"
            print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/mergelit_bench/statistics")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--n-layer", type=int, default=4, help="blocks of the statistics pool (GPT-2 small: 12)")
    parser.add_argument("--examples", type=int, default=64, help="train examples per task")
    parser.add_argument("--padded", action="store_true", help="also RegMean with count_padding true (rows padded to 512)")
    parser.add_argument("--memory", type=int, nargs="*", default=[], help="numbers of models for the merge's memory")
    parser.add_argument("--memory-layers", type=int, default=2)
    parser.add_argument("--skip-statistics", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        root, n, method, oracle = args.child
        print(json.dumps(measure_merge(root, int(n), method, oracle == "1")))
        return
    if not args.skip_statistics:
        statistics_cost(args)
    if args.memory:
        memory_flat(args)


if __name__ == "__main__":
    main()

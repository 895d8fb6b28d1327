"""``mergelit demo``: the whole experiment offline, on CPU, in minutes (the driver; pretraining in ``pretrain.py``).

    mergelit demo                          # builds everything once, then prints the table
    mergelit demo --size full              # more rows, a wider model, every method's whole range
    mergelit demo --output_dir DIR --seed 1

The published experiment needs the hub (``gpt2``, seven ``tanganke/gpt2_<task>`` checkpoints, GLUE). The demo makes
a stand-in for each piece from ``--seed`` (steps 1-3, cached in the output folder), then runs the commands a user
runs on the real pool (step 4). The configs it writes under ``configs/`` rerun any step by hand. Everything runs on
CPU, whatever accelerator is present, so that a rerun reproduces the numbers.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import yaml
from lightning.pytorch.utilities import rank_zero_only

from mergelit.synthetic import FORMAT_VERSION as SYNTHETIC_FORMAT
from mergelit.tasks import TASKS

log = logging.getLogger("mergelit.demo")

# Bump when a change here changes what the cached steps build, so that old folders are rebuilt.
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class DemoSize:
    """How big each stand-in is (the presets below; ``small`` is the test suite's)."""

    num_train: int  # train rows per task (GLUE: 2.5k-364k)
    num_validation: int  # evaluation rows per task
    n_layer: int  # the pretrained GPT-2 (gpt2: 12 layers, 768 wide, 12 heads)
    n_embd: int
    n_head: int
    pretrain_epochs: int
    pretrain_learning_rate: float
    finetune_epochs: int  # the published pool: 3
    finetune_learning_rate: float  # the published pool: 5e-5, for a 124M model; small models need more
    num_statistics_examples: int  # Fisher / RegMean train examples per task (FusionBench: 256)
    adaptation_steps: int  # AdaMerging's steps (the paper: 500) and WUDI's (FusionBench: 400)
    search_points: Optional[int] = None  # each method's range thinned to this many values (None: all)


SIZES: dict[str, DemoSize] = {
    # The default: the first run (data, pretraining, fine-tuning, every method tuned) in minutes.
    "quick": DemoSize(num_train=800, num_validation=200, n_layer=2, n_embd=64, n_head=4, pretrain_epochs=1,
                      pretrain_learning_rate=2e-3, finetune_epochs=3, finetune_learning_rate=5e-4,
                      num_statistics_examples=64, adaptation_steps=20, search_points=3),
    # More rows, a wider model, the published three epochs: numbers that move less with the seed. Individual
    # accuracy is the same for a fine-tuning learning rate from 5e-4 to 2e-3; the merges are best at the lowest
    # (smaller task vectors interfere less), as on real pools.
    "full": DemoSize(num_train=2000, num_validation=400, n_layer=2, n_embd=128, n_head=4, pretrain_epochs=1,
                     pretrain_learning_rate=2e-3, finetune_epochs=3, finetune_learning_rate=5e-4,
                     num_statistics_examples=256, adaptation_steps=100),
    "small": DemoSize(num_train=96, num_validation=48, n_layer=1, n_embd=32, n_head=2, pretrain_epochs=1,
                      pretrain_learning_rate=2e-3, finetune_epochs=1, finetune_learning_rate=1e-3,
                      num_statistics_examples=32, adaptation_steps=5, search_points=2),
}


@rank_zero_only
def _stage(number: int, text: str) -> None:
    log.info(f"[demo {number}/4] {text}")


def _must_build(number: int, folder: Path, key: dict, reusing: str, building: str) -> bool:
    """Whether step ``number`` must (re)build ``folder``, emptied then: unless ``done.json`` there holds ``key``."""
    marker = folder / "done.json"
    if marker.is_file() and json.loads(marker.read_text()) == key:
        _stage(number, f"{reusing}: reusing {folder}")
        return False
    _stage(number, f"{building} -> {folder}")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return True


def _mark_done(folder: Path, key: dict) -> None:
    (folder / "done.json").write_text(json.dumps(key, indent=2) + "\n")


def _write_config(path: Path, comment: str, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{comment}\n{yaml.safe_dump(config, sort_keys=False)}")
    return path


def _csv_logger(logs: Path, name: str) -> dict:
    return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(logs), "name": name}}


def _trainer(epochs: int, logger) -> dict:
    """Pretraining's and fine-tuning's Trainer arguments (in the order ``configs/finetune.yaml`` shows them)."""
    return {"accelerator": "cpu", "devices": 1, "max_epochs": epochs, "logger": logger, "enable_checkpointing": False,
            "enable_model_summary": False, "log_every_n_steps": 10}


# True but expected for tiny CPU runs (few batches per epoch, no DataLoader workers); and the demo runs
# `mergelit fit` / `sweep` in-process with its own arguments, on purpose.
_EXPECTED_WARNINGS = (
    ".*does not have many workers.*", ".*smaller than the logging interval.*", ".*module\\(s\\) in eval mode.*",
    ".*LeafSpec.*", ".*Experiment logs directory.*", ".*args parameter is intended to run from within Python.*",
)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence Lightning's start-up lines, transformers' load reports (a fresh score head) and expected warnings."""
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as transformers_logging

    with contextlib.ExitStack() as restore:
        for logger in [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]:
            restore.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.WARNING)
        restore.callback(transformers_logging.set_verbosity, transformers_logging.get_verbosity())
        transformers_logging.set_verbosity_error()
        for module in (transformers_logging, datasets_logging):
            restore.callback(module.enable_progress_bar)
            module.disable_progress_bar()
        with warnings.catch_warnings():
            for message in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield


def build_data(root: Path, seed: int, size: DemoSize) -> tuple[Path, Path, dict]:
    """Step 1: synthetic GLUE (``root/glue``) and GPT-2's tokenizer (``root/tokenizer``); returns both folders and
    the step's cache key (later steps' keys include it)."""
    from mergelit.synthetic import write_glue, write_tokenizer

    # The generators' version too: new data from the same seed must not meet an old pool.
    key = {"format": [_FORMAT_VERSION, SYNTHETIC_FORMAT], "seed": seed, "num_train": size.num_train,
           "num_validation": size.num_validation}
    rows = f"{size.num_train} train / {size.num_validation} validation rows each"
    if _must_build(1, root, key, "Data", f"Data: {len(TASKS)} synthetic GLUE tasks, {rows}"):
        write_glue(root / "glue", seed=seed, num_train=size.num_train, num_validation=size.num_validation)
        write_tokenizer(root / "tokenizer")
        _mark_done(root, key)
    return root / "glue", root / "tokenizer", key


def build_pretrained(
    folder: Path, glue: Path, tokenizer: Path, data_key: dict, cache: Path, logs: Path, seed: int, size: DemoSize
) -> tuple[Path, dict]:
    """Step 2: a small GPT-2 trained as a causal LM on every task's training texts."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from mergelit.demo.pretrain import CausalLM, GLUECorpusDataModule
    from mergelit.finetune import export_checkpoint

    architecture = dict(n_layer=size.n_layer, n_embd=size.n_embd, n_head=size.n_head)
    key = {"data": data_key, "model": architecture, "epochs": size.pretrain_epochs,
           "learning_rate": size.pretrain_learning_rate}
    model_text = f"{size.n_layer} layers, {size.n_embd} wide, causal LM on the training texts"
    building = f"Pretrained GPT-2: {model_text} ({size.pretrain_epochs} epoch(s))"
    if not _must_build(2, folder, key, "Pretrained GPT-2", building):
        return folder, key
    L.seed_everything(seed, verbose=False)
    data = GLUECorpusDataModule(tokenizer=str(tokenizer), path=str(glue), batch_size=32, shuffle_seed=seed,
                                cache_dir=str(cache))
    model = CausalLM(**architecture, learning_rate=size.pretrain_learning_rate)
    trainer = L.Trainer(**_trainer(size.pretrain_epochs, CSVLogger(str(logs), name="pretrain")))
    trainer.fit(model, datamodule=data)
    export_checkpoint(model.model, folder, data.tokenizer)
    _mark_done(folder, key)
    return folder, key


def build_pool(
    root: Path, pretrained: Path, pretrained_key: dict, glue: Path, cache: Path, logs: Path, configs: Path, seed: int,
    size: DemoSize,
) -> dict[str, str]:
    """Step 3: one classifier per task, fine-tuned from ``pretrained`` with ``mergelit fit``."""
    from mergelit.finetune import fit_command

    config = _write_config(
        configs / "finetune.yaml",
        f"# Fine-tunes the demo's pretrained GPT-2 on one task (what `mergelit demo` ran for each task):\n"
        f"#   mergelit fit -c {configs / 'finetune.yaml'} --data.task sst2 --export.dirpath DIR",
        {"seed_everything": seed,
         "model": {"pretrained": str(pretrained), "learning_rate": size.finetune_learning_rate},
         "data": {"path": str(glue), "batch_size": 32, "shuffle_seed": seed, "cache_dir": str(cache)},
         "trainer": _trainer(size.finetune_epochs, _csv_logger(logs, "finetune"))},
    )
    key = {"pretrained": pretrained_key, "config": config.read_text()}
    paths = {}
    for index, task in enumerate(TASKS, 1):
        folder = root / task
        paths[task] = str(folder)
        count, epochs = f"({index}/{len(TASKS)})", f"{size.finetune_epochs} epoch(s)"
        if _must_build(3, folder, key, f"Fine-tuned {task} {count}", f"Fine-tuning {task} {count}, {epochs}"):
            fit_command(["-c", str(config), "--data.task", task, "--export.dirpath", str(folder)])
            _mark_done(folder, key)
    return paths


def method_specs(size: DemoSize, statistics_cache: Path) -> list[dict]:
    """Every method meant for comparison (``mergelit.methods``, found by itself), as ``model:`` config values: its
    recommended arguments, its own range to choose from (``search``) and the demo's sizes for the arguments it has
    (statistics examples; a demo-sized budget of steps for the iterative methods, AdaMerging and WUDI)."""
    from mergelit.sweep import every_method
    from mergelit.tables import method_class

    n, steps = size.num_statistics_examples, size.adaptation_steps
    overrides = {"cache_dir": str(statistics_cache), "num_fisher_examples": n, "num_regmean_examples": n,
                 "max_steps": steps, "iter_num": steps}
    specs = []
    for spec in every_method(tuned=True):
        parameters = inspect.signature(method_class(spec["class_path"]).__init__).parameters
        extra = {k: v for k, v in overrides.items() if k in parameters}
        if extra:
            spec = {**spec, "init_args": {**spec.get("init_args", {}), **extra}}
        if "grid" in spec and size.search_points:
            spec = {**spec, "grid": {k: thinned(v, size.search_points) for k, v in spec["grid"].items()}}
        specs.append(spec)
    return specs


def thinned(values: list, count: int) -> list:
    """``count`` values spread evenly over ``values``, both ends included (all of them if fewer)."""
    if len(values) <= count:
        return list(values)
    if count == 1:
        return [values[len(values) // 2]]
    return [values[round(i * (len(values) - 1) / (count - 1))] for i in range(count)]


def evaluate(
    out: Path, pool: dict, glue: Path, cache: Path, statistics_cache: Path, logs: Path, configs: Path, seed: int,
    size: DemoSize,
) -> tuple[Path, Path]:
    """Step 4: the 7x7 cross-task sweep and every method, each run as ``mergelit test`` runs."""
    from mergelit.sweep import compare_command, sweep_command

    base = _write_config(
        configs / "pool.yaml",
        f"# The demo's pool and data; combine with any method config, e.g.\n"
        f"#   mergelit test -c {configs / 'pool.yaml'} -c configs/methods/task_arithmetic.yaml",
        {"seed_everything": seed, "pool": pool,
         # Every run scores the rows outside the dev split, so the individual models' accuracy (the
         # Norm. column's denominator) is on the rows each method is scored on.
         "data": {"path": str(glue), "batch_size": 64, "cache_dir": str(cache), "hold_out_dev": True},
         "trainer": {"accelerator": "cpu", "devices": 1, "logger": _csv_logger(logs, "merge")}},
    )
    individual = _write_config(
        configs / "individual_7x7.yaml",
        f"# Each fine-tuned body under every task's head (the 7x7 table; its diagonal is the individual row):\n"
        f"#   mergelit sweep -c {base} -c {configs / 'individual_7x7.yaml'}",
        {"model": {"class_path": "mergelit.methods.Individual", "init_args": {"task": TASKS[0]}},
         "sweep": {"percent": True, "grid": {"model.init_args.task": list(TASKS)}}},
    )
    specs = method_specs(size, statistics_cache)
    methods = _write_config(
        configs / "methods.yaml",
        f"# Every merging method on the demo's pool, each at its own choice on the dev rows (the validation\n"
        f"# rows held out of scoring); only the selected point of a range is scored on the other rows:\n"
        f"#   mergelit compare -c {base} -c {configs / 'methods.yaml'}",
        {"sweep": {"select_on": "dev", "oracle": False, "grid": {"model": specs}}},
    )
    results = out / "results"
    if results.exists():
        shutil.rmtree(results)  # a rerun merges and evaluates again (statistics stay cached)
    _stage(4, f"Merging: the 7x7 cross-task table, then {len(specs)} methods -> {results}")
    results.mkdir(parents=True)
    # The sweeps' own tables go to a log: the demo prints one leaderboard of both at the end.
    with open(results / "sweeps.log", "w") as printed, contextlib.redirect_stdout(printed):
        sweep_command(["-c", str(base), "-c", str(individual), "--output_dir", str(results / "individual")])
        compare_command(["-c", str(base), "-c", str(methods), "--output_dir", str(results / "methods")])
    return results / "individual", results / "methods"


def run_demo(
    output_dir: str = "lightning_logs/demo", seed: int = 0, size: Literal["quick", "full", "small"] = "quick"
) -> Path:
    """Build a small pool offline (cached), merge it with every method, print and save the table.

    Args:
        output_dir: where everything goes: data, pool, configs, logs, results, table.md/csv, plot.png.
            A rerun into it with the same seed and size reuses the data and the pool.
        seed: the seed of the data, the pretraining and the fine-tuning (heads, batch order).
        size: ``quick`` (the default: a few minutes on 2 idle CPU cores the first time), ``full``
            (more rows, a wider model, three fine-tuning epochs: several times longer) or ``small``
            (seconds; numbers near chance, for tests).
    """
    from mergelit import tables

    if size not in SIZES:
        raise ValueError(f"Unknown demo size {size!r}; choose one of {', '.join(SIZES)}.")
    preset = SIZES[size]
    if "OMP_NUM_THREADS" not in os.environ:
        # The demo's models are tiny: their matrix products gain nothing from a second thread, and
        # on a busy machine two threads per product were up to 25x slower than one.
        import torch

        torch.set_num_threads(1)
    out = Path(output_dir).absolute()
    cache, logs, configs = out / "cache" / "tokenized", out / "logs", out / "configs"
    start = time.monotonic()
    with _quiet_libraries():
        glue, tokenizer, data_key = build_data(out / "data", seed, preset)
        pretrained, pretrained_key = build_pretrained(out / "pool" / "pretrained", glue, tokenizer, data_key, cache,
                                                      logs, seed, preset)
        finetuned = build_pool(out / "pool", pretrained, pretrained_key, glue, cache, logs, configs, seed, preset)
        pool = {"pretrained": str(pretrained), "finetuned": finetuned}
        statistics = out / "cache" / "statistics"
        individual, methods = evaluate(out, pool, glue, cache, statistics, logs, configs, seed, preset)
        # The leaderboard: the individual models (7x7 diagonal), then every method in run order (a method with a
        # range: its point selected on dev), as table.md, table.csv and plot.png.
        rows = tables.collect_rows([individual, methods])
        title = "mergelit demo: accuracy against merge cost"
        markdown, _, _ = tables.write_leaderboard(out, rows, tables.check_same_tasks(rows), title=title)
    minutes, seconds = divmod(round(time.monotonic() - start), 60)
    print(
        f"\nmergelit demo ({size}, seed {seed}): synthetic GLUE, accuracy (%) on each task's validation split, "
        f"each task scored with its own fine-tuned head.\n\n{markdown.read_text()}\n"
        f"Table: {out / 'table.md'} (and table.csv); accuracy against merge cost: {out / 'plot.png'}; "
        f"7x7 cross-task table: {individual / 'table.md'}. Took {minutes} min {seconds} s."
    )
    return out


def demo_command(argv: Optional[Sequence[str]] = None) -> None:
    """``mergelit demo ARGS``."""
    from jsonargparse import auto_cli

    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    auto_cli(run_demo, args=list(argv) if argv is not None else None, as_positional=False, prog="mergelit demo")

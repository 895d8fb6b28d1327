"""``mergelit sweep``: a grid of config values, run in one process; a report per point, a table, a plot.

    mergelit sweep -c configs/gpt2_glue.yaml -c configs/methods/task_arithmetic.yaml -c configs/sweeps/scaling_factor.yaml
    mergelit sweep ... --sweep.select_on dev          # every λ on the dev rows, the chosen one on validation
    mergelit compare -c configs/gpt2_glue.yaml -c configs/sweeps/methods_tuned.yaml   # each method at its own choice

The grid is YAML: ``sweep: {grid: {model.init_args.scaling_factor: [0.0, 0.1, ...]}}``. Keys are
the dotted names ``--print_config`` shows (any group: ``model.init_args.*``, ``data.*``, ...;
``model`` itself takes whole methods, each possibly with its own ``grid:`` of arguments); several
keys make their cartesian product. The output folder (``--output_dir``, default: the run's log
folder) receives one report JSON per point scored on validation, named after it
(``scaling_factor=0.3.json``), ``table.md``, ``table.csv``, ``plot.png`` (lines for one numeric
key, else a heatmap; a methods sweep run by ``compare``: the leaderboard), ``config.yaml``, the
manifest ``sweep.json`` and, with selection, ``<point>.criterion.json`` and ``selection.json``.

Design, and why:

- **A point is a ``mergelit test`` run.** Its config is parsed by ``MergeCLI``'s parser from the
  same arguments with ``--KEY=VALUE`` appended for each swept key, then seeded and run through
  ``mergelit.run.run_test``. So a point's report equals a separate run's, and a ``wandb agent``
  calling ``mergelit test ... --KEY=VALUE`` gets the same numbers. Every point's config is parsed
  (validated) before the first point runs.
- **A sweep holds a parser; it is not one.** ``SweepRunner`` keeps a parse-only ``MergeCLI``
  (its parser has the ``sweep:`` group, ``--output_dir`` and ``--overwrite``, and raises instead
  of exiting, so that a bad point is named) and makes each point's objects itself.
- **Shared explicitly.** The pool and the datamodule are made once (once per distinct arguments,
  if the grid sweeps ``pool.*`` / ``data.*``) and handed to every point: the pool loads each
  checkpoint once and keeps what methods compute through ``MergeMethod.reused`` (Σ τi, TIES's
  τm: ``pool.keep_reused``), the datamodule tokenizes once. CSV/TensorBoard loggers are shared
  (one log folder). Each point gets its own method, trainer and W&B logger (one W&B run per
  point, in one group).
- **Scoring only what is needed.** ``select_on: none``: every point is scored on validation.
  ``select_on: dev | agreement``: every point is scored on the dev rows only (its criterion
  file), then the selection step (``mergelit.selection.write_selection``) picks each method's
  point from those files alone and writes ``selection.json``, then only the selected points are
  scored on validation, each with a new method merged from scratch, so that its report (costs
  included) is that of ``mergelit test`` of that point. A method of one point (nothing to choose)
  is scored on validation and on the dev rows in the first pass, with one merge.
  ``--sweep.oracle true`` scores every point on validation in the first pass, with its dev
  criterion (for the oracle rows; the merge costs of these reports then benefit from the reuse
  above). The selection never rewrites a report.
- **Resume.** ``sweep.json`` records a fingerprint of the config without the swept keys and the
  settings that cannot change numbers (logger, progress bar, workers, the ``sweep:`` group). A
  rerun into the same folder skips points whose report or criterion is complete, re-does missing
  or partial ones, and refuses a folder written by another config unless ``--overwrite``.
  Reports are written atomically.
- **Several processes (DDP).** Every rank runs the same points (``trainer.test`` is collective)
  and computes the same criterion values (the dev rows are scored whole on every rank); only
  rank 0 writes files and W&B runs.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import yaml
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from mergelit import costs, progress, selection, tables, tracking
from mergelit.cli import HintingArgumentParser, MergeCLI, fusionbench_args, parse_config
from mergelit.errors import MergelitError
from mergelit.glue import GLUEDataModule
from mergelit.grid import (
    ALL_METHODS,
    TUNED_METHODS,
    MANIFEST_FORMAT,
    PLACEHOLDER_MODEL,
    Point,
    Sweep,
    check_grid,
    file_safe,
    fingerprint,
    fingerprint_config,
    grid_points,
    is_complete,
    is_placeholder,
    plain,
    prepare_folder,
    weights_fingerprint,
)
from mergelit.methods import MergeMethod, method_classes
from mergelit.pool import ModelPool
from mergelit.report import ReportWriter, atomic_write_text
from mergelit.run import run_test


# ---- making a point's objects from its parsed config ----------------------------------------
def import_object(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate(value: Any) -> Any:
    """A parsed config value with every ``{class_path, init_args}`` in it made into its object
    (jsonargparse has checked the arguments already), except a method's config, which a wrapper
    builds on its own pool; other values as they are."""
    value = plain(value)
    if isinstance(value, list):
        return [instantiate(item) for item in value]
    if isinstance(value, dict) and "class_path" in value:
        cls = import_object(value["class_path"])
        if isinstance(cls, type) and issubclass(cls, MergeMethod):
            return value  # a wrapper's base method: the wrapper builds it on its own pool
        arguments = {k: instantiate(v) for k, v in (value.get("init_args") or {}).items()}
        arguments.update(value.get("dict_kwargs") or {})
        return cls(**arguments)
    return value


def make_method(spec: Any, pool: ModelPool) -> MergeMethod:
    """The method a point's ``model:`` value names, on the sweep's shared ``pool`` (the CLI's
    ``pool`` -> ``model.init_args.pool`` link, made by hand)."""
    spec = plain(spec)
    arguments = {k: instantiate(v) for k, v in (spec.get("init_args") or {}).items() if k != "pool"}
    return import_object(spec["class_path"])(pool, **arguments)


def _logger_specs(value: Any) -> list[Any]:
    value = plain(value)
    if value in (None, True, False):
        return []
    return value if isinstance(value, list) else [value]


# ---- the command -------------------------------------------------------------------------
class SweepRunner:
    """Runs every point of ``sweep.grid`` as a ``mergelit test`` run, in one process.

    Args:
        args: the command line after ``mergelit sweep`` (default: ``sys.argv[2:]``).
        compare: the methods leaderboard as the table (``mergelit compare -c``): percent, best per
            column in bold, one row per method (its selected and oracle points).
    """

    def __init__(self, args: Optional[list[str]] = None, compare: bool = False):
        # FusionBench pool files work as the pool; each point re-parses these arguments.
        self.args = fusionbench_args(list(sys.argv[2:] if args is None else args))
        self.compare = compare
        self.cli = MergeCLI(
            self.args,
            instantiate=False,
            add_arguments=self.add_arguments,
            # A bad point raises (and is named) instead of exiting; so does a bad base config, as one line.
            parser_kwargs={"exit_on_error": False, "description": __doc__.split("\n", 1)[0].replace("``", "")},
            # Points must not rewrite the log folder's config.yaml, each with its own values: the
            # sweep writes its own config (grid included) to the output folder instead.
            save_config_callback=None,
        )
        self.parser = self.cli.parser
        self.config = self.cli.config
        self.options: Sweep = Sweep(**plain(self.config.sweep))
        if self.options.select_on != "none":
            self.hold_out_dev()
        # What points share, made on first use and kept: key = the arguments they were made from.
        self.pools: dict[str, ModelPool] = {}
        self.reuse = True  # methods reuse their λ-free parts through the pools across points (set_reuse)
        self.datamodules: dict[str, GLUEDataModule] = {}
        self.loggers: Optional[list[Logger] | bool] = None
        self.group: Optional[str] = None
        self.title = ""
        self.scorer: Optional[selection.CriterionScorer] = None
        self.dev: Optional[dict[str, Any]] = None
        self.values: dict[str, float] = {}  # criterion values scored by this process

    def add_arguments(self, parser) -> None:
        parser.add_class_arguments(Sweep, "sweep")
        parser.add_argument(
            "--output_dir",
            type=Optional[str],
            default=None,
            help="Folder of the point reports, table.md/csv and plot.png (default: the run's log folder). "
            "Rerunning into it resumes the sweep.",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Replace the results of another config found in --output_dir instead of refusing.",
        )
        parser.set_defaults({"model": {"class_path": PLACEHOLDER_MODEL}})
        if self.compare:
            parser.set_defaults({"sweep.percent": True, "sweep.mark_best": True})

    def hold_out_dev(self) -> None:
        """Selection reads the dev rows: run every point with ``--data.hold_out_dev true`` (nothing
        else reads them: not scoring, statistics or adaptation)."""
        data = self.config.data
        if data.dev_source == "train" and not data.dev_size:
            raise ValueError(
                f"--sweep.select_on {self.options.select_on} needs a dev split, but data.dev_size is 0 with "
                f"data.dev_source train; set --data.dev_size (e.g. 500 rows per task)."
            )
        if not data.hold_out_dev:
            self.args.append("--data.hold_out_dev=true")
            self.config = parse_config(self.parser, self.args)  # the base of every point's config and fingerprint

    # ---- shared parts -------------------------------------------------------------------------
    def pool_for(self, config) -> ModelPool:
        key = json.dumps(plain(config.pool), sort_keys=True, default=str)
        if key not in self.pools:
            self.pools[key] = ModelPool(**plain(config.pool))
            self.pools[key].keep_reused(self.reuse)
        return self.pools[key]

    def set_reuse(self, keep: bool) -> None:
        """Whether methods reuse their λ-free parts (Σ τi, τm) through the pools across points."""
        self.reuse = keep
        for pool in self.pools.values():
            pool.keep_reused(keep)

    def datamodule_for(self, config) -> GLUEDataModule:
        key = json.dumps(plain(config.data), sort_keys=True, default=str)
        if key not in self.datamodules:
            self.datamodules[key] = GLUEDataModule(**plain(config.data))
        return self.datamodules[key]

    def shared_loggers(self) -> list[Logger] | bool:
        """The base config's loggers but W&B's, made once: one log folder for the sweep (``True``:
        Lightning's default logger, made by each trainer)."""
        if self.loggers is None:
            value = plain(self.config.trainer.logger)
            if value in (None, True, False):
                self.loggers = value is not False
            else:
                specs = [s for s in _logger_specs(value) if not tracking.is_wandb_logger_class(import_object(s["class_path"]))]
                self.loggers = [instantiate(spec) for spec in specs]
        return self.loggers

    def wandb_loggers(self, name: str, job_type: str) -> list[Logger]:
        """A new W&B logger for each W&B logger of the config: one run, named ``name``, in the
        sweep's group (unless the config names one)."""
        out = []
        for spec in _logger_specs(self.config.trainer.logger):
            cls = import_object(spec["class_path"])
            if tracking.is_wandb_logger_class(cls):
                # jsonargparse passes every wandb.init argument, unset ones as None.
                kwargs = {**(spec.get("init_args") or {}), **(spec.get("dict_kwargs") or {})}
                kwargs.update(name=name, group=kwargs.get("group") or self.group, job_type=kwargs.get("job_type") or job_type)
                out.append(tracking.wandb_logger(cls, **kwargs))
        return out

    def make_trainer(self, config, point: Point, job_type: str) -> L.Trainer:
        """The point's trainer: its ``trainer:`` config, the shared loggers plus a new W&B logger per
        point, and a ``ReportWriter`` that writes only where the sweep says (a log folder's
        report.json would hold the last point's numbers alone)."""
        arguments = {k: instantiate(v) for k, v in plain(config.trainer).items() if k not in ("logger", "callbacks")}
        arguments["enable_progress_bar"] = False  # the sweep's bar is the one display; a point is one step of it
        shared = self.shared_loggers()
        wandb = self.wandb_loggers(point.name, job_type)
        loggers = [*shared, *wandb] if isinstance(shared, list) else shared
        callbacks = instantiate(plain(config.trainer).get("callbacks")) or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        return L.Trainer(**arguments, logger=loggers, callbacks=[*callbacks, ReportWriter(log_dir=False)])

    # ---- planning -----------------------------------------------------------------------------
    def plan(self) -> tuple[dict[str, list[Any]], list[Point], list]:
        """Check the grid and parse every point's config, before anything runs: ``(grid, points, configs)``."""
        base = self.config
        grid = {key: [plain(v) for v in values] if isinstance(values, list) else values for key, values in plain(base.sweep.grid).items()}
        if grid.get("model") in (ALL_METHODS, TUNED_METHODS):
            grid["model"] = every_method(tuned=grid["model"] == TUNED_METHODS)
        check_grid(grid, base)
        if "model" not in grid and is_placeholder(base.model.class_path):
            raise ValueError(
                "No method to sweep: add a method config (-c configs/methods/<method>.yaml) or list methods in "
                "sweep.grid.model."
            )
        for key in ("report_save_path", "merged_model_save_path"):
            if base.get(key):
                raise ValueError(
                    f"--{key} belongs to a single run, not a sweep; the sweep writes one report per point to "
                    f"--output_dir. Run the chosen point with `mergelit test ... --{key} ...`."
                )
        self.title = "Merging methods" if "model" in grid else tables.method_name(base.model.class_path)
        points = grid_points(grid)
        configs = [
            parse_config(self.parser, [*self.args, *point.cli_args()], what=f"Sweep point {point.name} ({' '.join(point.cli_args())})")
            for point in points
        ]
        for point, config in zip(points, configs):
            self.check_point(point, config)
        return grid, points, configs

    def check_point(self, point: Point, config) -> None:
        """Make the point's pool, data module and method now (their constructors read no weights and
        no data), so that a value only a constructor refuses (a TIES threshold of 200, a dev fraction
        of 1) fails before the first point runs, naming the point."""
        try:
            pool = self.pool_for(config)
            self.datamodule_for(config)
            make_method(config.model, pool)
        except ValueError as error:  # MergelitError, and the ValueErrors of constructors' checks
            raise MergelitError(f"Sweep point {point.name} ({' '.join(point.cli_args())}): {error}") from error

    def output_dir(self, name: str) -> Path:
        if self.config.output_dir:
            return Path(self.config.output_dir)
        for logger in self.shared_loggers() if isinstance(self.shared_loggers(), list) else []:
            if isinstance(logger, (CSVLogger, TensorBoardLogger)):
                # Made now, empty, so that the logger does not warn later about the sweep's files in it.
                _ = logger.experiment
                return Path(logger.log_dir)  # lightning_logs/version_N: the sweep is one versioned run
        root = self.config.trainer.default_root_dir or os.getcwd()
        return Path(root, "lightning_logs", "sweeps", name)

    def manifest(self, grid: dict, points: Sequence[Point], configs: Sequence, tasks: list[str]) -> dict[str, Any]:
        base = self.config
        dumped = yaml.safe_load(self.parser.dump(base, skip_none=False))
        config = fingerprint_config(dumped, list(grid))
        config.update(weights_fingerprint(self.pool_for(base)))  # a checkpoint replaced at the same path
        stamp = fingerprint(config, list(grid))
        keys = "-".join(tables.short_key(k) for k in grid)
        self.group = self.options.name or file_safe(f"{self.title.replace(' ', '-')}-{keys}-{stamp[:8]}")
        described = {}
        for point, point_config in zip(points, configs):
            model = plain(point_config.model)
            model.get("init_args", {}).pop("pool", None)
            described[point.name] = {"overrides": point.overrides, "model": model, "group": point.group, "swept": list(point.swept)}
        return {
            "format": MANIFEST_FORMAT,
            "fingerprint": stamp,
            "name": self.group,
            "grid_keys": list(grid),
            "tasks": tasks,
            "config": config,
            "points": described,
        }

    # ---- running ------------------------------------------------------------------------------
    def run(self) -> Path:
        """Score the points not done yet, select, write tables and plot; return the output folder."""
        options = self.options
        grid, points, configs = self.plan()
        tasks = list(self.config.data.tasks)  # linked from pool.finetuned, in the one task order
        if options.select_on != "none":  # the dev rows exist, before any point runs (reads the data)
            selection.check_dev_split(self.datamodule_for(self.config), tasks)
        manifest = self.manifest(grid, points, configs, tasks)
        folder = self.output_dir(self.group)
        selecting = options.select_on != "none"
        if rank_zero_only.rank == 0:
            prepare_folder(folder, manifest, points, self.config.overwrite)
            atomic_write_text(folder / "config.yaml", self.parser.dump(self.config, skip_none=False))
            if not selecting:  # an earlier run's choice is not this run's: compare shows the oracle rows
                (folder / tables.SELECTION).unlink(missing_ok=True)

        # What is done is read once, before anything runs: every rank decides from the same state
        # (rank 0 writes while the others go on, so reading the folder later could race).
        complete = {p.name for p in points if is_complete(folder / f"{p.name}.json", tasks)}
        full = [(p, c) for p, c in zip(points, configs) if p.name not in complete]
        if selecting and not options.oracle:
            # Only the selected points are scored on validation (below); a method of one point has
            # nothing to choose, so it is scored on both in one pass (one merge, one adaptation).
            alone = {p.name for p in points if sum(q.group == p.group for q in points) == 1}
            full = [(p, c) for p, c in full if p.name in alone]
        unscored: list[tuple[Point, Any]] = []
        if selecting:
            self.scorer = selection.CriterionScorer(options.select_on)
            self.dev = selection.dev_record(self.datamodule_for(self.config), tasks)
            unscored = [(p, c) for p, c in zip(points, configs)
                        if selection.read_criterion(folder / f"{p.name}.json", options.select_on, self.dev, rescore=True) is None]
        jobs = {p.name: (p, c) for p, c in [*full, *unscored]}
        done_full = {p.name for p, _ in full}
        done_criterion = {p.name for p, _ in unscored}
        with progress.counter(len(jobs), f"Sweep {self.group}", unit="run", show=rank_zero_only.rank == 0) as bar:
            for name, (point, config) in jobs.items():
                bar.set_postfix_str(name)
                # Under selection a validation run in this pass is a method of one point: merged from
                # scratch like the selected points below, so that its costs are a standalone run's.
                self.set_reuse(not (selecting and not options.oracle and name in done_full))
                self.score_point(point, config, folder / f"{name}.json", name in done_full, name in done_criterion)
                bar.update()
            if selecting:
                chosen = self.select(folder, points)
                todo = [(p, c) for p, c in zip(points, configs) if p.name in chosen and p.name not in complete | done_full]
                # Every point is scored on the dev rows: nothing left to reuse. Each selected point
                # then merges from scratch, so that its report's merge cost is a standalone run's.
                self.set_reuse(False)
                bar.total += len(todo)
                bar.refresh()
                for point, config in todo:
                    bar.set_postfix_str(f"{point.name} (selected)")
                    self.score_point(point, config, folder / f"{point.name}.json", full=True, criterion=False, job_type="sweep-selected")
                    bar.update()
                jobs.update({p.name: (p, c) for p, c in todo})
        if rank_zero_only.rank == 0:
            self.write_results(folder, points, grid, tasks, ran=len(jobs))
        return folder

    def score_point(
        self, point: Point, config, report_path: Path, full: bool, criterion: bool, job_type: str = "sweep-point"
    ) -> None:
        """Score one point as ``mergelit test`` does: seed, a new method on the shared pool, a trainer,
        then ``run_test`` (``full``: the validation rows, its report) and/or the criterion on the dev
        rows (``criterion``: ``<point>.criterion.json``)."""
        seed = config.get("seed_everything")
        if seed is not False:  # as LightningCLI seeds a run (True: a random seed)
            seed_everything(None if seed is True else seed, workers=True)
        datamodule = self.datamodule_for(config)
        method = make_method(config.model, self.pool_for(config))
        trainer = self.make_trainer(config, point, job_type)
        loggers = tracking.wandb_loggers(trainer)
        for logger in loggers:
            logger.log_hyperparams({"sweep/point": point.name, "sweep/group": self.group, **point.overrides})
        try:
            if full:
                report = run_test(trainer, method, datamodule, report_save_path=report_path, quiet=True,
                                  fused_gelu=config.get("fused_gelu", False))
                for logger in loggers:  # the W&B sweep configs' metric, and the average's interval
                    low, high = (report["protocol"].get("uncertainty") or {}).get("accuracy", {}).get("average", (None, None))
                    logger.log_metrics({f"test/average/{k}": v for k, v in report["average"].items()}
                                       | ({"test/average/accuracy_ci_low": low, "test/average/accuracy_ci_high": high} if low is not None else {}))
            if criterion:
                scored = self.score_criterion(trainer, method, datamodule, prepared=full, fused_gelu=config.get("fused_gelu", False))
                self.values[point.name] = scored["value"]
                for logger in loggers:
                    logger.log_metrics({f"select/{self.options.select_on}": scored["value"],
                                        **{f"select/{t}/{self.options.select_on}": v for t, v in scored["per_task"].items()}})
                if rank_zero_only.rank == 0:
                    atomic_write_text(selection.criterion_path(report_path), json.dumps(scored, indent=2) + "\n")
        finally:
            if loggers:
                tracking.finish()

    def score_criterion(
        self, trainer: L.Trainer, method: MergeMethod, datamodule, prepared: bool, fused_gelu: bool = False
    ) -> dict[str, Any]:
        """The point's criterion on the dev rows (its cost recorded beside it); ``prepared``: the
        method has run its data-driven step and merged already (after ``run_test``)."""
        record = costs.CostRecord()
        with costs.recording(record):
            if not prepared:
                method.use_fused_gelu(fused_gelu)
                with costs.phase("prepare"):
                    method.prepare(trainer, datamodule)
            scored = self.scorer.score(method, datamodule)
        return {**scored, "dev_sha256": self.dev["sha256"], "costs": record.as_dict()}

    def select(self, folder: Path, points: Sequence[Point]) -> set[str]:
        """The selection step over the finished points' criterion files (``selection.json``, rank 0
        writes it); returns the selected points' names (every rank computes the same)."""
        groups: dict[str, list[str]] = {}
        for point in points:
            groups.setdefault(point.group, []).append(point.name)
        if rank_zero_only.rank == 0:
            result = selection.write_selection(folder, groups, self.options.select_on, self.dev)
            return set(result["selected_points"])
        # Other ranks: their own values (rank 0 may still be writing the files), the files for resumed points.
        values = {
            p.name: self.values[p.name] if p.name in self.values
            else selection.read_criterion(folder / f"{p.name}.json", self.options.select_on, self.dev)["value"]
            for p in points
        }
        return {selection.select(names, values) for names in groups.values()}

    # ---- results ------------------------------------------------------------------------------
    def write_results(self, folder: Path, points: Sequence[Point], grid: dict, tasks: list[str], ran: int) -> None:
        options, title = self.options, self.title
        if self.compare and "model" in grid:
            # `compare -c`: the leaderboard, one row per method (selected / oracle), as `compare FOLDER` shows it.
            rows, headers = tables.sweep_rows(folder), ["Method"]
            md, _, plot = tables.write_leaderboard(folder, rows, tasks, extra_metrics=options.extra_metrics, title=title)
        else:
            rows, headers, plot_rows, ylabel = self.sweep_table(folder, points, grid, tasks)
            md, _ = tables.write_tables(folder, rows, tasks, headers, percent=options.percent, mark_best=options.mark_best)
            values = next(iter(grid.values()))
            if len(grid) == 1 and tables.is_numeric(values):
                plot = tables.plot_sweep(folder / "plot.png", values, plot_rows, tasks, xlabel=headers[0], title=title, ylabel=ylabel)
            else:
                plot = tables.plot_heatmap(folder / "plot.png", plot_rows, tasks, title=title, ylabel=", ".join(headers[: len(grid)]))
        markdown = md.read_text()
        self.log_summary(rows, headers, tasks, plot, markdown)
        print(
            f"\n{title}: {len(points)} points ({ran} scored now, {len(points) - ran} already done)\n\n{markdown}\n"
            f"Reports, table.md, table.csv, plot.png: {folder}"
        )

    def sweep_table(self, folder: Path, points: Sequence[Point], grid: dict, tasks: list[str]):
        """The λ-table layout: a row per point (its values, its criterion with selection, its
        validation accuracy where scored), then per method a **selected** and, when every point of
        it was scored on validation, an **oracle** row. Also the plot's rows: validation accuracy
        when every point has it, else the criterion's per-task values (and the plot's y label)."""
        reports = {p.name: tables.load_report(folder / f"{p.name}.json", tasks) for p in points
                   if is_complete(folder / f"{p.name}.json", tasks)}
        headers = [tables.header_of(key, self.config.model.class_path) for key in grid]

        def labels(point: Point) -> list[str]:
            return [tables.method_label(v, always=point.swept) if k == "model" else tables.format_value(v)
                    for k, v in point.overrides.items()]

        if self.options.select_on == "none":
            rows = [tables.Row(labels(p), reports[p.name]) for p in points]
            return rows, headers, rows, "accuracy (%)"
        select_on = self.options.select_on
        picked = tables.read_selection(folder)
        values = picked["criterion"]

        def shown(value: float) -> str:
            return f"{100 * value:.1f}" if self.options.percent else repr(round(value, 6))

        rows = [tables.Row([*labels(p), shown(values[p.name])], reports.get(p.name)) for p in points]
        blank = [""] * (len(headers) - 1)
        by_name = {p.name: p for p in points}
        for group, info in picked["groups"].items():
            names = info["points"]
            prefix = f"{group}, " if group else ""
            extra = [(f"**selected** on {picked['chosen_on']}", info["selected"])]
            if all(name in reports for name in names):
                extra.append((f"**oracle** (best of {len(names)})", max(names, key=lambda n: reports[n]["average"]["accuracy"])))
            for kind, name in extra:
                rows.append(tables.Row([f"{prefix}{kind}: {name}", *blank, shown(values[name])], reports[name]))
        if len(reports) == len(points):
            return rows, [*headers, selection.TITLES[select_on]], [tables.Row(labels(p), reports[p.name]) for p in points], "accuracy (%)"
        plot_rows = []
        for point in points:  # the criterion per task, as the plot's values
            scored = selection.read_criterion(folder / f"{point.name}.json", select_on, self.dev)
            per_task = {t: {"accuracy": v, "loss": 0.0} for t, v in scored["per_task"].items()}
            plot_rows.append(tables.Row(labels(by_name[point.name]), tables.make_report(per_task)))
        return rows, [*headers, selection.TITLES[select_on]], plot_rows, f"{selection.TITLES[select_on]} (%)"

    def log_summary(self, rows: Sequence[tables.Row], headers: list[str], tasks: list[str], plot: Optional[Path], markdown: str) -> None:
        """The table and plot as a W&B summary run of the sweep's group (when the config logs to W&B)."""
        scored = [r for r in rows if r.report is not None]
        data = [[*r.labels, *(r.report[c]["accuracy"] for c in [*tasks, "average"])] for r in scored]
        for logger in self.wandb_loggers(f"{self.group}/summary", "sweep-summary"):
            tracking.log_summary(logger, [*headers, *tasks, "average"], data, plot, markdown)


def every_method(tuned: bool = False) -> list[dict[str, Any]]:
    """``sweep.grid.model: all``: every method of ``mergelit.methods`` meant for comparison, each with
    its ``recommended`` arguments, as ``model:`` config values (a new method file joins by itself);
    ``tuned`` (``model: tuned``): each with its ``search`` range as its own grid."""
    specs = []
    for cls in method_classes():
        if cls.comparison:
            spec: dict[str, Any] = {"class_path": f"mergelit.methods.{cls.__name__}"}
            init_args = dict(cls.recommended)
            if tuned and cls.search:
                spec["grid"] = {name: list(values) for name, values in cls.search.items()}
                init_args = {k: v for k, v in init_args.items() if k not in cls.search}
            if init_args:
                spec["init_args"] = init_args
            specs.append(spec)
    return specs


def compare_command(args: Sequence[str]) -> None:
    """``mergelit compare PATH ...`` (reports, runs, sweeps) or ``mergelit compare -c ...`` (run the methods)."""
    args = list(args)
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in args):
        SweepRunner(args, compare=True).run()
        return
    parser = HintingArgumentParser(
        prog="mergelit compare",
        description="The methods leaderboard (best per column in bold) from report files, run folders "
        "(lightning_logs/version_N), sweep folders (each method's selected point and its oracle; a 7x7 "
        "sweep gives the 'Fine-tuned (individual)' row, and with it normalized accuracy) or folders of "
        "runs. `mergelit compare -c BASE.yaml -c METHODS.yaml` runs the methods listed in sweep.grid.model instead.",
    )
    parser.add_argument("paths", nargs="+", help="report JSONs, run folders, sweep folders")
    parser.add_argument("--output_dir", type=Optional[str], default=None, help="also write table.md, table.csv, plot.png here")
    parser.add_argument(
        "--extra_metrics", type=bool, default=True, help="the leaderboard's CoLA-MCC, MRPC-F1, QQP-F1, MNLI-mm columns"
    )
    parser.add_argument(
        "--against",
        type=Optional[str],
        default=None,
        help="the reference method of the gain column and of the paired win probability P(win) (a config "
        "or class name: task_arithmetic, TiesMerging, ...; default: task_arithmetic when a row is one)",
    )
    ns = parser.parse_args(args)
    print(tables.compare(ns.paths, ns.output_dir, extra_metrics=ns.extra_metrics, against=ns.against))
    if ns.output_dir:
        print(f"table.md, table.csv, plot.png: {ns.output_dir}")


def sweep_command(args: Sequence[str]) -> Path:
    """``mergelit sweep ARGS``: run the grid; returns the output folder."""
    return SweepRunner(list(args)).run()

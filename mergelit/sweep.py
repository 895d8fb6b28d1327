"""``mergelit sweep``: a grid of config values, run in one process; a report per point, a table, a plot.

    mergelit sweep -c configs/gpt2_glue.yaml -c configs/methods/task_arithmetic.yaml -c configs/sweeps/scaling_factor.yaml
    mergelit sweep ... --sweep.select_on dev          # every λ on the dev rows, the chosen one on validation
    mergelit compare -c configs/gpt2_glue.yaml -c configs/sweeps/methods_tuned.yaml   # each method at its own choice

A point is a ``mergelit test`` run of the same arguments plus ``--KEY=VALUE``; the pool and the
data are shared across points. docs/sweeps.md describes the grid, the output folder, selection,
resume and several processes.
"""

from __future__ import annotations

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
from mergelit.cli import HintingArgumentParser, MergeCLI, add_options, fusionbench_args, import_object, parse_config
from mergelit.errors import MergelitError
from mergelit.glue import GLUEDataModule
from mergelit.grid import (
    ALL_METHODS, MANIFEST_FORMAT, PLACEHOLDER_MODEL, TUNED_METHODS, Point, Sweep, check_grid, file_safe, fingerprint,
    grid_points, is_complete, is_placeholder, plain, prepare_folder,
)
from mergelit.methods import MergeMethod, method_classes
from mergelit.pool import ModelPool
from mergelit.report import ReportWriter, atomic_write_text
from mergelit.run import run_test


def instantiate(value: Any) -> Any:
    """A parsed config value with each ``{class_path, init_args}`` made into its object, but a method's
    (a wrapper builds its base method on its own pool)."""
    value = plain(value)
    if isinstance(value, list):
        return [instantiate(item) for item in value]
    if not (isinstance(value, dict) and "class_path" in value):
        return value
    cls = import_object(value["class_path"])
    if isinstance(cls, type) and issubclass(cls, MergeMethod):
        return value
    arguments = {k: instantiate(v) for k, v in (value.get("init_args") or {}).items()}
    arguments.update(value.get("dict_kwargs") or {})
    return cls(**arguments)


def make_method(spec: Any, pool: ModelPool) -> MergeMethod:
    """The method of a point's ``model:`` on the shared ``pool`` (the CLI's ``pool`` link, by hand)."""
    spec = plain(spec)
    arguments = {k: instantiate(v) for k, v in (spec.get("init_args") or {}).items() if k != "pool"}
    return import_object(spec["class_path"])(pool, **arguments)


def _logger_specs(value: Any) -> list[Any]:
    value = plain(value)
    if value in (None, True, False):
        return []
    return value if isinstance(value, list) else [value]


class SweepRunner:
    """Runs every point of ``sweep.grid`` as a ``mergelit test`` run, in one process; ``args``: the command
    line after ``mergelit sweep``; ``compare``: the methods leaderboard as the table (``mergelit compare -c``)."""

    def __init__(self, args: Optional[list[str]] = None, compare: bool = False):
        # FusionBench pool files work as the pool; each point re-parses these arguments.
        self.args = fusionbench_args(list(sys.argv[2:] if args is None else args))
        self.compare = compare
        self.cli = MergeCLI(
            self.args,
            instantiate=False,
            add_arguments=self.add_arguments,
            # A bad point (or base config) raises a one-line error naming it instead of exiting.
            parser_kwargs={"exit_on_error": False, "description": __doc__.split("\n", 1)[0].replace("``", "")},
            # Points must not each rewrite the log folder's config.yaml: the sweep writes its own.
            save_config_callback=None,
        )
        self.parser = self.cli.parser
        self.config = self.cli.config
        self.options: Sweep = Sweep(**plain(self.config.sweep))
        data = self.config.data
        if self.options.select_on != "none" and data.dev_source == "train" and not data.dev_size:
            raise ValueError(
                f"--sweep.select_on {self.options.select_on} needs a dev split, but data.dev_size is 0 with "
                f"data.dev_source train; set --data.dev_size (e.g. 500 rows per task)."
            )
        if self.options.select_on != "none" and not data.hold_out_dev:
            # Selection reads the dev rows: every point runs with them held out of everything else.
            self.args.append("--data.hold_out_dev=true")
            self.config = parse_config(self.parser, self.args)  # the base of every point's config and fingerprint
        # What points share, made on first use: key = the arguments they were made from.
        self.pools: dict[str, ModelPool] = {}
        self.datamodules: dict[str, GLUEDataModule] = {}
        self.reuse = True  # methods reuse their λ-free parts through the pools across points
        self.loggers: Optional[list[Logger] | bool] = None
        self.group: Optional[str] = None
        self.title = ""
        self.scorer: Optional[selection.CriterionScorer] = None
        self.dev: Optional[dict[str, Any]] = None
        self.values: dict[str, float] = {}  # criterion values scored by this process

    def add_arguments(self, parser) -> None:
        parser.add_class_arguments(Sweep, "sweep")
        add_options(parser, {
            "output_dir": (Optional[str], None, "Folder of the point reports, table.md/csv and plot.png (default: "
                           "the run's log folder). Rerunning into it resumes the sweep."),
            "overwrite": (bool, False, "Replace the results of another config found in --output_dir instead of "
                          "refusing."),
        })
        parser.set_defaults({"model": {"class_path": PLACEHOLDER_MODEL}})
        if self.compare:
            parser.set_defaults({"sweep.percent": True, "sweep.mark_best": True})

    def pool_for(self, config) -> ModelPool:
        key = json.dumps(plain(config.pool), sort_keys=True, default=str)
        if key not in self.pools:
            self.pools[key] = ModelPool(**plain(config.pool))
            self.pools[key].keep_reused(self.reuse)
        return self.pools[key]

    def set_reuse(self, keep: bool) -> None:
        self.reuse = keep
        for pool in self.pools.values():
            pool.keep_reused(keep)

    def datamodule_for(self, config) -> GLUEDataModule:
        key = json.dumps(plain(config.data), sort_keys=True, default=str)
        if key not in self.datamodules:
            self.datamodules[key] = GLUEDataModule(**plain(config.data))
        return self.datamodules[key]

    def shared_loggers(self) -> list[Logger] | bool:
        """The config's loggers but W&B's, made once: one log folder (``True``: each trainer makes Lightning's)."""
        if self.loggers is None:
            value = plain(self.config.trainer.logger)
            if value in (None, True, False):
                self.loggers = value is not False
            else:
                specs = [s for s in _logger_specs(value) if not tracking.is_wandb_logger_class(import_object(s["class_path"]))]
                self.loggers = [instantiate(spec) for spec in specs]
        return self.loggers

    def wandb_loggers(self, name: str, job_type: str) -> list[Logger]:
        """A new W&B logger per W&B logger of the config: one run, ``name``, in the sweep's group."""
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
        """The point's trainer: the shared loggers plus its own W&B logger, and a ``ReportWriter`` that
        writes only where the sweep says (a log folder's report.json would hold one point's numbers)."""
        arguments = {k: instantiate(v) for k, v in plain(config.trainer).items() if k not in ("logger", "callbacks")}
        arguments["enable_progress_bar"] = False  # the sweep's bar is the one display; a point is one step of it
        shared = self.shared_loggers()
        wandb = self.wandb_loggers(point.name, job_type)
        loggers = [*shared, *wandb] if isinstance(shared, list) else shared
        callbacks = instantiate(plain(config.trainer).get("callbacks")) or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        return L.Trainer(**arguments, logger=loggers, callbacks=[*callbacks, ReportWriter(log_dir=False)])

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
        where = {p.name: f"Sweep point {p.name} ({' '.join(p.cli_args())})" for p in points}
        configs = [parse_config(self.parser, [*self.args, *p.cli_args()], what=where[p.name]) for p in points]
        for point, config in zip(points, configs):
            # Its pool, data and method made now (their constructors read no weights and no data), so
            # that a value only a constructor refuses (a TIES threshold of 200) fails before any point runs.
            try:
                pool = self.pool_for(config)
                self.datamodule_for(config)
                make_method(config.model, pool)
            except ValueError as error:  # MergelitError, and the ValueErrors of constructors' checks
                raise MergelitError(f"{where[point.name]}: {error}") from error
        return grid, points, configs

    def output_dir(self, name: str) -> Path:
        if self.config.output_dir:
            return Path(self.config.output_dir)
        for logger in self.shared_loggers() if isinstance(self.shared_loggers(), list) else []:
            if isinstance(logger, (CSVLogger, TensorBoardLogger)):
                _ = logger.experiment  # made now, so that the logger does not warn later about the sweep's files
                return Path(logger.log_dir)  # lightning_logs/version_N: the sweep is one versioned run
        root = self.config.trainer.default_root_dir or os.getcwd()
        return Path(root, "lightning_logs", "sweeps", name)

    def manifest(self, grid: dict, points: Sequence[Point], configs: Sequence, tasks: list[str]) -> dict[str, Any]:
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        config, stamp = fingerprint(dumped, list(grid), self.pool_for(self.config))
        keys = "-".join(tables.short_key(k) for k in grid)
        self.group = self.options.name or file_safe(f"{self.title.replace(' ', '-')}-{keys}-{stamp[:8]}")
        described = {}
        for point, point_config in zip(points, configs):
            model = plain(point_config.model)
            model.get("init_args", {}).pop("pool", None)
            described[point.name] = {"overrides": point.overrides, "model": model, "group": point.group, "swept": list(point.swept)}
        return {"format": MANIFEST_FORMAT, "fingerprint": stamp, "name": self.group, "grid_keys": list(grid),
                "tasks": tasks, "config": config, "points": described}

    def run(self) -> Path:
        """Score the points not done yet, select, write tables and plot; return the output folder."""
        options = self.options
        selecting = options.select_on != "none"
        grid, points, configs = self.plan()
        tasks = list(self.config.data.tasks)  # linked from pool.finetuned, in the one task order
        if selecting:  # the dev rows exist, before any point runs (reads the data)
            self.scorer = selection.CriterionScorer(options.select_on)
            self.dev = selection.dev_record(self.datamodule_for(self.config), tasks)
        manifest = self.manifest(grid, points, configs, tasks)
        folder = self.output_dir(self.group)
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
                # Every point is scored on the dev rows: nothing left to reuse; each selected point
                # merges from scratch, so that its report's merge cost is a standalone run's.
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
        """Score one point as ``mergelit test`` does: ``full``: on the validation rows (its report);
        ``criterion``: on the dev rows (``<point>.criterion.json``, its cost recorded beside it)."""
        seed = config.get("seed_everything")
        if seed is not False:  # as LightningCLI seeds a run (True: a random seed)
            seed_everything(None if seed is True else seed, workers=True)
        datamodule = self.datamodule_for(config)
        method = make_method(config.model, self.pool_for(config))
        trainer = self.make_trainer(config, point, job_type)
        fused_gelu = config.get("fused_gelu", False)
        loggers = tracking.wandb_loggers(trainer)
        for logger in loggers:
            logger.log_hyperparams({"sweep/point": point.name, "sweep/group": self.group, **point.overrides})
        try:
            if full:
                report = run_test(trainer, method, datamodule, report_save_path=report_path, quiet=True,
                                  fused_gelu=fused_gelu)
                for logger in loggers:  # the W&B sweep configs' metric, and the average's interval
                    low, high = (report["protocol"].get("uncertainty") or {}).get("accuracy", {}).get("average", (None, None))
                    logger.log_metrics({f"test/average/{k}": v for k, v in report["average"].items()}
                                       | ({"test/average/accuracy_ci_low": low, "test/average/accuracy_ci_high": high} if low is not None else {}))
            if criterion:
                record = costs.CostRecord()
                with costs.recording(record):
                    if not full:  # else run_test has prepared and merged the method already
                        method.use_fused_gelu(fused_gelu)
                        with costs.phase("prepare"):
                            method.prepare(trainer, datamodule)
                    scored = self.scorer.score(method, datamodule)
                scored = {**scored, "dev_sha256": self.dev["sha256"], "costs": record.as_dict()}
                self.values[point.name] = scored["value"]
                select_on = self.options.select_on
                for logger in loggers:
                    logger.log_metrics({f"select/{select_on}": scored["value"],
                                        **{f"select/{t}/{select_on}": v for t, v in scored["per_task"].items()}})
                if rank_zero_only.rank == 0:
                    atomic_write_text(selection.criterion_path(report_path), json.dumps(scored, indent=2) + "\n")
        finally:
            if loggers:
                tracking.finish()

    def select(self, folder: Path, points: Sequence[Point]) -> set[str]:
        """The selection step (rank 0 writes ``selection.json``); every rank returns the same selected names."""
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
        # The table and plot as a W&B summary run of the sweep's group (when the config logs to W&B).
        scored = [r for r in rows if r.report is not None]
        data = [[*r.labels, *(r.report[c]["accuracy"] for c in [*tasks, "average"])] for r in scored]
        for logger in self.wandb_loggers(f"{self.group}/summary", "sweep-summary"):
            tracking.log_summary(logger, [*headers, *tasks, "average"], data, plot, markdown)
        print(
            f"\n{title}: {len(points)} points ({ran} scored now, {len(points) - ran} already done)\n\n{markdown}\n"
            f"Reports, table.md, table.csv, plot.png: {folder}"
        )

    def sweep_table(self, folder: Path, points: Sequence[Point], grid: dict, tasks: list[str]):
        """The λ-table (a row per point, then per method a **selected** and, when all its points were scored on
        validation, an **oracle** row), and the plot's rows (accuracy, else the criterion per task) and y label."""
        reports = {p.name: tables.load_report(folder / f"{p.name}.json", tasks) for p in points
                   if is_complete(folder / f"{p.name}.json", tasks)}
        headers = [tables.header_of(key, self.config.model.class_path) for key in grid]

        def labels(point: Point) -> list[str]:
            return [tables.method_label(v, always=point.swept) if k == "model" else tables.format_value(v)
                    for k, v in point.overrides.items()]

        select_on = self.options.select_on
        if select_on == "none":
            rows = [tables.Row(labels(p), reports[p.name]) for p in points]
            return rows, headers, rows, "accuracy (%)"
        picked = tables.read_selection(folder)
        values = picked["criterion"]

        def shown(value: float) -> str:
            return f"{100 * value:.1f}" if self.options.percent else repr(round(value, 6))

        rows = [tables.Row([*labels(p), shown(values[p.name])], reports.get(p.name)) for p in points]
        blank = [""] * (len(headers) - 1)
        for group, info in picked["groups"].items():
            names = info["points"]
            prefix = f"{group}, " if group else ""
            extra = [(f"**selected** on {picked['chosen_on']}", info["selected"])]
            if all(name in reports for name in names):
                extra.append((f"**oracle** (best of {len(names)})", max(names, key=lambda n: reports[n]["average"]["accuracy"])))
            for kind, name in extra:
                rows.append(tables.Row([f"{prefix}{kind}: {name}", *blank, shown(values[name])], reports[name]))
        headers = [*headers, selection.TITLES[select_on]]
        if len(reports) == len(points):
            return rows, headers, [tables.Row(labels(p), reports[p.name]) for p in points], "accuracy (%)"
        plot_rows = []
        for point in points:  # the criterion per task, as the plot's values
            scored = selection.read_criterion(folder / f"{point.name}.json", select_on, self.dev)
            per_task = {t: {"accuracy": v, "loss": 0.0} for t, v in scored["per_task"].items()}
            plot_rows.append(tables.Row(labels(point), tables.make_report(per_task)))
        return rows, headers, plot_rows, f"{selection.TITLES[select_on]} (%)"


def every_method(tuned: bool = False) -> list[dict[str, Any]]:
    """``sweep.grid.model: all``: every method meant for comparison with its ``recommended`` arguments,
    as ``model:`` values (a new method file joins by itself); ``tuned``: each with its ``search`` grid."""
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
    add_options(parser, {
        "output_dir": (Optional[str], None, "also write table.md, table.csv, plot.png here"),
        "extra_metrics": (bool, True, "the leaderboard's CoLA-MCC, MRPC-F1, QQP-F1, MNLI-mm columns"),
        "against": (Optional[str], None, "the reference method of the gain column and of the paired win probability "
                    "P(win) (a config or class name: task_arithmetic, TiesMerging, ...; default: task_arithmetic "
                    "when a row is one)"),
    })
    ns = parser.parse_args(args)
    print(tables.compare(ns.paths, ns.output_dir, extra_metrics=ns.extra_metrics, against=ns.against))
    if ns.output_dir:
        print(f"table.md, table.csv, plot.png: {ns.output_dir}")


def sweep_command(args: Sequence[str]) -> Path:
    """``mergelit sweep ARGS``: run the grid; returns the output folder."""
    return SweepRunner(list(args)).run()

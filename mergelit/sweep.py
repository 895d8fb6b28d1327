"""``mergelit sweep``: a grid of config values, run in one process; a report per point, a table, a plot.

    mergelit sweep -c configs/gpt2_glue.yaml -c configs/methods/task_arithmetic.yaml -c configs/sweeps/scaling_factor.yaml
    mergelit sweep -c configs/gpt2_glue.yaml -c configs/sweeps/individual_7x7.yaml --output_dir sweeps/7x7
    mergelit compare -c configs/gpt2_glue.yaml -c configs/sweeps/methods.yaml

The grid is YAML: ``sweep: {grid: {model.init_args.scaling_factor: [0.0, 0.1, ...]}}``. Keys are
the dotted names ``--print_config`` shows (any group: ``model.init_args.*``, ``data.*``, ...;
``model`` itself takes whole methods); several keys make their cartesian product. The output
folder (``--output_dir``, default: the run's log folder) receives one report JSON per point,
named after it (``scaling_factor=0.3.json``), ``table.md``, ``table.csv``, ``plot.png`` (lines
for one numeric key, else a heatmap), ``config.yaml`` and the manifest ``sweep.json``.

Design, and why:

- **A point is a ``mergelit test`` run.** Its config is parsed by the same LightningCLI parser
  from the same arguments with ``--KEY=VALUE`` appended for each swept key, then seeded,
  instantiated and tested the same way. So a point's report equals a separate run's, and a
  ``wandb agent`` calling ``mergelit test ... --KEY=VALUE`` gets the same numbers.
- **Not a LightningCLI subcommand.** LightningCLI runs a subcommand as a Trainer method
  (``getattr(trainer, "test")(model, datamodule)``); a sweep drives many test runs, each with its
  own method and W&B run, so it is not a Trainer method. ``main()`` hands ``sweep`` to
  ``SweepCLI``: a ``MergeCLI`` built with ``run=False`` (LightningCLI's own way to parse and
  instantiate, then run yourself), whose parser adds the ``sweep:`` group, ``--output_dir`` and
  ``--overwrite``. ``--help`` and ``--print_config`` work as for ``test``.
- **One process, nothing made twice.** Per point every class is instantiated from the point's
  config through jsonargparse *instantiators* that return the instance already made from equal
  arguments. So the pool (loaded bodies, and ``ModelPool.cached`` results such as Σ τi or the
  TIES merged task vector), the datamodule (tokenized once) and the CSV logger (one log folder)
  are shared; the method is new per point, and a swept ``data.*`` / ``pool.*`` key makes a new
  datamodule / pool only where its arguments change. W&B loggers are new per point: one run per
  point, all in one group.
- **The CLI's ``before_test`` runs per point** (data-driven methods compute or load their
  statistics there), exactly as LightningCLI runs it before ``test``.
- **Resume.** ``sweep.json`` records a fingerprint of the config without the swept keys and the
  settings that cannot change numbers (logger, progress bar, workers). A rerun into the same
  folder skips points whose report is complete, re-does missing or partial ones, and refuses a
  folder written by another config unless ``--overwrite``. Reports are written atomically.
- **Several processes (DDP).** Every rank runs the same points (``trainer.test`` is collective);
  only rank 0 writes files and W&B runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from lightning.pytorch import LightningDataModule, seed_everything
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from mergelit import tables, tracking
from mergelit.cli import MergeCLI, fusionbench_args
from mergelit.grid import (
    ALL_METHODS,
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
    plain,
    prepare_folder,
    weights_fingerprint,
)
from mergelit.methods import method_classes
from mergelit.pool import ModelPool
from mergelit.report import ReportWriter, atomic_write_text
from mergelit.run import run_test
from mergelit import selection

# ---- the command -------------------------------------------------------------------------
class SweepCLI(MergeCLI):
    """``MergeCLI`` that runs every point of ``sweep.grid`` as a test run, in one process.

    Args:
        args: the command line after ``mergelit sweep`` (default: ``sys.argv[2:]``).
        compare: tables as the methods table (percent, best per column in bold): ``mergelit compare -c``.
    """

    def __init__(self, args: Optional[list[str]] = None, compare: bool = False, **kwargs):
        # FusionBench pool files work as the pool; each point re-parses these arguments.
        self.args = fusionbench_args(list(sys.argv[2:] if args is None else args))
        self.compare = compare
        self.shared: list[tuple[type, dict[str, Any], Any]] = []
        # Each point's report goes to the sweep folder only: the log folder's report.json would
        # only ever hold the last point's numbers.
        self.writer = ReportWriter(log_dir=False)
        self.point: Optional[Point] = None
        self.group: Optional[str] = None
        self.wandb_init: Optional[tuple[type, dict[str, Any]]] = None
        kwargs.setdefault("parser_kwargs", {"description": __doc__.split("\n", 1)[0].replace("``", "")})
        # Points must not rewrite the log folder's config.yaml, each with its own values: the
        # sweep writes its own config (grid included) to the output folder instead.
        kwargs.setdefault("save_config_callback", None)
        super().__init__(args=self.args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
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

    # ---- instantiation: share what a point does not change --------------------------------
    def instantiators(self) -> list[tuple]:
        # Reuse (or make per point) the shared parts; a new W&B logger per point.
        return [(self._reuse, ModelPool, True), (self._reuse, LightningDataModule, True), (self._logger, Logger, True)]

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.trainer.callbacks.append(self.writer)

    def _reuse(self, class_type: type, *args, **kwargs):
        """The instance made before from equal arguments, else a new one (kept for later points)."""
        for cls, made_with, instance in self.shared:
            if cls is class_type and made_with == kwargs and not args:
                return instance
        instance = class_type(*args, **kwargs)
        if not args:
            self.shared.append((class_type, kwargs, instance))
        return instance

    def _logger(self, class_type: type, *args, **kwargs):
        if not tracking.is_wandb_logger_class(class_type):
            return self._reuse(class_type, *args, **kwargs)
        # W&B: a new run per point, named after it, in the sweep's group (unless the config sets
        # one). jsonargparse passes every wandb.init argument, unset ones as None.
        self.wandb_init = (class_type, dict(kwargs))
        if self.point is not None:
            kwargs = {**kwargs, **self._wandb_run(self.point.name, "sweep-point", kwargs)}
        return tracking.wandb_logger(class_type, *args, **kwargs)

    def _wandb_run(self, name: str, job_type: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "group": kwargs.get("group") or self.group, "job_type": kwargs.get("job_type") or job_type}

    # ---- running ----------------------------------------------------------------------------
    def point_config(self, point: Point):
        """The point's config: the sweep's arguments plus ``--KEY=VALUE``, parsed as ``mergelit test`` would."""
        self.parser.exit_on_error = False
        try:
            return self.parser.parse_args([*self.args, *point.cli_args()])
        except Exception as error:  # jsonargparse's ArgumentError (or a config value it rejects)
            raise ValueError(f"Sweep point {point.name} ({' '.join(point.cli_args())}) is not a valid config: {error}") from None
        finally:
            self.parser.exit_on_error = True

    def run_point(self, point: Point, config, report_path: Path, validate: bool = True, criterion: bool = False) -> dict:
        """Run one point as ``mergelit test`` runs: seed, instantiate, then the test flow (``run_test``).

        ``criterion``: also score it on ``sweep.select_on`` (dev rows only) and write
        ``<point>.criterion.json``; ``validate=False``: only that (a resumed point whose report is done).
        """
        self.config, self.point = config, point
        seed = config.get("seed_everything")
        if seed is not False:  # as LightningCLI seeds a run (True: a random seed)
            seed_everything(None if seed is True else seed, workers=True)
        self.instantiate_classes()
        method = self.model
        # Reuse, explicitly: the parts of the merge a method computes through `reused` (Σ τi, TIES's τm)
        # are kept by the shared pool for the next point with the same class and reusable_key().
        method.pool.keep_reused(True)
        loggers = tracking.wandb_loggers(self.trainer)
        for logger in loggers:
            logger.log_hyperparams({"sweep/point": point.name, "sweep/group": self.group, **point.overrides})
        report = None
        try:
            if validate:
                report = run_test(
                    self.trainer, method, self.datamodule, report_save_path=report_path, quiet=True,
                    fused_gelu=config.get("fused_gelu", False),
                )
            else:
                method.prepare(self.trainer, self.datamodule)  # statistics come from their cache
        finally:
            if loggers:
                tracking.finish()
        if criterion:
            scored = {**self.scorer.score(method, self.datamodule), "dev_sha256": self.dev["sha256"]}
            if rank_zero_only.rank == 0:
                atomic_write_text(criterion_path(report_path), json.dumps(scored, indent=2) + "\n")
        return report

    def default_output_dir(self, name: str) -> str:
        logger = self.trainer.logger
        if isinstance(logger, (CSVLogger, TensorBoardLogger)):
            # Made now, empty, so that the logger does not warn later about the sweep's files in it.
            _ = logger.experiment
            return self.trainer.log_dir  # lightning_logs/version_N: the sweep is one versioned run
        return os.path.join(self.trainer.default_root_dir, "lightning_logs", "sweeps", name)

    def plan(self) -> tuple[dict[str, list[Any]], list[Point], list]:
        """Check the grid and parse every point's config, before anything runs: ``(grid, points, configs)``."""
        base = self.config
        grid = {key: [plain(v) for v in values] if isinstance(values, list) else values for key, values in base.sweep.grid.items()}
        if grid.get("model") == ALL_METHODS:
            grid["model"] = every_method()
        check_grid(grid, base)
        if "model" not in grid and base.model.class_path == PLACEHOLDER_MODEL:
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
        points = grid_points(grid)
        return grid, points, [self.point_config(point) for point in points]

    def run(self) -> Path:
        """Run the points not done yet; write reports, tables, plot; return the output folder."""
        sweep: Sweep = self.config_init.sweep
        if sweep.select_on != "none":
            self.hold_out_dev()
        base = self.config
        grid, points, configs = self.plan()
        tasks = list(self.config_init.pool.tasks)
        dumped = yaml.safe_load(self.parser.dump(base, skip_none=False))
        config = fingerprint_config(dumped, list(grid))
        config.update(weights_fingerprint(self.config_init.pool))  # a checkpoint replaced at the same path
        stamp = fingerprint(config, list(grid))
        method = "Merging methods" if "model" in grid else tables.method_name(base.model.class_path)
        keys = "-".join(tables.short_key(k) for k in grid)
        self.group = sweep.name or file_safe(f"{method.replace(' ', '-')}-{keys}-{stamp[:8]}")
        folder = Path(base.output_dir or self.default_output_dir(self.group))
        manifest = {
            "format": MANIFEST_FORMAT,
            "fingerprint": stamp,
            "name": self.group,
            "grid_keys": list(grid),
            "tasks": tasks,
            "config": config,
            "points": {
                p.name: {"overrides": p.overrides, "model": c.model.as_dict() if hasattr(c.model, "as_dict") else c.model}
                for p, c in zip(points, configs)
            },
        }
        for spec in manifest["points"].values():
            spec["model"].get("init_args", {}).pop("pool", None)
        if rank_zero_only.rank == 0:
            prepare_folder(folder, manifest, points, base.overwrite)
            atomic_write_text(folder / "config.yaml", self.parser.dump(base, skip_none=False))

        todo = [(p, c) for p, c in zip(points, configs) if not is_complete(folder / f"{p.name}.json", tasks)]
        unscored: set[str] = set()
        if sweep.select_on != "none":
            self.scorer = selection.CriterionScorer(sweep.select_on)
            self.dev = selection.dev_record(self.datamodule, tasks)
            unscored = {p.name for p in points if read_criterion(folder / f"{p.name}.json", sweep.select_on, self.dev) is None}
            todo_names = {p.name for p, _ in todo}
            # Done on validation but not yet on the criterion (e.g. a sweep resumed with selection).
            todo += [(p, c) for p, c in zip(points, configs) if p.name in unscored and p.name not in todo_names]
        from tqdm.auto import tqdm

        with tqdm(
            total=len(points), initial=len(points) - len(todo), desc=f"Sweep {self.group}", unit="point",
            disable=rank_zero_only.rank != 0, dynamic_ncols=True,
        ) as bar:
            for point, config_ in todo:
                bar.set_postfix_str(point.name)
                path = folder / f"{point.name}.json"  # the report, written atomically
                extra = {} if sweep.select_on == "none" else {"validate": not is_complete(path, tasks), "criterion": point.name in unscored}
                self.run_point(point, config_, path, **extra)
                bar.update()
        self.config, self.point = base, None
        if rank_zero_only.rank == 0:
            self.write_results(folder, points, grid, tasks, sweep, method, ran=len(todo))
        return folder

    def hold_out_dev(self) -> None:
        """Selection reads the dev rows: run every point with ``--data.hold_out_dev true`` (statistics skip them)."""
        if not self.config.data.dev_size:
            raise ValueError(
                f"--sweep.select_on {self.config.sweep.select_on} needs a dev split, but data.dev_size is 0; "
                f"set --data.dev_size (e.g. 500 rows per task, carved from train)."
            )
        if not self.config.data.hold_out_dev:
            self.args.append("--data.hold_out_dev=true")
            self.config = self.parser.parse_args(self.args)  # the base of every point's config and fingerprint

    def write_results(
        self, folder: Path, points: Sequence[Point], grid: dict, tasks: list[str], sweep: Sweep, method: str, ran: int
    ) -> None:
        rows = [
            tables.Row([tables.format_value(v) for v in p.overrides.values()], tables.load_report(folder / f"{p.name}.json", tasks))
            for p in points
        ]
        headers = [tables.header_of(key, self.config.model.class_path) for key in grid]
        plot_rows = rows
        if sweep.select_on != "none":
            rows, headers = self.record_selection(folder, points, rows, headers, tasks, sweep)
        values = next(iter(grid.values()))
        if self.compare and list(grid) == ["model"] and sweep.select_on == "none":
            # `compare -c`: the leaderboard (accuracy, extra metrics, costs, data), average accuracy against merge cost.
            md, _, plot = tables.write_leaderboard(folder, rows, tasks, extra_metrics=sweep.extra_metrics, title=method)
        else:
            md, _ = tables.write_tables(folder, rows, tasks, headers, percent=sweep.percent, mark_best=sweep.mark_best)
            if len(grid) == 1 and tables.is_numeric(values):
                plot = tables.plot_sweep(folder / "plot.png", values, plot_rows, tasks, xlabel=headers[0], title=method)
            else:
                plot = tables.plot_heatmap(
                    folder / "plot.png", plot_rows, tasks, title=method, ylabel=", ".join(headers[: len(grid)])
                )
        markdown = md.read_text()
        if self.wandb_init is not None:
            class_type, kwargs = self.wandb_init
            kwargs = {**kwargs, **self._wandb_run(f"{self.group}/summary", "sweep-summary", kwargs)}
            columns = [*headers, *tasks, "average"]
            data = [[*r.labels, *(r.report[c]["accuracy"] for c in [*tasks, "average"])] for r in rows]
            tracking.log_summary(tracking.wandb_logger(class_type, **kwargs), columns, data, plot, markdown)
        print(
            f"\n{method}: {len(points)} points ({ran} run now, {len(points) - ran} already done)\n\n{markdown}\n"
            f"Reports, table.md, table.csv, plot.png: {folder}"
        )


    def record_selection(
        self, folder: Path, points: Sequence[Point], rows: list, headers: list[str], tasks: list[str], sweep: Sweep
    ) -> tuple[list, list[str]]:
        """Select each method's point from the criterion values alone; record it in ``sweep.json`` and in
        the selected report's ``protocol``; return the table rows (a criterion column, then per method a
        **selected** and an **oracle** row) and headers."""
        select_on = sweep.select_on
        values = {p.name: read_criterion(folder / f"{p.name}.json", select_on, self.dev)["value"] for p in points}
        groups: dict[str, list[Point]] = {}
        for point in points:  # one selection per method: the swept `model`, else the sweep's one method
            model = point.overrides.get("model")
            groups.setdefault(tables.method_label(model) if model else "", []).append(point)
        chosen = {label: selection.select([p.name for p in group], values) for label, group in groups.items()}
        by_name = {p.name: p for p in points}
        info = {"select_on": select_on, "labels_used": selection.LABELS_USED[select_on], "split": "dev (from train)",
                "dev_size": self.dev["size"], "dev_seed": self.dev["seed"], "dev_sha256": self.dev["sha256"]}
        for point in points:
            path = folder / f"{point.name}.json"
            report = json.loads(path.read_text())
            protocol = report.get("protocol") if isinstance(report.get("protocol"), dict) else {}
            if point.name in chosen.values():
                protocol["selection"] = {**info, "criterion": values[point.name]}
            elif "selection" not in protocol:
                continue
            else:
                protocol.pop("selection")
            report["protocol"] = protocol
            atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        manifest_path = folder / tables.MANIFEST
        manifest = json.loads(manifest_path.read_text())
        picked = [by_name[name].overrides for name in chosen.values()]
        manifest.update(
            select_on=select_on,
            labels_used=selection.LABELS_USED[select_on],
            selected=picked[0] if len(picked) == 1 else picked,
            selected_points=list(chosen.values()),
            criterion=values,
            dev=self.dev,
        )
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2, default=str) + "\n")

        def shown(value: float) -> str:
            return f"{100 * value:.1f}" if sweep.percent else repr(round(value, 6))

        table = [tables.Row([*r.labels, shown(values[p.name])], r.report) for r, p in zip(rows, points)]
        blank = [""] * (len(headers) - 1)
        for label, group in groups.items():
            oracle = max(group, key=lambda p: tables.load_report(folder / f"{p.name}.json", tasks)["average"]["accuracy"])
            for kind, point in ((f"**selected** on {select_on}", by_name[chosen[label]]), (f"**oracle** (best of {len(group)})", oracle)):
                name = f"{label}, " if label else ""
                table.append(tables.Row([f"{name}{kind}: {point.name}", *blank, shown(values[point.name])],
                                        tables.load_report(folder / f"{point.name}.json", tasks)))
        return table, [*headers, selection.TITLES[select_on]]


def criterion_path(report_path: Path) -> Path:
    """``scaling_factor=0.3.json`` -> ``scaling_factor=0.3.criterion.json`` (the point's criterion value)."""
    return report_path.with_name(report_path.name.removesuffix(".json") + tables.CRITERION_SUFFIX)


def read_criterion(report_path: Path, select_on: str, dev: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The point's stored criterion, or None when missing or computed for another criterion or dev split."""
    path = criterion_path(report_path)
    try:
        scored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if scored.get("select_on") != select_on or scored.get("dev_sha256") != dev["sha256"]:
        return None
    return scored


def every_method() -> list[dict[str, Any]]:
    """``sweep.grid.model: all``: every method of ``mergelit.methods`` meant for comparison, each with
    its ``recommended`` arguments, as ``model:`` config values (a new method file joins by itself)."""
    specs = []
    for cls in method_classes():
        if cls.comparison:
            spec: dict[str, Any] = {"class_path": f"mergelit.methods.{cls.__name__}"}
            if cls.recommended:
                spec["init_args"] = dict(cls.recommended)
            specs.append(spec)
    return specs


def compare_command(args: Sequence[str]) -> None:
    """``mergelit compare PATH ...`` (reports, runs, sweeps) or ``mergelit compare -c ...`` (run the methods)."""
    args = list(args)
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in args):
        SweepCLI(args, compare=True).run()
        return
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="mergelit compare",
        description="The methods table (best per column in bold) from report files, run folders "
        "(lightning_logs/version_N), sweep folders (their best point; a 7x7 sweep gives the "
        "'Fine-tuned (individual)' row) or folders of runs. `mergelit compare -c BASE.yaml -c "
        "METHODS.yaml` runs the methods listed in sweep.grid.model instead.",
    )
    parser.add_argument("paths", nargs="+", help="report JSONs, run folders, sweep folders")
    parser.add_argument("--output_dir", type=Optional[str], default=None, help="also write table.md, table.csv, plot.png here")
    parser.add_argument(
        "--extra_metrics", type=bool, default=True, help="the leaderboard's CoLA-MCC, MRPC-F1, QQP-F1, MNLI-mm columns"
    )
    ns = parser.parse_args(args)
    print(tables.compare(ns.paths, ns.output_dir, extra_metrics=ns.extra_metrics))
    if ns.output_dir:
        print(f"table.md, table.csv, plot.png: {ns.output_dir}")


def sweep_command(args: Sequence[str]) -> Path:
    """``mergelit sweep ARGS``: run the grid; returns the output folder."""
    return SweepCLI(list(args)).run()

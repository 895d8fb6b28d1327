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

import difflib
import hashlib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from lightning.pytorch import LightningDataModule
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from mergelit import tables, tracking
from mergelit.cli import MergeCLI
from mergelit.pool import ModelPool
from mergelit.report import atomic_write_text, write_report

# The sweep's base config needs *a* model even when the grid lists whole methods (``model: [...]``);
# this placeholder is never run: a sweep that does not sweep ``model`` must name one.
PLACEHOLDER_MODEL = "mergelit.methods.MergeMethod"

# Settings that cannot change a report: left out of the fingerprint, so a resumed sweep may change them.
NOT_IN_FINGERPRINT = (
    "config",
    "sweep",
    "output_dir",
    "overwrite",
    "report_save_path",
    "merged_model_save_path",
    "trainer.logger",
    "trainer.callbacks",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.default_root_dir",
    "data.num_workers",
    "data.cache_dir",
)

_MANIFEST_FORMAT = 1


@dataclass
class Sweep:
    """A grid of config values; every combination is one point, run as one ``mergelit test``.

    Args:
        grid: config key -> list of values, e.g. ``model.init_args.scaling_factor: [0.0, 0.1]``. Keys
            are the dotted names ``--print_config`` shows; ``model`` takes whole methods
            (``{class_path: ..., init_args: ...}``). Several keys: their cartesian product,
            the first key varying slowest.
        name: the sweep's name: the W&B group, and the output folder ``lightning_logs/sweeps/NAME``
            when there is no CSV logger. Default: the method, the swept keys and the config's fingerprint.
        percent: tables in percent with one decimal (as the published 7x7 and methods tables)
            instead of fractions with six digits (as the published λ tables).
        mark_best: bold the best value of each table column (as the methods table).
    """

    grid: dict[str, list[Any]]
    name: Optional[str] = None
    percent: bool = False
    mark_best: bool = False


@dataclass(frozen=True)
class Point:
    """One grid point: its file-safe name and the config values it sets."""

    name: str
    overrides: dict[str, Any]

    def cli_args(self) -> list[str]:
        """``--KEY=VALUE`` flags, as a user (or ``wandb agent``) would append them to ``mergelit test``."""
        return [f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in self.overrides.items()]


# ---- the grid ----------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    # jsonargparse hands nested mappings of an ``Any`` value over as Namespaces: plain dicts here.
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def _value_name(value: Any) -> str:
    if isinstance(value, dict) and "class_path" in value:
        # A whole method: TaskArithmetic(scaling_factor=0.5), its arguments that are not defaults.
        args = ",".join(f"{k}={tables.format_value(v)}" for k, v in tables.changed_args(value).items())
        name = value["class_path"].rsplit(".", 1)[-1]
        return f"{name}({args})" if args else name
    return tables.format_value(value)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,()+-]", "_", name)


def grid_points(grid: dict[str, list[Any]]) -> list[Point]:
    """Every combination of the grid's values, in order, named ``key=value,key=value`` after the
    last part of each key (``scaling_factor=0.3``; a swept ``model`` is named by its class)."""
    shorts = [tables.short_key(key) for key in grid]
    labels = [key if shorts.count(short) > 1 else short for key, short in zip(grid, shorts)]
    points, seen = [], {}
    for values in itertools.product(*grid.values()):
        overrides = dict(zip(grid, values))
        parts = [
            _value_name(value) if key == "model" else f"{label}={_value_name(value)}"
            for (key, value), label in zip(overrides.items(), labels)
        ]
        name = _file_safe(",".join(parts))
        if name in seen:
            raise ValueError(
                f"sweep.grid gives the point {name!r} twice ({seen[name]} and {overrides}); list each value once."
            )
        seen[name] = overrides
        points.append(Point(name, overrides))
    return points


def _known_keys(config) -> list[str]:
    keys = set()
    for key in config.keys():
        # The sweep's own settings are not sweepable; model.init_args.pool is linked from `pool:`.
        if key.split(".")[0] in ("config", "sweep", "output_dir", "overwrite") or key == "model.init_args.pool":
            continue
        parts = key.split(".")
        keys.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(keys)


def check_grid(grid: dict[str, list[Any]], config) -> None:
    """Fail before any work on a grid that cannot run: no keys, a key the config lacks (with
    close matches), an empty value list, or a non-number for a key that holds a number."""
    if not grid:
        raise ValueError(
            "sweep.grid is empty: give at least one config key and its values, e.g. "
            "`sweep: {grid: {model.init_args.scaling_factor: [0.0, 0.5, 1.0]}}`."
        )
    known = _known_keys(config)
    for key, values in grid.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=5, cutoff=0.6)
            close += [k for k in known if tables.short_key(k) == tables.short_key(key) and k not in close]
            hint = f" Close matches: {', '.join(close)}." if close else ""
            if key.startswith("model.init_args.") and config.model.class_path == PLACEHOLDER_MODEL:
                hint += " No method is configured: add its config, e.g. -c configs/methods/task_arithmetic.yaml."
            raise ValueError(
                f"sweep.grid key {key!r} is not a key of this config.{hint} `--print_config` lists every key."
            )
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep.grid[{key!r}] is {values!r}: give a non-empty list of values.")
        current = config.get(key)
        if _is_number(current):
            bad = [v for v in values if not _is_number(v)]
            if bad:
                raise ValueError(
                    f"sweep.grid[{key!r}] must list numbers ({key} is {current!r} in the config), "
                    f"but holds {bad[0]!r} ({type(bad[0]).__name__})."
                )


# ---- the output folder -------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _excluded(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def fingerprint_config(dumped: dict[str, Any], swept: Sequence[str]) -> dict[str, Any]:
    """The flattened config that decides the reports: without the swept keys and ``NOT_IN_FINGERPRINT``."""
    flat = _flatten(dumped)
    return {k: flat[k] for k in sorted(flat) if not _excluded(k, (*NOT_IN_FINGERPRINT, *swept))}


def fingerprint(config: dict[str, Any], swept: Sequence[str]) -> str:
    text = json.dumps({"config": config, "swept": sorted(swept)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    lines = [f"  {k}: {old.get(k, '<unset>')!r} there, {new.get(k, '<unset>')!r} now" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"  ... and {len(keys) - limit} more")
    return "\n".join(lines)


def is_complete(path: Path, tasks: Sequence[str]) -> bool:
    """Whether ``path`` is a valid report with every task and the average (so the point is done)."""
    try:
        tables.load_report(path, tasks)
    except ValueError:
        return False
    return True


def prepare_folder(folder: Path, manifest: dict[str, Any], points: Sequence[Point], overwrite: bool) -> None:
    """Check that ``folder`` holds nothing but this sweep's results (or clear it with ``overwrite``),
    then write the manifest. Raises ``FileExistsError`` naming the differences otherwise."""
    path = folder / tables.MANIFEST
    names = {f"{p.name}.json" for p in points}
    conflict = None
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("fingerprint") != manifest["fingerprint"]:
            conflict = f"{folder} holds a sweep of another config:\n" + _differences(
                {"sweep keys": old.get("grid_keys"), **(old.get("config") or {})},
                {"sweep keys": manifest["grid_keys"], **manifest["config"]},
            )
            names |= {f"{n}.json" for n in old.get("points", {})}
    else:
        reports = sorted(n for n in names if (folder / n).exists())
        if reports:
            conflict = f"{folder} holds reports ({', '.join(reports[:3])}) that no sweep manifest ({tables.MANIFEST}) vouches for."
    if conflict:
        if not overwrite:
            raise FileExistsError(
                f"{conflict}\nRefusing to mix results: choose another --output_dir, or pass --overwrite to replace them."
            )
        for name in sorted(names) + ["table.md", "table.csv", "plot.png", tables.MANIFEST]:
            (folder / name).unlink(missing_ok=True)
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")


# ---- the command -------------------------------------------------------------------------
class SweepCLI(MergeCLI):
    """``MergeCLI`` that runs every point of ``sweep.grid`` as a test run, in one process.

    Args:
        args: the command line after ``mergelit sweep`` (default: ``sys.argv[2:]``).
        compare: tables as the methods table (percent, best per column in bold): ``mergelit compare -c``.
    """

    def __init__(self, args: Optional[list[str]] = None, compare: bool = False, **kwargs):
        self.args = list(sys.argv[2:] if args is None else args)
        self.compare = compare
        self.shared: list[tuple[type, dict[str, Any], Any]] = []
        self.point: Optional[Point] = None
        self.group: Optional[str] = None
        self.wandb_init: Optional[tuple[type, dict[str, Any]]] = None
        kwargs.setdefault("parser_kwargs", {"description": __doc__.split("\n", 1)[0].replace("``", "")})
        super().__init__(args=self.args, run=False, **kwargs)
        # Points must not rewrite the log folder's config.yaml, each with its own values: the
        # sweep writes its own config (grid included) to the output folder instead.
        self.save_config_callback = None

    def parse_arguments(self, parser, args) -> None:
        # As LightningCLI's, minus its warning about args given while sys.argv has some:
        # `mergelit sweep ...` passes the arguments after `sweep`, on purpose.
        self.config = parser.parse_args(args)

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
    def instantiate_classes(self) -> None:
        # LightningCLI's, with instantiators that reuse (or make per point) the shared parts.
        self.config_init = self.parser.instantiate_classes(
            self.config,
            instantiators=[
                (self._reuse, ModelPool, True),
                (self._reuse, LightningDataModule, True),
                (self._logger, Logger, True),
            ],
        )
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self.trainer = self.instantiate_trainer()

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
        return class_type(*args, **kwargs)

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

    def run_point(self, point: Point, config) -> dict:
        """Run one point as ``mergelit test`` runs: seed, instantiate, ``before_test``, ``trainer.test``."""
        self.config, self.point = config, point
        # Lightning's model instantiator records hyperparameters from this dump: make it the point's.
        self.__dict__.pop("config_dump", None)
        self._set_seed()
        self.instantiate_classes()
        loggers = tracking.wandb_loggers(self.trainer)
        for logger in loggers:
            logger.log_hyperparams({"sweep/point": point.name, "sweep/group": self.group, **point.overrides})
        try:
            self.before_test()
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        finally:
            for logger in loggers:
                tracking.finish(logger)
        return self.model.report

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
        grid = {key: [_plain(v) for v in values] if isinstance(values, list) else values for key, values in base.sweep.grid.items()}
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
        base = self.config
        sweep: Sweep = self.config_init.sweep
        grid, points, configs = self.plan()
        tasks = list(self.config_init.pool.tasks)
        dumped = yaml.safe_load(self.parser.dump(base, skip_none=False))
        config = fingerprint_config(dumped, list(grid))
        stamp = fingerprint(config, list(grid))
        method = "Merging methods" if "model" in grid else tables.method_name(base.model.class_path)
        keys = "-".join(tables.short_key(k) for k in grid)
        self.group = sweep.name or _file_safe(f"{method.replace(' ', '-')}-{keys}-{stamp[:8]}")
        folder = Path(base.output_dir or self.default_output_dir(self.group))
        manifest = {
            "format": _MANIFEST_FORMAT,
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
        from tqdm.auto import tqdm

        with tqdm(
            total=len(points), initial=len(points) - len(todo), desc=f"Sweep {self.group}", unit="point",
            disable=rank_zero_only.rank != 0, dynamic_ncols=True,
        ) as bar:
            for point, config_ in todo:
                bar.set_postfix_str(point.name)
                report = self.run_point(point, config_)
                log_dir = self.trainer.log_dir  # on every rank: it is a collective call under DDP
                if rank_zero_only.rank == 0:
                    write_report(report, folder / f"{point.name}.json")
                    if log_dir:
                        # The method also wrote the report to the log folder as report.json, where
                        # it would only ever hold the last point's numbers.
                        Path(log_dir, "report.json").unlink(missing_ok=True)
                bar.update()
        self.config, self.point = base, None
        if rank_zero_only.rank == 0:
            self.write_results(folder, points, grid, tasks, sweep, method, ran=len(todo))
        return folder

    def write_results(
        self, folder: Path, points: Sequence[Point], grid: dict, tasks: list[str], sweep: Sweep, method: str, ran: int
    ) -> None:
        rows = [
            tables.Row([tables.format_value(v) for v in p.overrides.values()], tables.load_report(folder / f"{p.name}.json", tasks))
            for p in points
        ]
        headers = [tables.header_of(key) for key in grid]
        md, _ = tables.write_tables(folder, rows, tasks, headers, percent=sweep.percent, mark_best=sweep.mark_best)
        values = next(iter(grid.values()))
        if len(grid) == 1 and tables.is_numeric(values):
            plot = tables.plot_sweep(folder / "plot.png", values, rows, tasks, xlabel=headers[0], title=method)
        else:
            plot = tables.plot_heatmap(folder / "plot.png", rows, tasks, title=method, ylabel=", ".join(headers))
        markdown = md.read_text()
        if self.wandb_init is not None:
            class_type, kwargs = self.wandb_init
            kwargs = {**kwargs, **self._wandb_run(f"{self.group}/summary", "sweep-summary", kwargs)}
            columns = [*headers, *tasks, "average"]
            data = [[*r.labels, *(r.report[c]["accuracy"] for c in [*tasks, "average"])] for r in rows]
            tracking.log_summary(class_type(**kwargs), columns, data, plot, markdown)
        print(
            f"\n{method}: {len(points)} points ({ran} run now, {len(points) - ran} already done)\n\n{markdown}\n"
            f"Reports, table.md, table.csv, plot.png: {folder}"
        )


def compare_main(args: Sequence[str]) -> None:
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
    ns = parser.parse_args(args)
    print(tables.compare(ns.paths, ns.output_dir))
    if ns.output_dir:
        print(f"table.md, table.csv, plot.png: {ns.output_dir}")


def main(args: Sequence[str]) -> None:
    """``args`` starts with ``sweep`` or ``compare``."""
    command, rest = args[0], list(args[1:])
    if command == "compare":
        compare_main(rest)
    else:
        SweepCLI(rest).run()

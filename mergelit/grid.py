"""Sweep grids and sweep folders: naming the points (a method's points are one *group*, selection chooses
within it), checking the grid, the manifest ``sweep.json`` and resume.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from mergelit import tables
from mergelit.errors import BadData, is_number
from mergelit.report import atomic_write_text

# The sweep's base config needs *a* model even when the grid lists whole methods (``model: [...]``);
# this placeholder is never run: a sweep that does not sweep ``model`` must name one.
PLACEHOLDER_MODEL = "mergelit.methods.MergeMethod"

# Settings that cannot change a report: left out of the fingerprint, so a resumed sweep may change them.
NOT_IN_FINGERPRINT = (
    "config", "sweep", "output_dir", "overwrite", "report_save_path", "merged_model_save_path", "trainer.logger",
    "trainer.callbacks", "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.default_root_dir",
    "data.num_workers", "data.cache_dir", "save_predictions", "extra_metrics", "verbose",
)

MANIFEST_FORMAT = 1
ALL_METHODS = "all"  # sweep.grid.model: every method meant for comparison (mergelit.sweep.every_method)
TUNED_METHODS = "tuned"  # the same methods, each with its own range (MergeMethod.search)
# The files of a sweep folder beside its points' reports and criterion files.
SWEEP_FILES = ("table.md", "table.csv", "plot.png", "config.yaml", tables.SELECTION, tables.MANIFEST)


def is_placeholder(class_path: str) -> bool:
    # jsonargparse may spell it mergelit.MergeMethod.
    return str(class_path).rsplit(".", 1)[-1] == PLACEHOLDER_MODEL.rsplit(".", 1)[-1]


@dataclass
class Sweep:
    """A grid of config values; every combination is one point, run as one ``mergelit test``.

    Args:
        grid: config key -> list of values, e.g. ``model.init_args.scaling_factor: [0.0, 0.1]``. Keys
            are the dotted names ``--print_config`` shows; ``model`` takes whole methods
            (``{class_path: ..., init_args: ...}``), or ``all``: every method of ``mergelit.methods``
            meant for comparison, with its recommended arguments, or ``tuned``: the same, each with
            the range of its ``search`` attribute as its own grid. A method may carry its own grid
            of arguments, ``{class_path: ..., grid: {scaling_factor: [0.1, 0.2]}}``: one point per
            combination, all of them one *method* for selection and ``compare`` (each method at
            its own choice). Several keys: their cartesian product, the first key varying slowest.
        name: the sweep's name: the W&B group, and the output folder ``lightning_logs/sweeps/NAME``
            when there is no CSV logger. Default: the method, the swept keys and the config's fingerprint.
        percent: tables in percent with one decimal (as the published 7x7 and methods tables)
            instead of fractions with six digits (as the published λ tables).
        mark_best: bold the best value of each table column (as the methods table).
        select_on: choose each method's point without the reported labels (``mergelit.selection``):
            ``dev`` (accuracy on the labeled dev rows, ``data.dev_source``: held out of validation
            by default), ``agreement`` (label-free: agreement of the merged model's predictions
            with each task's fine-tuned model on the dev rows' texts), or ``none`` (every point
            scored on validation, no selection). With selection every point is scored on the dev
            rows only, the choice is written to ``selection.json``, and only each method's
            **selected** point is scored on the validation rows (its report equals ``mergelit
            test`` of that point).
        oracle: with selection, also score every point on the validation rows, so that the table
            has each method's **oracle** row (the best validation accuracy of its points: what
            published tables report) beside the selected one.
        extra_metrics: the methods leaderboard (``compare``) also shows CoLA MCC, MRPC/QQP F1 and
            MNLI mismatched accuracy; ``false``: accuracy only.
    """

    grid: dict[str, Any]
    name: Optional[str] = None
    percent: bool = False
    mark_best: bool = False
    select_on: Literal["none", "dev", "agreement"] = "none"
    oracle: bool = False
    extra_metrics: bool = True


@dataclass(frozen=True)
class Point:
    """A grid point: its file-safe name, config values, method group and the arguments its method's grid sweeps."""

    name: str
    overrides: dict[str, Any]
    group: str = ""
    swept: tuple[str, ...] = ()

    def cli_args(self) -> list[str]:
        """``--KEY=VALUE`` flags, as a user (or ``wandb agent``) would append them to ``mergelit test``."""
        return [f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in self.overrides.items()]


def plain(value: Any) -> Any:
    # jsonargparse hands nested mappings of an ``Any`` value over as Namespaces: plain dicts here.
    return value.as_dict() if hasattr(value, "as_dict") else value


def _value_name(value: Any, shown: Sequence[str] = ()) -> str:
    if isinstance(value, dict) and "class_path" in value:
        # A whole method: TaskArithmetic(scaling_factor=0.5), its arguments that are not defaults
        # (and those its own grid sweeps, default or not).
        args = tables.changed_args(value)
        args.update({k: value.get("init_args", {})[k] for k in shown if k not in args})
        text = ",".join(f"{k}={tables.format_value(v)}" for k, v in args.items())
        name = value["class_path"].rsplit(".", 1)[-1]
        return f"{name}({text})" if text else name
    return tables.format_value(value)


def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,()+-]", "_", name)


def expand_models(values: Sequence[Any]) -> list[tuple[Any, str, tuple[str, ...]]]:
    """A grid's ``model`` values as ``(spec, group, swept)`` per point: a method with its own ``grid:``
    gives one spec per combination (the first argument slowest), one group named after its fixed arguments."""
    out = []
    for value in values:
        if not (isinstance(value, dict) and "grid" in value):
            out.append((value, tables.method_label(value) if isinstance(value, dict) and "class_path" in value else str(value), ()))
            continue
        spec = {k: v for k, v in value.items() if k != "grid"}
        own = value["grid"]
        if not isinstance(own, dict) or not own or not all(isinstance(v, list) and v for v in own.values()):
            raise ValueError(
                f"sweep.grid.model: the grid of {spec.get('class_path')!r} is {own!r}; give a mapping of "
                f"argument -> non-empty list, e.g. `grid: {{scaling_factor: [0.1, 0.3, 0.5]}}`."
            )
        fixed = dict(spec.get("init_args") or {})
        group = tables.method_label({**spec, "init_args": {k: v for k, v in fixed.items() if k not in own}})
        for combination in itertools.product(*own.values()):
            out.append(({**spec, "init_args": {**fixed, **dict(zip(own, combination))}}, group, tuple(own)))
    return out


def grid_points(grid: dict[str, list[Any]]) -> list[Point]:
    """Every combination of the grid's values, in order, named ``key=value,...`` after the last part of
    each key (a swept ``model``: its class and the arguments it sets, and its method group)."""
    shorts = [tables.short_key(key) for key in grid]
    labels = [key if shorts.count(short) > 1 else short for key, short in zip(grid, shorts)]
    values = {key: expand_models(v) if key == "model" else [(x, "", ()) for x in v] for key, v in grid.items()}
    points, seen = [], {}
    for combination in itertools.product(*values.values()):
        overrides = {key: value for key, (value, _, _) in zip(grid, combination)}
        parts = [
            _value_name(value, swept) if key == "model" else f"{label}={_value_name(value)}"
            for (key, (value, _, swept)), label in zip(zip(grid, combination), labels)
        ]
        name = file_safe(",".join(parts))
        if name in seen:
            raise ValueError(
                f"sweep.grid gives the point {name!r} twice ({seen[name]} and {overrides}); list each value once."
            )
        seen[name] = overrides
        group, swept = next(((group, swept) for key, (_, group, swept) in zip(grid, combination) if key == "model"), ("", ()))
        points.append(Point(name, overrides, group, swept))
    return points


def check_grid(grid: dict[str, list[Any]], config) -> None:
    """Fail before any work on a grid that cannot run: no keys, a key the config lacks (with
    close matches), an empty value list, or a non-number for a key that holds a number."""
    if not grid:
        raise ValueError(
            "sweep.grid is empty: give at least one config key and its values, e.g. "
            "`sweep: {grid: {model.init_args.scaling_factor: [0.0, 0.5, 1.0]}}`."
        )
    known = set()
    for key in config.keys():
        # The sweep's own settings are not sweepable; model.init_args.pool is linked from `pool:`.
        if key.split(".")[0] not in ("config", "sweep", "output_dir", "overwrite") and key != "model.init_args.pool":
            parts = key.split(".")
            known.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    known = sorted(known)
    for key, values in grid.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=5, cutoff=0.6)
            close += [k for k in known if tables.short_key(k) == tables.short_key(key) and k not in close]
            hint = f" Close matches: {', '.join(close)}." if close else ""
            if key.startswith("model.init_args.") and is_placeholder(config.model.class_path):
                hint += " No method is configured: add its config, e.g. -c configs/methods/task_arithmetic.yaml."
            raise ValueError(
                f"sweep.grid key {key!r} is not a key of this config.{hint} `--print_config` lists every key."
            )
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep.grid[{key!r}] is {values!r}: give a non-empty list of values.")
        current = config.get(key)
        bad = [v for v in values if not is_number(v)] if is_number(current) else []
        if bad:
            raise ValueError(
                f"sweep.grid[{key!r}] must list numbers ({key} is {current!r} in the config), "
                f"but holds {bad[0]!r} ({type(bad[0]).__name__})."
            )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def weights_fingerprint(pool: Any) -> dict[str, str]:
    """``{"weights.<model>": content hash}`` of every model of ``pool`` (SHA-256 of every tensor, not the
    path: a checkpoint replaced at the same path changes the sweep's fingerprint). It loads the pool."""
    weights = {"weights.pretrained": pool.pretrained_fingerprint()[:16]}
    for task in pool.tasks:
        digest, pad = pool.fingerprint(task).split("|", 1)
        weights[f"weights.{task}"] = f"{digest[:16]}|{pad}"
    return weights


def fingerprint(dumped: dict[str, Any], swept: Sequence[str], pool: Any) -> tuple[dict[str, Any], str]:
    """The flattened config that decides the reports (without the swept keys and ``NOT_IN_FINGERPRINT``,
    with ``weights_fingerprint(pool)``), and its hash."""
    flat = _flatten(dumped)
    excluded = (*NOT_IN_FINGERPRINT, *swept)
    config = {k: flat[k] for k in sorted(flat) if not any(k == p or k.startswith(p + ".") for p in excluded)}
    config.update(weights_fingerprint(pool))
    text = json.dumps({"config": config, "swept": sorted(swept)}, sort_keys=True, default=str)
    return config, hashlib.sha256(text.encode()).hexdigest()[:16]


def is_complete(path: Path, tasks: Sequence[str]) -> bool:
    """Whether ``path`` is a valid report with every task and the average (so the point is done)."""
    try:
        tables.load_report(path, tasks)
    except ValueError:
        return False
    return True


def prepare_folder(folder: Path, manifest: dict[str, Any], points: Sequence[Point], overwrite: bool) -> None:
    """Check that ``folder`` holds nothing but this sweep's results (or clear it with ``overwrite``),
    then write the manifest; else ``FileExistsError`` naming the differences (or the damaged manifest).
    ``folder`` must not be a link, nor hold links out of it (reading a report through one would read elsewhere)."""
    tables.check_output_folder(folder, "sweep output folder (--output_dir)")
    path = folder / tables.MANIFEST
    names = {f"{p.name}.json" for p in points}
    for name in [*sorted(names), *(n.replace(".json", tables.CRITERION_SUFFIX) for n in sorted(names)), *SWEEP_FILES]:
        if (folder / name).is_symlink():
            tables.inside(folder, name, f"The sweep folder {str(folder)!r}")
    conflict = None
    if path.is_file():
        fix = "so the results in the folder cannot be matched to a config."
        try:  # the manifest an earlier sweep left: damaged if not JSON, without a fingerprint, or leaving the folder
            old = tables.read_json(path, "The sweep manifest", fix)
            if not (isinstance(old, dict) and isinstance(old.get("fingerprint"), str)
                    and isinstance(old.get("points", {}), dict) and isinstance(old.get("config", {}), dict)):
                raise BadData(f"The sweep manifest {str(path)!r} is damaged (no fingerprint or points); {fix}")
            for name in old.get("points", {}):
                tables.inside(folder, f"{name}.json", f"The sweep manifest {str(path)!r}")
        except BadData as error:
            old, conflict = {}, str(error)
        if conflict is None and old.get("fingerprint") != manifest["fingerprint"]:
            there = {"sweep keys": old.get("grid_keys"), **(old.get("config") or {})}
            now = {"sweep keys": manifest["grid_keys"], **manifest["config"]}
            keys = sorted(k for k in set(there) | set(now) if there.get(k, "<unset>") != now.get(k, "<unset>"))
            lines = [f"  {k}: {there.get(k, '<unset>')!r} there, {now.get(k, '<unset>')!r} now" for k in keys[:6]]
            if len(keys) > 6:
                lines.append(f"  ... and {len(keys) - 6} more")
            conflict = f"{folder} holds a sweep of another config:\n" + "\n".join(lines)
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
        criteria = [n.replace(".json", tables.CRITERION_SUFFIX) for n in sorted(names)]
        for name in sorted(names) + criteria + ["table.md", "table.csv", "plot.png", tables.SELECTION, tables.MANIFEST]:
            (folder / name).unlink(missing_ok=True)
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")

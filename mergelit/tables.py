"""Result tables and plots from report files: sweep tables, the 7x7 heatmap, the leaderboard (``compare``).

    mergelit compare lightning_logs/version_3 sweeps/ta sweeps/ties --against task_arithmetic

Tables have the published layout (``shared/reference/seed_results.md``) and a full-precision CSV twin; the
leaderboard's rows and columns are in docs/sweeps.md, what a results folder must hold in docs/reliability.md.
"""

from __future__ import annotations

import base64
import csv
import inspect
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from mergelit import uncertainty
from mergelit.configfile import load_yaml
from mergelit.errors import BadData, FileMissing, KeyMissing, NotWritable, is_number
from mergelit.metrics import binary_metric
from mergelit.report import (EXTRA_ENTRIES, EXTRA_METRICS, NON_TASK_ENTRIES, PROTOCOL, Report, atomic_write_text,
                             make_report, read_predictions, read_report)
from mergelit.tasks import GLUE_TASKS, TASKS, ordered_tasks, task_title

# Headers of the config keys that are not a method's own arguments (those show its ``symbols``).
KEY_HEADERS = {"task": "Model", "model": "Method"}
MANIFEST = "sweep.json"  # makes a folder a sweep folder (written by mergelit.sweep)
CRITERION_SUFFIX = ".criterion.json"  # a point's selection criterion, beside its report
SELECTION = "selection.json"  # the selection step's result (mergelit.selection.write_selection)


@dataclass
class Row:
    """A table row: its labels and report (None: not scored on validation, shown "–"). ``role``: ``selected``,
    ``oracle``, ``individual`` (the 7x7 diagonal) or ``""``; ``data`` replaces the report's ``protocol.data``."""

    labels: list[str]
    report: Optional[Report]
    role: str = ""
    data: Optional[str] = None


# ---- labels ------------------------------------------------------------------------------
def short_key(key: str) -> str:
    """``model.init_args.scaling_factor`` -> ``scaling_factor``."""
    return key.rsplit(".", 1)[-1]


def method_class(class_path: str) -> Optional[type]:
    """The class ``class_path`` names among ``mergelit.methods.method_classes()`` (never imported), or None."""
    from mergelit.methods.base import method_class as lookup
    try:
        return lookup(class_path) if isinstance(class_path, str) else None
    except KeyMissing:
        return None


def symbol(name: str, class_path: Optional[str] = None) -> str:
    """An argument's symbol as the method's class declares it (``scaling_factor`` -> ``λ``), else its name."""
    cls = method_class(class_path) if class_path else None
    return getattr(cls, "symbols", {}).get(name, name)


def header_of(key: str, class_path: Optional[str] = None) -> str:
    """A sweep table's column header for a swept config key (the method's symbol for its arguments)."""
    short = short_key(key)
    return KEY_HEADERS.get(short) or symbol(short, class_path)


def format_value(value: Any) -> str:
    """A config value as a table label (a method spec becomes the method's name)."""
    if isinstance(value, dict) and "class_path" in value:
        return method_label(value)
    return repr(value) if isinstance(value, float) else str(value)


def method_name(class_path: str) -> str:
    """The method class's ``display_name`` ("Task Arithmetic"), else its class name."""
    return getattr(method_class(class_path), "display_name", None) or class_path.rsplit(".", 1)[-1]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def changed_args(spec: dict[str, Any], always: Sequence[str] = ()) -> dict[str, Any]:
    """A method spec's ``init_args`` that differ from its class's defaults or are in ``always``, not cache paths."""
    try:
        parameters = inspect.signature(method_class(spec["class_path"]).__init__).parameters
    except (AttributeError, ValueError, TypeError):
        parameters = {}
    defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
    skipped = ("pool", "cache_dir", "coefficients_path")
    return {k: v for k, v in (spec.get("init_args") or {}).items()
            if k not in skipped and (k in always or not (k in defaults and _same(defaults[k], v)))}


def method_label(spec: dict[str, Any], always: Sequence[str] = ()) -> str:
    """``{"class_path": ...TaskArithmetic, "init_args": {"scaling_factor": 0.5}}`` -> ``Task Arithmetic (λ=0.5)``."""
    args = [f"{symbol(k, spec['class_path'])}={format_value(v)}" for k, v in changed_args(spec, always).items()]
    name = method_name(spec["class_path"])
    return f"{name} ({', '.join(args)})" if args else name


# ---- tables ------------------------------------------------------------------------------
def _accuracy(report: Report, key: str) -> float:
    return float(report[key]["accuracy"])


def _csv_value(value: Any) -> Any:
    return "" if value is None else repr(value) if isinstance(value, float) else value


def markdown_table(rows: Sequence[Row], tasks: Sequence[str], headers: Sequence[str], percent: bool = False,
                   mark_best: bool = False) -> str:
    """The published layout: label column(s), a column per task, ``Avg.``; ``percent``: in percent with the tasks'
    published names, else fractions to six digits; ``mark_best``: each column's best value in bold (ties too)."""
    columns = [*tasks, "average"]
    scored = [r for r in rows if r.report is not None]
    best = {c: max(_accuracy(r.report, c) for r in scored) for c in columns} if mark_best and scored else {}
    names = [task_title(t) for t in tasks] if percent else list(tasks)
    lines = ["| " + " | ".join([*headers, *names, "Avg."]) + " |", "|" + "---|" * (len(headers) + len(columns))]
    for row in rows:
        cells = [task_title(label) if percent else label for label in row.labels]
        for column in columns:
            value = None if row.report is None else _accuracy(row.report, column)
            text = "–" if value is None else f"{100 * value:.1f}" if percent else repr(round(value, 6))
            cells.append(f"**{text}**" if column in best and value == best[column] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Row], tasks: Sequence[str], headers: Sequence[str]) -> str:
    """The same rows as CSV: label column(s), then accuracies as full-precision fractions."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*headers, *tasks, "average"])
    for row in rows:
        accuracies = (None if row.report is None else _accuracy(row.report, c) for c in [*tasks, "average"])
        writer.writerow([*row.labels, *map(_csv_value, accuracies)])
    return out.getvalue()


def write_tables(folder: str | os.PathLike, rows: Sequence[Row], tasks: Sequence[str], headers: Sequence[str],
                 percent: bool = False, mark_best: bool = False) -> tuple[Path, Path]:
    """Write ``folder/table.md`` and ``folder/table.csv`` (atomically); return their paths."""
    md = atomic_write_text(Path(folder) / "table.md", markdown_table(rows, tasks, headers, percent, mark_best))
    return md, atomic_write_text(Path(folder) / "table.csv", csv_table(rows, tasks, headers))


# ---- plots -------------------------------------------------------------------------------
def _figure(size: tuple[float, float]):
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers, CI and tests
    import matplotlib.pyplot as plt
    return plt, *plt.subplots(figsize=size)


def _save(plt, fig, ax, path: str | os.PathLike, title: str) -> Path:
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def is_numeric(values: Sequence[Any]) -> bool:
    return bool(values) and all(_number(v) is not None for v in values)


def plot_sweep(path: str | os.PathLike, xs: Sequence[float], rows: Sequence[Row], tasks: Sequence[str], xlabel: str,
               title: str = "", ylabel: str = "accuracy (%)") -> Path:
    """Accuracy (or ``ylabel``) of each task against the swept value, the average in bold, its best point marked."""
    plt, fig, ax = _figure((7, 4.5))
    for task in tasks:
        accuracy = [100 * _accuracy(r.report, task) for r in rows]
        ax.plot(xs, accuracy, marker="o", markersize=3, linewidth=1, alpha=0.8, label=task)
    average = [100 * _accuracy(r.report, "average") for r in rows]
    ax.plot(xs, average, color="black", linewidth=3, marker="o", label="average")
    best = max(range(len(rows)), key=lambda i: average[i])
    ax.plot([xs[best]], [average[best]], marker="*", markersize=18, color="gold", markeredgecolor="black", zorder=5)
    ax.annotate(f"best {xlabel}={format_value(xs[best])}: {average[best]:.1f}%", (xs[best], average[best]),
                textcoords="offset points", xytext=(0, 12), ha="center", fontweight="bold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="best")
    return _save(plt, fig, ax, path, title)


def plot_heatmap(path: str | os.PathLike, rows: Sequence[Row], tasks: Sequence[str], title: str = "",
                 ylabel: str = "") -> Path:
    """Rows x (tasks, Avg.) accuracy in percent as a heatmap with the values written in (the 7x7 table)."""
    columns = [*tasks, "average"]
    values = [[100 * _accuracy(r.report, c) for c in columns] for r in rows]
    plt, fig, ax = _figure((1.0 * len(columns) + 2.5, 0.55 * len(rows) + 1.8))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), [task_title(c) for c in tasks] + ["Avg."])
    ax.set_yticks(range(len(rows)), [", ".join(task_title(label) for label in r.labels) for r in rows])
    low, high = image.get_clim()
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            dark = value < (low + high) / 2
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xlabel("task scored (with its own head)")
    if ylabel:
        ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return _save(plt, fig, ax, path, title)


def plot_costs(path: str | os.PathLike, rows: Sequence[Row], title: str = "") -> Path:
    """Average accuracy (%) against the total cost, one labelled point per row (no cost recorded: at 0)."""
    plt, fig, ax = _figure((7, 4.5))
    for row in rows:
        x = total_cost(row.report) or 0.0
        y = 100 * _accuracy(row.report, "average")
        kind = _protocol(row.report).get("kind", "merged")
        marker = {"merged": "o", "task-aware": "s", "ensemble": "^"}.get(kind, "D")
        ax.plot([x], [y], marker=marker, markersize=8, linestyle="none")
        ax.annotate(row.labels[0], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("total cost: prepare + merge (s; o merged, s task-aware, ^ ensemble)")
    ax.set_ylabel("average accuracy (%)")
    ax.grid(alpha=0.3)
    return _save(plt, fig, ax, path, title)


# ---- reading runs ------------------------------------------------------------------------
# Nothing in a results folder is trusted before it is checked: a report's numbers, a sweep's manifest and
# selection, every path they name (resolved inside the folder), every method class (looked up, never
# imported). Every error names the file. The rules are in docs/reliability.md ("What a report may hold").
METRIC_BOUNDS = {"loss": (0.0, math.inf), "mcc": (-1.0, 1.0)}  # every other metric is a fraction in [0, 1]
AVERAGE_TOLERANCE = 1e-9  # relative, of ``average`` against the mean of the report's tasks: float rounding only


def _number(value: Any) -> Optional[float]:
    return float(value) if is_number(value) else None


def _check_entry(name: str, values: Any) -> None:
    """A mapping with ``accuracy`` and ``loss``, every metric a finite number within its bounds."""
    if not isinstance(values, dict):
        raise BadData(f"the report's {name!r} entry is {values!r:.60}, not a mapping of metrics")
    for metric in ("accuracy", "loss"):
        if metric not in values:
            raise BadData(f"the report's {name!r} entry has no {metric!r}")
    for metric, value in values.items():
        if not is_number(value, finite=True):
            raise BadData(f"the report's {name}.{metric} is {value!r:.60}, not a finite number")
        low, high = METRIC_BOUNDS.get(metric, (0.0, 1.0))
        if not low <= value <= high:
            bounds = "a fraction in [0, 1]" if (low, high) == (0.0, 1.0) else f"in [{low:g}, {high:g}]"
            percent = " (a report in percent? reports hold fractions)" if metric != "loss" and 1 < value <= 100 else ""
            raise BadData(f"the report's {name}.{metric} is {value!r}, not {bounds}{percent}")


def _check_protocol(protocol: Any) -> None:
    """Not partial, and the parts the leaderboard reads of the types it reads."""
    if protocol is None:
        return
    if not isinstance(protocol, dict):
        raise BadData(f"the report's 'protocol' entry is {protocol!r:.60}, not a mapping")
    partial = protocol.get("partial", False)
    if not isinstance(partial, bool):
        raise BadData(f"the report's protocol.partial is {partial!r:.60}, not true or false")
    if partial:
        raise BadData("the report is from a partial evaluation (limit_test_batches / fast_dev_run), not a complete one")
    for key in ("method", "class_path", "kind", "data"):
        if key in protocol and not isinstance(protocol[key], str):
            raise BadData(f"the report's protocol.{key} is {protocol[key]!r:.60}, not text")
    if not isinstance(protocol.get("costs") or {}, dict):
        raise BadData(f"the report's protocol.costs is {protocol['costs']!r:.60}, not a mapping")
    per_example = protocol.get("per_example")
    if per_example is not None and not isinstance(per_example, dict):
        raise BadData(f"the report's protocol.per_example is {per_example!r:.60}, not a mapping")
    for entry, stored in (per_example or {}).items():
        rows = stored.get("rows") if isinstance(stored, dict) else None
        usable = (isinstance(rows, int) and not isinstance(rows, bool) and rows > 0
                  and isinstance(stored.get("ids_sha256"), str) and isinstance(stored.get("correct"), str))
        try:
            usable = usable and 8 * len(base64.b64decode(stored["correct"], validate=True)) >= rows
        except ValueError:
            usable = False
        if not usable:
            raise BadData(f"the report's protocol.per_example.{entry} is damaged (expected rows, ids_sha256 and the "
                          f"packed correctness of each row)")
    intervals = protocol.get("uncertainty")
    if intervals is not None:
        accuracy = intervals.get("accuracy") if isinstance(intervals, dict) else None
        if not isinstance(accuracy, dict):
            raise BadData("the report's protocol.uncertainty has no 'accuracy' mapping of intervals")
        for entry, pair in accuracy.items():
            if not (isinstance(pair, list) and len(pair) == 2 and all(is_number(v, finite=True) and 0 <= v <= 1 for v in pair)
                    and pair[0] <= pair[1]):
                raise BadData(f"the report's protocol.uncertainty.accuracy.{entry} is {pair!r:.60}, not an interval "
                              f"[low, high] of fractions")


def _check_names(report: dict[str, Any]) -> list[str]:
    """The report's tasks in the one task order; any entry but a GLUE task or ``NON_TASK_ENTRIES`` is refused."""
    unknown = [key for key in report if key not in TASKS and key not in NON_TASK_ENTRIES]
    if unknown:
        raise BadData(f"the report has an entry {unknown[0]!r}, which is no GLUE task (the tasks are "
                      f"{', '.join(TASKS)}; the other entries are {', '.join(NON_TASK_ENTRIES)})")
    tasks = [t for t in TASKS if t in report]
    if not tasks:
        raise BadData("the report names no task")
    return tasks


def check_report(report: Any, tasks: Optional[Sequence[str]] = None) -> Report:
    """``report`` if it is complete (every task of ``tasks``, default those it names, and no other; the average;
    not partial) and consistent (docs/reliability.md), else ``BadData`` saying why."""
    if not isinstance(report, dict):
        raise BadData("a report is a JSON object {task: {accuracy, loss}, ..., average: {...}}")
    own = _check_names(report)
    _check_protocol(report.get(PROTOCOL))
    if tasks is not None:
        for task in tasks:
            if task not in report:
                raise BadData(f"the report has no {task!r} entry")
        others = [task for task in own if task not in tasks]
        if others:
            raise BadData(f"the report scores {others} beside the expected tasks {list(tasks)}")
    for key in [*own, "average", *(k for k in NON_TASK_ENTRIES if k in report and k not in ("average", PROTOCOL))]:
        if key not in report:
            raise BadData(f"the report has no {key!r} entry")
        _check_entry(key, report[key])
    for metric in ("accuracy", "loss"):
        mean = sum(report[task][metric] for task in own) / len(own)
        stated = report["average"][metric]
        if not math.isclose(stated, mean, rel_tol=AVERAGE_TOLERANCE, abs_tol=1e-12):
            raise BadData(f"the report's average.{metric} is {stated!r} but the mean of its {len(own)} tasks' is "
                          f"{mean!r}: the report contradicts itself")
    return report


def load_report(path: str | os.PathLike, tasks: Optional[Sequence[str]] = None) -> Report:
    """``check_report`` of a report file, naming it; a FusionBench report without ``average`` gets one."""
    try:
        report = read_report(path)
        if isinstance(report, dict) and "average" not in report:
            own = _check_names(report)
            for key, values in report.items():
                if key != PROTOCOL:
                    _check_entry(key, values)
            others = {k: v for k, v in report.items() if k in NON_TASK_ENTRIES and k != PROTOCOL}
            report = make_report({t: report[t] for t in own}, others, report.get(PROTOCOL))
        return check_report(report, tasks)
    except (OSError, ValueError) as error:  # json's and UnicodeDecodeError are ValueErrors
        raise BadData(f"{path} is not a complete mergelit/FusionBench report: {error}") from None


def report_tasks(report: Report) -> list[str]:
    """The report's tasks in the one task order (unknown names last, as written), without the non-task entries."""
    names = [k for k in report if k not in NON_TASK_ENTRIES]
    return [t for t in TASKS if t in names] + [t for t in names if t not in TASKS]


def inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name``, refused (naming ``what`` named it) unless it stays inside ``folder``, links resolved."""
    path = Path(folder) / name
    try:
        path.resolve().relative_to(Path(folder).resolve())
    except (ValueError, OSError):
        raise BadData(f"{what} names {name!r}, which lies outside the folder {str(folder)!r} (a path that leaves it, "
                      f"or a link out of it); mergelit reads a results folder only inside it.") from None
    return path


def check_output_folder(folder: str | os.PathLike, what: str) -> None:
    """Refuse an output folder that is a link (what is written would land elsewhere) or a file, naming it."""
    folder = Path(folder)
    if folder.is_symlink():
        raise NotWritable(f"The {what} {str(folder)!r} is a link (to {os.readlink(folder)!r}); mergelit writes only "
                          f"into a folder it owns, never through a link. Give a real folder.")
    if folder.exists() and not folder.is_dir():
        raise NotWritable(f"The {what} {str(folder)!r} is a file; give a folder.")


def _present(folder: Path, name: str) -> bool:
    path = folder / name
    return path.is_symlink() or path.exists()


def read_json(path: Path, what: str, fix: str) -> Any:
    """The JSON content of ``path``; one that cannot be read or parsed is damaged, naming ``what`` and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise BadData(f"{what} {str(path)!r} is damaged or unreadable ({type(error).__name__}: {error}); "
                      f"{fix}") from None


def _checked_spec(spec: Any, where: str) -> dict[str, Any]:
    if (isinstance(spec, dict) and isinstance(spec.get("class_path"), str)
            and isinstance(spec.get("init_args") or {}, dict)):
        return spec
    raise BadData(f"{where} is {spec!r:.80}, not a method ({{class_path: ..., init_args: {{...}}}}); the file is "
                  f"damaged.")


def read_manifest(folder: Path) -> dict[str, Any]:
    """A sweep folder's ``sweep.json``, checked: its tasks, and each point's name (inside the folder) and fields."""
    folder = Path(folder)
    path = inside(folder, MANIFEST, f"Sweep folder {str(folder)!r}")
    fix = "rerun its sweep with --overwrite to rewrite it, or remove the folder."
    manifest = read_json(path, "The sweep manifest", fix)
    where = f"The sweep manifest {str(path)!r}"
    if not isinstance(manifest, dict):
        raise BadData(f"{where} holds a {type(manifest).__name__}, not a mapping: it is damaged; {fix}")
    tasks = manifest.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise BadData(f"{where} has no list of 'tasks': it is damaged; {fix}")
    try:
        ordered_tasks(tasks)
    except ValueError as error:
        raise BadData(f"{where}: its 'tasks' are wrong ({error}); {fix}") from None
    points = manifest.get("points")
    if not isinstance(points, dict) or not points:
        raise BadData(f"{where} has no 'points' mapping: it is damaged; {fix}")
    for name, point in points.items():
        inside(folder, f"{name}.json", f"{where} (point {name!r})")
        if not isinstance(point, dict) or not isinstance(point.get("overrides"), dict):
            raise BadData(f"{where}: point {name!r} is damaged (no 'overrides' mapping); {fix}")
        if point.get("model") is not None:
            _checked_spec(point["model"], f"{where}: point {name!r}'s model")
        if not isinstance(point.get("group", ""), str) or not isinstance(point.get("swept", []), list):
            raise BadData(f"{where}: point {name!r} is damaged (its 'group' or 'swept'); {fix}")
    return manifest


def _run_label(folder: Path) -> str:
    """A run folder's label: its method and changed arguments, from its ``config.yaml`` (never imported)."""
    if not _present(folder, "config.yaml"):
        return folder.name
    path = inside(folder, "config.yaml", f"Run folder {str(folder)!r}")
    config = load_yaml(path, "Run config")
    model = config.get("model") if isinstance(config, dict) else None
    if model is None:
        return folder.name
    if isinstance(model, str):
        model = {"class_path": model}
    return method_label(_checked_spec(model, f"Run config {str(path)!r}: model"))


def individual_diagonal(manifest: dict[str, Any], reports: dict[str, Report]) -> Optional[Report]:
    """The "Fine-tuned (individual)" report from a sweep of ``Individual`` over every task (the 7x7 diagonal)."""
    tasks = manifest["tasks"]
    by_task = {}
    for name, point in manifest["points"].items():
        model = point.get("model") or {}
        if not str(model.get("class_path", "")).endswith(".Individual") or name not in reports:
            return None
        by_task[(model.get("init_args") or {}).get("task")] = reports[name]
    if set(by_task) != set(tasks):
        return None
    examples = {t: (by_task[t].get(PROTOCOL) or {}).get("per_example", {}).get(t) for t in tasks}
    protocol = {"method": "Fine-tuned (individual)", "kind": "task-aware", "data": "none",
                "bodies_at_inference": float(len(tasks))}
    if all(examples.values()):
        protocol["per_example"] = examples
    return make_report({t: by_task[t][t] for t in tasks}, protocol=protocol)


def read_selection(folder: Path, manifest: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
    """A sweep folder's ``selection.json``, checked (every group's points those of ``manifest``), or None."""
    folder = Path(folder)
    if not _present(folder, SELECTION):
        return None
    path = inside(folder, SELECTION, f"Sweep folder {str(folder)!r}")
    fix = "rerun its sweep to select again, or remove the file."
    picked = read_json(path, "The selection file", fix)
    where = f"The selection file {str(path)!r}"
    if not (isinstance(picked, dict) and isinstance(picked.get("select_on"), str)
            and isinstance(picked.get("groups"), dict) and picked["groups"]):
        raise BadData(f"{where} is damaged (expected select_on and the groups' choices); {fix}")
    for key in ("chosen_on", "data_read", "labels_used"):
        if key in picked and not isinstance(picked[key], str):
            raise BadData(f"{where} is damaged (its {key!r} is {picked[key]!r:.40}); {fix}")
    criterion = picked.get("criterion", {})
    if not isinstance(criterion, dict) or not all(is_number(v, finite=True) for v in criterion.values()):
        raise BadData(f"{where} is damaged (its 'criterion' values are not numbers); {fix}")
    for group, info in picked["groups"].items():
        names = info.get("points") if isinstance(info, dict) else None
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
                and info.get("selected") in names):
            raise BadData(f"{where}: group {group!r} is damaged (expected its 'points' and the 'selected' one among "
                          f"them); {fix}")
        stray = [n for n in names if manifest is not None and n not in manifest["points"]]
        if stray:
            raise BadData(f"{where}: group {group!r} names the point {stray[0]!r}, which the sweep manifest does not "
                          f"list; {fix}")
    return picked


def sweep_rows(folder: Path) -> list[Row]:
    """A sweep folder's leaderboard rows: the individual diagonal, or each method's selected and oracle points."""
    folder = Path(folder)
    manifest = read_manifest(folder)  # checked that every point's report lies inside the folder
    reports = {name: load_report(folder / f"{name}.json", manifest["tasks"]) for name in manifest["points"]
               if _present(folder, f"{name}.json")}
    diagonal = individual_diagonal(manifest, reports)
    if diagonal is not None:
        return [Row(["Fine-tuned (individual)"], diagonal, role="individual")]

    def label_of(name: str) -> str:
        point = manifest["points"][name]
        label = method_label(point["model"], point.get("swept", ())) if point.get("model") else name
        others = [f"{header_of(k)}={format_value(v)}" for k, v in point["overrides"].items()
                  if not k.startswith("model")]
        return f"{label} ({', '.join(others)})" if others else label

    def data_of(name: str, read: str) -> str:
        return f"{_protocol(reports[name]).get('data', 'none')} + {read}"

    picked = read_selection(folder, manifest)
    groups = picked["groups"] if picked else {}
    if not groups:
        for name, point in manifest["points"].items():
            groups.setdefault(point.get("group", ""), {"points": []})["points"].append(name)
    rows = []
    for info in groups.values():
        names = info["points"]
        if len(names) == 1 and names[0] in reports:
            rows.append(Row([label_of(names[0])], reports[names[0]]))
            continue
        if picked:
            name = info["selected"]
            if name not in reports:
                raise BadData(f"Sweep folder {folder}: the selected point {name!r} has no complete report; rerun its "
                              f"sweep.")
            on = picked.get("chosen_on", picked["select_on"])
            read = picked.get("data_read", picked.get("labels_used", "dev rows"))
            rows.append(Row([f"{label_of(name)}, selected on {on} (of {len(names)})"], reports[name],
                            role="selected", data=data_of(name, read)))
        scored = [name for name in names if name in reports]
        if scored and (not picked or len(scored) == len(names)):  # without selection: the best scored so far
            best = max(scored, key=lambda name: reports[name]["average"]["accuracy"])
            of = f"{len(names)}" if len(scored) == len(names) else f"{len(scored)} scored of {len(names)}"
            rows.append(Row([f"{label_of(best)}, best of {of} (oracle)"], reports[best], role="oracle",
                            data=data_of(best, "validation labels (oracle)")))
    if not rows:
        raise BadData(f"Sweep folder {folder} has no complete point yet; run its sweep first.")
    return rows


def _natural(path: Path) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def collect_rows(paths: Sequence[str | os.PathLike]) -> list[Row]:
    """Rows from report files (read wherever they are), run, sweep or run-holding folders (read only inside)."""
    rows: list[Row] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            rows.append(Row([path.stem], load_report(path)))
        elif _present(path, MANIFEST):
            rows.extend(sweep_rows(path))
        elif _present(path, "report.json"):
            report = inside(path, "report.json", f"Run folder {str(path)!r}")
            rows.append(Row([_run_label(path)], load_report(report)))
        elif path.is_dir():
            runs = [p for p in path.iterdir() if _present(p, MANIFEST) or _present(p, "report.json")]
            runs.sort(key=_natural)
            if not runs:
                raise BadData(f"{path} holds no report.json, sweep.json, or run folder with one of them.")
            for run in runs:
                inside(path, run.name, f"The folder of runs {str(path)!r}")
            rows.extend(collect_rows(runs))
        else:
            raise FileMissing(f"{path} does not exist; give report files, run folders or sweep folders.")
    return rows


# ---- per-example predictions -------------------------------------------------------------
def score_predictions(task: str, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy, loss and ``task``'s extra metric of prediction rows: counts give the report's exactly; the loss,
    the mean of the rows' float64 ``loss`` (else from the logits) in another order, to ~1e-8 relative."""
    if not rows:
        raise BadData(f"no prediction rows for {task!r}")
    classes = GLUE_TASKS[task].num_labels
    wrong = next((r for r in rows if not (0 <= r["label"] < classes and 0 <= r["prediction"] < classes)), None)
    if wrong is not None:
        raise BadData(f"the prediction row {wrong['idx']} of {task!r} has label {wrong['label']} and prediction "
                      f"{wrong['prediction']}; {task} has the classes 0..{classes - 1}")
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    predicted = torch.tensor([r["prediction"] for r in rows], dtype=torch.long)
    if all("loss" in r for r in rows):
        losses = torch.tensor([r["loss"] for r in rows], dtype=torch.float64)
    elif all("logits" in r for r in rows) and len({len(r["logits"]) for r in rows}) == 1:
        logits = torch.tensor([r["logits"] for r in rows], dtype=torch.float32)  # stored from float32: exact
        losses = F.cross_entropy(logits, labels, reduction="none").double()
    else:
        raise BadData(f"the prediction rows of {task!r} hold neither every row's loss nor its logits (one count per "
                      f"row)")
    values = {"accuracy": (predicted == labels).double().sum().item() / len(rows), "loss": losses.mean().item()}
    if task in EXTRA_METRICS:
        values[EXTRA_METRICS[task]] = binary_metric(EXTRA_METRICS[task], predicted, labels)
    return values


def metrics_from_predictions(folder: str | os.PathLike) -> Report:
    """Re-score a ``predictions/`` folder (``--save_predictions``) into a report with the average of its tasks."""
    predictions = read_predictions(folder)
    if not predictions:
        raise BadData(f"{folder} holds no <task>.jsonl prediction file; run `mergelit test ... --save_predictions "
                      f"true`.")
    scored = {}
    for entry, rows in predictions.items():
        path = Path(folder) / f"{entry}.jsonl"
        if entry not in TASKS and entry not in EXTRA_ENTRIES:
            raise BadData(f"The predictions file {str(path)!r} is of no report entry (a GLUE task or "
                          f"{', '.join(EXTRA_ENTRIES)}).")
        try:
            scored[entry] = score_predictions(EXTRA_ENTRIES.get(entry, (entry, ""))[0], rows)
        except BadData as error:
            raise BadData(f"The predictions file {str(path)!r} cannot be scored: {error}") from None
    extra = {e: v for e, v in scored.items() if e in NON_TASK_ENTRIES}
    return make_report({t: scored[t] for t in TASKS if t in scored}, extra)


# ---- the leaderboard ----------------------------------------------------------------------
EXTRA_COLUMNS = [("CoLA-MCC", "cola", "mcc"), ("MRPC-F1", "mrpc", "f1"), ("QQP-F1", "qqp", "f1"),
                 ("MNLI-mm", "mnli_mismatched", "accuracy")]  # (header, report entry, metric)
COST_KEYS = ("load_seconds", "prepare_seconds", "prepare_peak_gb", "prepare_cached", "prepare_original_seconds",
             "prepare_original_peak_gb", "merge_seconds", "merge_peak_gb")  # mergelit.costs.CostRecord.as_dict
CACHED = "†"  # a total cost whose prepare part was read from a cache (its original time is counted)
OTHER_ROWS = "‡"  # a normalized accuracy whose fine-tuned reference scored other rows than the run


def _protocol(report: Report) -> dict[str, Any]:
    protocol = report.get(PROTOCOL)
    return protocol if isinstance(protocol, dict) else {}


def _extra_value(report: Report, entry: str, metric: str) -> Optional[float]:
    return _number((report.get(entry) or {}).get(metric))


def _cost(report: Report, key: str) -> Optional[float]:
    return _number((_protocol(report).get("costs") or {}).get(key))


def prepare_cost(report: Report) -> tuple[Optional[float], Optional[float], bool]:
    """``(seconds, peak GB, cached)`` of the prepare phase: the original computation's when read from a cache."""
    if (_protocol(report).get("costs") or {}).get("prepare_cached"):
        return _cost(report, "prepare_original_seconds"), _cost(report, "prepare_original_peak_gb"), True
    return _cost(report, "prepare_seconds"), _cost(report, "prepare_peak_gb"), False


def total_cost(report: Report) -> Optional[float]:
    """Prepare (original seconds when cached) + merge seconds; None when the report records neither."""
    prepare, merge = prepare_cost(report)[0], _cost(report, "merge_seconds")
    if prepare is None and merge is None:
        return None
    return (prepare or 0.0) + (merge or 0.0)


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _gb(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def per_example(report: Report, tasks: Sequence[str]) -> Optional[dict[str, Any]]:
    """The report's stored per-example correctness of ``tasks`` (``protocol.per_example``), or None."""
    stored = _protocol(report).get("per_example") or {}
    return {t: stored[t] for t in tasks} if all(t in stored for t in tasks) else None


def _same_rows(a: Report, b: Report, tasks: Sequence[str]) -> Optional[bool]:
    """Whether two reports scored the same rows of every task (their stored ids' hashes); None: unknown."""
    ours, theirs = per_example(a, tasks), per_example(b, tasks)
    if not (ours and theirs):
        return None
    return all(ours[t]["ids_sha256"] == theirs[t]["ids_sha256"] for t in tasks)


def resampled(report: Report, tasks: Sequence[str]):
    """The report's bootstrap of ``tasks`` and their average (``mergelit.uncertainty.bootstrap``), or None."""
    stored = per_example(report, tasks)
    return None if stored is None else uncertainty.bootstrap({t: uncertainty.decode_correct(stored[t]) for t in tasks})


def accuracy_interval(report: Report, entry: str, tasks: Sequence[str]) -> Optional[list[float]]:
    """The 95 % interval of ``entry``'s accuracy: the report's own, else a bootstrap of its examples, else None."""
    stored = (_protocol(report).get("uncertainty") or {}).get("accuracy") or {}
    if entry in stored:
        return list(stored[entry])
    draws = resampled(report, tasks)
    return None if draws is None or entry not in draws else uncertainty.interval(draws[entry])


def _called(name: str, *names: str) -> bool:
    """Whether ``name`` is one of ``names`` up to case and punctuation (``task_arithmetic``, ``Task Arithmetic``)."""
    def plain(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    return plain(name) in {plain(n) for n in names if n}


def matches(row: Row, name: str) -> bool:
    """Whether ``row`` is a run of the method ``name`` (its class, module or display name) or labelled so."""
    module, _, cls = str(_protocol(row.report).get("class_path", "")).rpartition(".")
    return _called(name, cls, module.rpartition(".")[2], str(_protocol(row.report).get("method", "")), row.labels[0])


def reference_title(name: str) -> str:
    """The display name of the method ``name`` stands for (``task_arithmetic``: ``Task Arithmetic``), else ``name``."""
    from mergelit.methods import method_classes
    return next((cls.display_name for cls in method_classes()
                 if _called(name, cls.__name__, cls.__module__.rpartition(".")[2], cls.display_name)), name)


def reference_rows(rows: Sequence[Row], against: str) -> list[Optional[Row]]:
    """Each row's row of method ``against``: chosen the same way, else its selected, single, then oracle row."""
    candidates = [row for row in rows if row.report is not None and matches(row, against)]
    order = ["selected", "", "oracle"]
    ranked = sorted(candidates, key=lambda c: order.index(c.role) if c.role in order else 3)
    return [next((c for c in candidates if c.role == row.role), ranked[0] if ranked else None) for row in rows]


@dataclass
class Leaderboard:
    """Everything the leaderboard shows beside accuracy (docs/sweeps.md); a column no row can fill is left out."""

    rows: Sequence[Row]
    tasks: Sequence[str]
    extra_metrics: bool = True
    against: Optional[str] = None

    def __post_init__(self) -> None:
        rows, tasks = self.rows, self.tasks
        shown = EXTRA_COLUMNS if self.extra_metrics else []
        self.extra = [c for c in shown if any(_extra_value(r.report, c[1], c[2]) is not None for r in rows)]
        self.intervals = [accuracy_interval(r.report, "average", tasks) for r in rows]
        # Normalized accuracy (the TSV-M and Iso papers'): the mean over tasks of accuracy / the fine-tuned
        # model's own; marked when that was measured on other rows (a run without the held-out dev rows).
        individual = next((r.report for r in rows if r.role == "individual"), None)
        self.normalized = [None if individual is None else
                           sum(_accuracy(r.report, t) / _accuracy(individual, t) for t in tasks) / len(tasks)
                           for r in rows]
        self.other_rows = [individual is not None and _same_rows(r.report, individual, tasks) is False for r in rows]
        name = self.against or "task_arithmetic"
        self.references = reference_rows(rows, name)
        if self.against and not any(self.references):
            raise ValueError(f"--against {self.against}: no row is a run of it; the rows are "
                             f"{', '.join(repr(r.labels[0]) for r in rows)}.")
        self.reference_name = reference_title(name)
        self.gains = [None if ref is None else _accuracy(r.report, "average") - _accuracy(ref.report, "average")
                      for r, ref in zip(rows, self.references)]
        draws: dict[int, Any] = {}  # each row's bootstrap, drawn once

        def bootstrap_of(row: Row):
            if id(row) not in draws:
                draws[id(row)] = resampled(row.report, tasks)
            return draws[id(row)]

        self.wins: list[Optional[float]] = [
            uncertainty.win_probability(bootstrap_of(row), bootstrap_of(ref))
            if ref and _same_rows(row.report, ref.report, tasks) else None for row, ref in zip(rows, self.references)
        ]

    def columns(self) -> list[tuple[str, list[str]]]:
        """The markdown columns after Avg.: (header, one cell per row)."""
        rows = self.rows
        short = "TA" if self.reference_name == "Task Arithmetic" else self.reference_name
        is_ref = [ref is row for row, ref in zip(rows, self.references)]
        optional = [
            ("Avg. 95% CI", [None if ci is None else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}" for ci in self.intervals]),
            ("Norm.", [None if v is None else f"{100 * v:.1f}" + (OTHER_ROWS if other else "")
                       for v, other in zip(self.normalized, self.other_rows)]),
            (f"Δ {short}", [None if v is None else "ref" if ref else f"{100 * v:+.1f}"
                            for v, ref in zip(self.gains, is_ref)]),
            (f"P(win) vs {short}", [None if v is None else "ref" if ref else f"{v:.2f}"
                                    for v, ref in zip(self.wins, is_ref)]),
        ]
        columns = [(h, ["–" if c is None else c for c in cells]) for h, cells in optional
                   if any(c is not None for c in cells)]
        for header, entry, metric in self.extra:
            values = [_extra_value(r.report, entry, metric) for r in rows]
            best = max((v for v in values if v is not None), default=None)
            texts = ["–" if v is None else f"{100 * v:.1f}" for v in values]
            columns.append((header, [f"**{t}**" if v is not None and v == best else t for v, t in zip(values, texts)]))
        prepared = [prepare_cost(r.report) for r in rows]
        totals = [total_cost(r.report) for r in rows]
        protocols = [_protocol(r.report) for r in rows]
        bodies = [p.get("bodies_at_inference") for p in protocols]
        return columns + [
            ("cost s", [_seconds(t) + (CACHED if cached and t is not None else "")
                        for t, (_, _, cached) in zip(totals, prepared)]),
            ("load s", [_seconds(_cost(r.report, "load_seconds")) for r in rows]),
            ("prep GB", [_gb(peak) for _, peak, _ in prepared]),
            ("merge GB", [_gb(_cost(r.report, "merge_peak_gb")) for r in rows]),
            ("bodies", ["–" if not isinstance(b, (int, float)) else f"{b:g}" if float(b).is_integer() else f"{b:.2f}"
                        for b in bodies]),
            ("data", [r.data or str(p.get("data", "–")) for r, p in zip(rows, protocols)]),
            ("kind", [str(p.get("kind", "–")) for p in protocols]),
        ]

    def markdown(self) -> str:
        """The methods table in percent, best values bold, with the ``columns`` and a note on each mark used."""
        table = markdown_table(self.rows, self.tasks, ["Method"], percent=True, mark_best=True).splitlines()
        columns = self.columns()
        lines = [table[0] + " " + " | ".join(h for h, _ in columns) + " |", table[1] + "---|" * len(columns)]
        lines += [line + " " + " | ".join(cells[i] for _, cells in columns) + " |" for i, line in enumerate(table[2:])]
        notes = []
        if any(prepare_cost(r.report)[2] for r in self.rows):
            notes.append(f"{CACHED} prepare read from a cache: the cost counts its original computation.")
        if any(self.other_rows):
            notes.append(f"{OTHER_ROWS} normalized by the fine-tuned models' accuracy on other rows of the same splits "
                         f"(e.g. with or without the held-out dev rows).")
        if any(self.intervals):
            notes.append("95% CI: percentile bootstrap over each task's examples (1000 resamples, seed 0).")
        if any(v is not None for v in self.wins):
            notes.append("P(win): share of paired resamples (the same examples) where the row's average beats the "
                         "reference's.")
        return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")

    def csv(self) -> str:
        """The same rows as CSV: fractions, intervals (per task and average) and costs in full, empty where missing."""
        entries = [*self.tasks, "average"]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([
            "Method", *entries, *(f"{e}_ci_{s}" for e in entries for s in ("low", "high")), "normalized_accuracy",
            "gain", "win_probability", *(h for h, _, _ in self.extra), "total_cost_seconds", *COST_KEYS,
            "bodies_at_inference", "data", "kind", "role",
        ])
        for i, row in enumerate(self.rows):
            intervals = [accuracy_interval(row.report, e, list(self.tasks)) for e in entries]
            protocol = _protocol(row.report)
            costs = protocol.get("costs") or {}
            writer.writerow([
                *row.labels,
                *(repr(_accuracy(row.report, e)) for e in entries),
                *(_csv_value(None if ci is None else float(ci[k])) for ci in intervals for k in (0, 1)),
                *map(_csv_value, (self.normalized[i], self.gains[i], self.wins[i])),
                *(_csv_value(_extra_value(row.report, e, m)) for _, e, m in self.extra),
                _csv_value(total_cost(row.report)), *(_csv_value(costs.get(k)) for k in COST_KEYS),
                *map(_csv_value, (protocol.get("bodies_at_inference"), row.data or protocol.get("data"))),
                _csv_value(protocol.get("kind")),
                row.role,
            ])
        return out.getvalue()


def write_leaderboard(folder: str | os.PathLike, rows: Sequence[Row], tasks: Sequence[str], extra_metrics: bool = True,
                      title: str = "Merging methods", against: Optional[str] = None) -> tuple[Path, Path, Path]:
    """Write the leaderboard (``folder/table.md``, ``table.csv``) and ``plot.png`` (``plot_costs``); return them."""
    board = Leaderboard(rows, tasks, extra_metrics, against)
    md = atomic_write_text(Path(folder) / "table.md", board.markdown())
    csv_path = atomic_write_text(Path(folder) / "table.csv", board.csv())
    return md, csv_path, plot_costs(Path(folder) / "plot.png", rows, title=title)


def check_same_tasks(rows: Sequence[Row]) -> list[str]:
    """The rows' common tasks; ``ValueError`` if two rows score different tasks."""
    tasks = report_tasks(rows[0].report)
    for row in rows[1:]:
        if report_tasks(row.report) != tasks:
            raise ValueError(f"{row.labels[0]!r} scores {report_tasks(row.report)} but {rows[0].labels[0]!r} scores "
                             f"{tasks}; a table compares runs on the same tasks.")
    return tasks


def compare(paths: Sequence[str | os.PathLike], output_dir: Optional[str | os.PathLike] = None,
            extra_metrics: bool = True, against: Optional[str] = None) -> str:
    """The leaderboard of ``paths`` as markdown, against ``against`` (default: Task Arithmetic when a row is one),
    extra metrics unless ``extra_metrics`` is off; written to ``output_dir`` if given (``write_leaderboard``)."""
    if output_dir is not None:
        check_output_folder(output_dir, "compare output folder (--output_dir)")
    rows = collect_rows(paths)
    if not rows:
        raise ValueError("Nothing to compare: give report files, run folders or sweep folders.")
    tasks = check_same_tasks(rows)
    if output_dir is not None:
        write_leaderboard(output_dir, rows, tasks, extra_metrics, against=against)
    return Leaderboard(rows, tasks, extra_metrics, against).markdown()

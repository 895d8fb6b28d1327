"""Result tables and plots from report files: sweep tables, the 7x7 heatmap, the methods table.

    mergelit compare lightning_logs/version_3 lightning_logs/version_4 sweeps/ta sweeps/ties
    mergelit compare -c configs/gpt2_glue.yaml -c configs/sweeps/methods.yaml   (runs the methods)

Every table has one row per run (or sweep point), the pool's tasks as columns in the one task
order (cola ... sst2) and the unweighted average last, as in the published tables
(``shared/reference/seed_results.md``): the λ sweeps in fractions with six digits, the 7x7
cross-task table and the methods table in percent with one decimal. The methods table
("Experimental Results") marks the best value of each column in bold. Each markdown table
has a CSV twin with full-precision fractions.

``compare`` reads, for each path: a report JSON; a run's log folder (``report.json``, labelled
from its ``config.yaml``); a sweep folder (``sweep.json``: its best point by average accuracy,
or, for a sweep of ``Individual`` over every task, the diagonal "Fine-tuned (individual)"
row); or a folder of such runs (``lightning_logs/``: each run in it).
"""

from __future__ import annotations

import csv
import importlib
import inspect
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from mergelit.glue import TASKS
from mergelit.report import Report, atomic_write_text, make_report, read_report

TASK_NAMES = {"cola": "CoLA", "mnli": "MNLI", "mrpc": "MRPC", "qnli": "QNLI", "qqp": "QQP", "rte": "RTE", "sst2": "SST-2"}
"""The published tables' column names."""

# Column headers and labels for config keys (the last part of a dotted key), as the papers write them.
SYMBOLS = {"scaling_factor": "λ", "task": "Model", "model": "Method"}

MANIFEST = "sweep.json"
"""The file that makes a folder a sweep folder (written by ``mergelit.sweep``)."""


@dataclass
class Row:
    """One table row: the values of the row's label columns, and its report."""

    labels: list[str]
    report: Report


# ---- labels ------------------------------------------------------------------------------
def short_key(key: str) -> str:
    """``model.init_args.scaling_factor`` -> ``scaling_factor``."""
    return key.rsplit(".", 1)[-1]


def header_of(key: str) -> str:
    return SYMBOLS.get(short_key(key), short_key(key))


def format_value(value: Any) -> str:
    """A config value as a table label (a method spec becomes the method's name)."""
    if isinstance(value, dict) and "class_path" in value:
        return method_label(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def method_name(class_path: str) -> str:
    """The name a method's docstring opens with ("Task Arithmetic: ..."), else its class name."""
    class_name = class_path.rsplit(".", 1)[-1]
    try:
        module = importlib.import_module(class_path.rsplit(".", 1)[0])
        doc = inspect.getdoc(getattr(module, class_name)) or ""
    except (ImportError, AttributeError, ValueError):
        return class_name
    head = doc.split("\n", 1)[0]
    return head.split(":", 1)[0].strip() if ":" in head else class_name


def _defaults(class_path: str) -> dict[str, Any]:
    try:
        module = importlib.import_module(class_path.rsplit(".", 1)[0])
        signature = inspect.signature(getattr(module, class_path.rsplit(".", 1)[-1]).__init__)
    except (ImportError, AttributeError, ValueError, TypeError):
        return {}
    return {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def changed_args(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``init_args`` of a method spec that differ from its class's defaults (the pool left out,
    and ``cache_dir``: where statistics are cached is no part of what a method computes)."""
    defaults = _defaults(spec["class_path"])
    return {
        k: v
        for k, v in (spec.get("init_args") or {}).items()
        if k not in ("pool", "cache_dir") and not (k in defaults and _same(defaults[k], v))
    }


def method_label(spec: dict[str, Any]) -> str:
    """``{"class_path": ...TaskArithmetic, "init_args": {"scaling_factor": 0.5}}`` -> ``Task Arithmetic (λ=0.5)``.

    Only the arguments that differ from the class's defaults are shown, so a default run reads
    as the bare method name.
    """
    args = [f"{SYMBOLS['scaling_factor'] if k == 'scaling_factor' else k}={format_value(v)}" for k, v in changed_args(spec).items()]
    name = method_name(spec["class_path"])
    return f"{name} ({', '.join(args)})" if args else name


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _display(label: str, percent: bool) -> str:
    # The published percent tables write task names as CoLA, SST-2 (row labels of the 7x7 table too).
    return TASK_NAMES.get(label, label) if percent else label


# ---- tables ------------------------------------------------------------------------------
def _accuracy(report: Report, key: str) -> float:
    return float(report[key]["accuracy"])


def _best(rows: Sequence[Row], columns: Sequence[str]) -> dict[str, float]:
    return {c: max(_accuracy(r.report, c) for r in rows) for c in columns}


def markdown_table(
    rows: Sequence[Row],
    tasks: Sequence[str],
    headers: Sequence[str],
    percent: bool = False,
    mark_best: bool = False,
) -> str:
    """The published layout: label column(s), one column per task, ``Avg.``.

    ``percent``: accuracy in percent with one decimal and task names as published (CoLA ...
    SST-2); otherwise fractions rounded to six digits and task ids (cola ... sst2).
    ``mark_best``: bold the best value of each column (ties all bold).
    """
    columns = [*tasks, "average"]
    names = [_display(t, percent) for t in tasks] if percent else list(tasks)
    best = _best(rows, columns) if mark_best and rows else {}
    lines = [
        "| " + " | ".join([*headers, *names, "Avg."]) + " |",
        "|" + "---|" * (len(headers) + len(columns)),
    ]
    for row in rows:
        cells = [_display(label, percent) for label in row.labels]
        for column in columns:
            value = _accuracy(row.report, column)
            text = f"{100 * value:.1f}" if percent else repr(round(value, 6))
            cells.append(f"**{text}**" if column in best and value == best[column] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Row], tasks: Sequence[str], headers: Sequence[str]) -> str:
    """The same rows as CSV: label column(s), then accuracies as full-precision fractions."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*headers, *tasks, "average"])
    for row in rows:
        writer.writerow([*row.labels, *(repr(_accuracy(row.report, c)) for c in [*tasks, "average"])])
    return out.getvalue()


def write_tables(
    folder: str | os.PathLike,
    rows: Sequence[Row],
    tasks: Sequence[str],
    headers: Sequence[str],
    percent: bool = False,
    mark_best: bool = False,
) -> tuple[Path, Path]:
    """Write ``folder/table.md`` and ``folder/table.csv`` (atomically); return their paths."""
    folder = Path(folder)
    md = atomic_write_text(folder / "table.md", markdown_table(rows, tasks, headers, percent, mark_best))
    csv_path = atomic_write_text(folder / "table.csv", csv_table(rows, tasks, headers))
    return md, csv_path


# ---- plots -------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers, CI and tests
    import matplotlib.pyplot as plt

    return plt


def is_numeric(values: Sequence[Any]) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep(
    path: str | os.PathLike, xs: Sequence[float], rows: Sequence[Row], tasks: Sequence[str], xlabel: str, title: str = ""
) -> Path:
    """Accuracy of each task against the swept value, the average in bold, its best point marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task in tasks:
        ax.plot(xs, [100 * _accuracy(r.report, task) for r in rows], marker="o", markersize=3, linewidth=1, alpha=0.8, label=task)
    average = [100 * _accuracy(r.report, "average") for r in rows]
    ax.plot(xs, average, color="black", linewidth=3, marker="o", label="average")
    best = max(range(len(rows)), key=lambda i: average[i])
    ax.plot([xs[best]], [average[best]], marker="*", markersize=18, color="gold", markeredgecolor="black", zorder=5)
    ax.annotate(
        f"best {xlabel}={format_value(xs[best])}: {average[best]:.1f}%",
        (xs[best], average[best]),
        textcoords="offset points",
        xytext=(0, 12),
        ha="center",
        fontweight="bold",
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="best")
    return _save(plt, fig, path)


def _save(plt, fig, path: str | os.PathLike) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` (folders made) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(
    path: str | os.PathLike, rows: Sequence[Row], tasks: Sequence[str], title: str = "", ylabel: str = ""
) -> Path:
    """Rows x (tasks, Avg.) accuracy in percent as a heatmap with the values written in (the 7x7 table)."""
    plt = _pyplot()
    columns = [*tasks, "average"]
    values = [[100 * _accuracy(r.report, c) for c in columns] for r in rows]
    fig, ax = plt.subplots(figsize=(1.0 * len(columns) + 2.5, 0.55 * len(rows) + 1.8))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), [TASK_NAMES.get(c, c) for c in tasks] + ["Avg."])
    ax.set_yticks(range(len(rows)), [", ".join(_display(label, True) for label in r.labels) for r in rows])
    low, high = image.get_clim()
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            dark = value < (low + high) / 2
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xlabel("task scored (with its own head)")
    if ylabel:
        ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    if title:
        ax.set_title(title)
    return _save(plt, fig, path)


# ---- reading runs ------------------------------------------------------------------------
def check_report(report: Any, tasks: Optional[Sequence[str]] = None) -> Report:
    """Raise ``ValueError`` unless ``report`` has every task (default: those it names) and the
    average, each with a finite accuracy and loss: a complete report."""
    if not isinstance(report, dict):
        raise ValueError("a report is a JSON object {task: {accuracy, loss}, ..., average: {...}}")
    tasks = list(tasks) if tasks is not None else [k for k in report if k != "average"]
    if not tasks:
        raise ValueError("the report names no task")
    for key in [*tasks, "average"]:
        values = report.get(key)
        if not isinstance(values, dict):
            raise ValueError(f"the report has no {key!r} entry")
        for metric in ("accuracy", "loss"):
            value = values.get(metric)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"the report's {key}.{metric} is {value!r}, not a finite number")
    return report


def load_report(path: str | os.PathLike, tasks: Optional[Sequence[str]] = None) -> Report:
    """Read and check a report file; the error names the file."""
    try:
        return check_report(read_report(path), tasks)
    except (OSError, json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not a complete mergelit/FusionBench report: {error}") from None


def report_tasks(report: Report) -> list[str]:
    """The report's tasks in the one task order (unknown names last, as written)."""
    names = [k for k in report if k != "average"]
    return [t for t in TASKS if t in names] + [t for t in names if t not in TASKS]


def _run_label(folder: Path) -> str:
    config = folder / "config.yaml"
    if config.is_file():
        import yaml

        model = (yaml.safe_load(config.read_text()) or {}).get("model")
        if isinstance(model, dict) and "class_path" in model:
            return method_label(model)
        if isinstance(model, str):
            return method_label({"class_path": model})
    return folder.name


def individual_diagonal(manifest: dict[str, Any], reports: dict[str, Report]) -> Optional[Report]:
    """The "Fine-tuned (individual)" row: each task scored by its own fine-tuned body, taken from
    a sweep of ``Individual`` over every task of the pool (the 7x7 table's diagonal)."""
    tasks = manifest["tasks"]
    by_task = {}
    for name, point in manifest["points"].items():
        model = point.get("model") or {}
        if not str(model.get("class_path", "")).endswith(".Individual") or name not in reports:
            return None
        by_task[(model.get("init_args") or {}).get("task")] = reports[name]
    if set(by_task) != set(tasks):
        return None
    return make_report({t: by_task[t][t] for t in tasks})


def sweep_rows(folder: Path) -> list[Row]:
    """A sweep folder's row for the methods table: the individual diagonal, or the best point."""
    manifest = json.loads((folder / MANIFEST).read_text())
    tasks = manifest["tasks"]
    reports = {}
    for name in manifest["points"]:
        path = folder / f"{name}.json"
        if path.is_file():
            reports[name] = load_report(path, tasks)
    if not reports:
        raise ValueError(f"Sweep folder {folder} has no complete point yet; run its sweep first.")
    diagonal = individual_diagonal(manifest, reports)
    if diagonal is not None:
        return [Row(["Fine-tuned (individual)"], diagonal)]
    best = max(reports, key=lambda name: reports[name]["average"]["accuracy"])
    point = manifest["points"][best]
    label = method_label(point["model"]) if point.get("model") else best
    others = [f"{header_of(k)}={format_value(v)}" for k, v in point["overrides"].items() if not k.startswith("model")]
    if others:
        label = f"{label} ({', '.join(others)})"
    return [Row([f"{label}, best of {len(manifest['points'])}"], reports[best])]


def collect_rows(paths: Sequence[str | os.PathLike]) -> list[Row]:
    """Rows for the methods table from report files, run folders, sweep folders, or folders of runs."""
    rows: list[Row] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            rows.append(Row([path.stem], load_report(path)))
        elif (path / MANIFEST).is_file():
            rows.extend(sweep_rows(path))
        elif (path / "report.json").is_file():
            rows.append(Row([_run_label(path)], load_report(path / "report.json")))
        elif path.is_dir():
            runs = sorted(
                (p for p in path.iterdir() if (p / MANIFEST).is_file() or (p / "report.json").is_file()),
                key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)],
            )
            if not runs:
                raise ValueError(f"{path} holds no report.json, sweep.json, or run folder with one of them.")
            rows.extend(collect_rows(runs))
        else:
            raise FileNotFoundError(f"{path} does not exist; give report files, run folders or sweep folders.")
    return rows


def compare(paths: Sequence[str | os.PathLike], output_dir: Optional[str | os.PathLike] = None) -> str:
    """The methods table ("Experimental Results") of ``paths``; written to ``output_dir`` if given
    (``table.md``, ``table.csv``, ``plot.png`` as a heatmap). Returns the markdown."""
    rows = collect_rows(paths)
    if not rows:
        raise ValueError("Nothing to compare: give report files, run folders or sweep folders.")
    tasks = report_tasks(rows[0].report)
    for row in rows[1:]:
        if report_tasks(row.report) != tasks:
            raise ValueError(
                f"{row.labels[0]!r} scores {report_tasks(row.report)} but {rows[0].labels[0]!r} scores {tasks}; "
                f"a table compares runs on the same tasks."
            )
    if output_dir is not None:
        write_tables(output_dir, rows, tasks, ["Method"], percent=True, mark_best=True)
        plot_heatmap(Path(output_dir) / "plot.png", rows, tasks, title="Merging methods", ylabel="Method")
    return markdown_table(rows, tasks, ["Method"], percent=True, mark_best=True)

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
row); or a folder of such runs (``lightning_logs/``: each run in it). A sweep run with
``--sweep.select_on dev|agreement`` gives each method's *selected* point, labelled "selected on
dev (of N)"; one without selection gives its best point, labelled "best of N (oracle)": that
point was chosen by reading the very validation labels it is reported on.
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

from mergelit.tasks import TASKS, task_title
from mergelit.report import (
    EXTRA_METRICS,
    NON_TASK_ENTRIES,
    PROTOCOL,
    Report,
    atomic_write_text,
    make_report,
    read_predictions,
    read_report,
)

# Column headers for the config keys that are not a method's own arguments (those take the
# method class's ``symbols``, as the papers write them).
KEY_HEADERS = {"task": "Model", "model": "Method"}

MANIFEST = "sweep.json"
"""The file that makes a folder a sweep folder (written by ``mergelit.sweep``)."""

CRITERION_SUFFIX = ".criterion.json"
"""A sweep point's selection criterion value sits beside its report: ``<point>.criterion.json``."""


@dataclass
class Row:
    """One table row: the values of the row's label columns, and its report."""

    labels: list[str]
    report: Report


# ---- labels ------------------------------------------------------------------------------
def short_key(key: str) -> str:
    """``model.init_args.scaling_factor`` -> ``scaling_factor``."""
    return key.rsplit(".", 1)[-1]


def method_class(class_path: str) -> Optional[type]:
    """The class a ``class_path`` names, or None if it cannot be imported."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
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
    if isinstance(value, float):
        return repr(value)
    return str(value)


def method_name(class_path: str) -> str:
    """The method class's ``display_name`` ("Task Arithmetic"), else its class name."""
    cls = method_class(class_path)
    return getattr(cls, "display_name", None) or class_path.rsplit(".", 1)[-1]


def _defaults(class_path: str) -> dict[str, Any]:
    try:
        signature = inspect.signature(method_class(class_path).__init__)
    except (AttributeError, ValueError, TypeError):
        return {}
    return {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def changed_args(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``init_args`` of a method spec that differ from its class's defaults (the pool left out,
    and ``cache_dir`` / ``coefficients_path``: where results are cached is no part of what a method computes)."""
    defaults = _defaults(spec["class_path"])
    return {
        k: v
        for k, v in (spec.get("init_args") or {}).items()
        if k not in ("pool", "cache_dir", "coefficients_path") and not (k in defaults and _same(defaults[k], v))
    }


def method_label(spec: dict[str, Any]) -> str:
    """``{"class_path": ...TaskArithmetic, "init_args": {"scaling_factor": 0.5}}`` -> ``Task Arithmetic (λ=0.5)``.

    Only the arguments that differ from the class's defaults are shown, so a default run reads
    as the bare method name.
    """
    args = [f"{symbol(k, spec['class_path'])}={format_value(v)}" for k, v in changed_args(spec).items()]
    name = method_name(spec["class_path"])
    return f"{name} ({', '.join(args)})" if args else name


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _display(label: str, percent: bool) -> str:
    # The published percent tables write task names as CoLA, SST-2 (row labels of the 7x7 table too).
    return task_title(label) if percent else label


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
    ax.set_xticks(range(len(columns)), [task_title(c) for c in tasks] + ["Avg."])
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
    tasks = list(tasks) if tasks is not None else [k for k in report if k not in NON_TASK_ENTRIES]
    if not tasks:
        raise ValueError("the report names no task")
    protocol = report.get("protocol")
    if isinstance(protocol, dict) and protocol.get("partial"):
        raise ValueError("the report is from a partial evaluation (limit_test_batches / fast_dev_run), not a complete one")
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
    """Read and check a report file; the error names the file. A FusionBench report without an
    ``average`` entry gets one (the unweighted mean of its tasks)."""
    try:
        report = read_report(path)
        if isinstance(report, dict) and "average" not in report:
            report = with_average(report)
        return check_report(report, tasks)
    except (OSError, json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not a complete mergelit/FusionBench report: {error}") from None


def with_average(report: dict[str, Any]) -> Report:
    """``report`` with the ``average`` entry made from its tasks (FusionBench may not write one)."""
    tasks = [k for k in report if k not in NON_TASK_ENTRIES]
    others = {k: v for k, v in report.items() if k in NON_TASK_ENTRIES and k != PROTOCOL}
    check_report({**{t: report[t] for t in tasks}, "average": {"accuracy": 0.0, "loss": 0.0}})
    return make_report({t: report[t] for t in tasks}, others, report.get(PROTOCOL))


def report_tasks(report: Report) -> list[str]:
    """The report's tasks in the one task order (unknown names last, as written); the non-task
    entries (``average``, ``mnli_mismatched``, ``protocol``) left out."""
    names = [k for k in report if k not in NON_TASK_ENTRIES]
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
    def label_of(name: str) -> str:
        point = manifest["points"][name]
        label = method_label(point["model"]) if point.get("model") else name
        others = [f"{header_of(k)}={format_value(v)}" for k, v in point["overrides"].items() if not k.startswith("model")]
        return f"{label} ({', '.join(others)})" if others else label

    selected = manifest.get("selected_points") if manifest.get("select_on", "none") != "none" else None
    if selected:  # chosen on the criterion (mergelit.selection), never on the validation labels
        missing = [name for name in selected if name not in reports]
        if missing:
            raise ValueError(f"Sweep folder {folder}: the selected point(s) {missing} have no complete report.")
        return [Row([f"{label_of(name)}, selected on {manifest['select_on']} (of {len(manifest['points'])})"], reports[name])
                for name in selected]
    best = max(reports, key=lambda name: reports[name]["average"]["accuracy"])
    return [Row([f"{label_of(best)}, best of {len(manifest['points'])} (oracle)"], reports[best])]


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


# ---- per-example predictions -------------------------------------------------------------
def score_predictions(task: str, rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy, loss and ``task``'s extra metric (``report.EXTRA_METRICS``) of prediction rows
    (``idx``, ``label``, ``prediction``, ``logits``): the report's numbers, from the file alone.

    Accuracy, MCC and F1 come from counts, so they equal the report's exactly; the loss is the mean
    of the rows' ``loss`` (the float64 cross-entropy the report averaged; recomputed from the logits
    where a row has none), summed in another order: equal to float32 accuracy (~1e-8 relative).
    """
    import torch
    import torch.nn.functional as F

    from mergelit.metrics import binary_metric

    if not rows:
        raise ValueError(f"no prediction rows for {task!r}")
    labels = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    predicted = torch.tensor([r["prediction"] for r in rows], dtype=torch.long)
    logits = torch.tensor([r["logits"] for r in rows], dtype=torch.float32)  # stored from float32: exact
    values = {
        "accuracy": (predicted == labels).double().sum().item() / len(rows),
        "loss": (
            torch.tensor([r["loss"] for r in rows], dtype=torch.float64)
            if all("loss" in r for r in rows)
            else F.cross_entropy(logits, labels, reduction="none").double()
        ).mean().item(),
    }
    metric = EXTRA_METRICS.get(task)
    if metric is not None:
        values[metric] = binary_metric(metric, predicted, labels)
    return values


def metrics_from_predictions(folder: str | os.PathLike) -> Report:
    """Re-score a ``predictions/`` folder (``<task>.jsonl`` per entry, written by ``--save_predictions``)
    into a report: every task's metrics, the average of the 7 tasks, and the extra entries."""
    predictions = read_predictions(folder)
    if not predictions:
        raise ValueError(f"{folder} holds no <task>.jsonl prediction file; run `mergelit test ... --save_predictions true`.")
    from mergelit.report import EXTRA_ENTRIES

    scored = {entry: score_predictions(EXTRA_ENTRIES.get(entry, (entry, ""))[0], rows) for entry, rows in predictions.items()}
    tasks = [t for t in TASKS if t in scored] + [t for t in scored if t not in TASKS and t not in NON_TASK_ENTRIES]
    extra = {e: v for e, v in scored.items() if e in NON_TASK_ENTRIES}
    return make_report({t: scored[t] for t in tasks}, extra)


# ---- the leaderboard ---------------------------------------------------------------------
EXTRA_COLUMNS: list[tuple[str, str, str]] = [
    ("CoLA-MCC", "cola", "mcc"),
    ("MRPC-F1", "mrpc", "f1"),
    ("QQP-F1", "qqp", "f1"),
    ("MNLI-mm", "mnli_mismatched", "accuracy"),
]
"""The leaderboard's extra-metric columns: (header, report entry, metric)."""

COST_COLUMNS: list[tuple[str, str]] = [
    ("merge s", "merge_seconds"),
    ("peak GB", "merge_peak_gb"),
    ("prep s", "prepare_seconds"),
]
"""The leaderboard's cost columns: (header, key of the report's ``protocol.costs``)."""

PROTOCOL_COLUMNS: list[tuple[str, str]] = [("bodies", "bodies_at_inference"), ("data", "data"), ("kind", "kind")]


def _extra_value(report: Report, entry: str, metric: str) -> Optional[float]:
    value = (report.get(entry) or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _protocol(report: Report) -> dict[str, Any]:
    protocol = report.get(PROTOCOL)
    return protocol if isinstance(protocol, dict) else {}


def _cost(report: Report, key: str) -> Optional[float]:
    value = (_protocol(report).get("costs") or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def leaderboard_columns(rows: Sequence[Row], extra_metrics: bool = True) -> list[tuple[str, str, str]]:
    """The extra-metric columns at least one row has (MNLI-mm only where the data had it)."""
    if not extra_metrics:
        return []
    return [c for c in EXTRA_COLUMNS if any(_extra_value(r.report, c[1], c[2]) is not None for r in rows)]


def leaderboard_cells(row: Row, extra: Sequence[tuple[str, str, str]]) -> tuple[list[Optional[float]], list[str]]:
    """A row's extra metrics (fractions, None where missing) and its cost/protocol cells as text."""
    metrics = [_extra_value(row.report, entry, metric) for _, entry, metric in extra]
    protocol = _protocol(row.report)
    bodies = protocol.get("bodies_at_inference")
    peak = _cost(row.report, "merge_peak_gb")
    cells = [
        _seconds(_cost(row.report, "merge_seconds")),
        "–" if peak is None else f"{peak:.2f}",
        _seconds(_cost(row.report, "prepare_seconds")),
        "–" if not isinstance(bodies, (int, float)) else f"{bodies:g}" if float(bodies).is_integer() else f"{bodies:.2f}",
        str(protocol.get("data", "–")),
        str(protocol.get("kind", "–")),
    ]
    return metrics, cells


def leaderboard_markdown(rows: Sequence[Row], tasks: Sequence[str], extra_metrics: bool = True) -> str:
    """The methods table with costs: Method, accuracy per task (%), Avg., the extra metrics (%: CoLA
    MCC, MRPC/QQP F1, MNLI mismatched accuracy), merge seconds, peak memory (GB), prepare seconds,
    bodies kept at inference, data used and kind. Best accuracy and extra metric per column in bold."""
    extra = leaderboard_columns(rows, extra_metrics)
    table = markdown_table(rows, tasks, ["Method"], percent=True, mark_best=True).splitlines()
    headers = [h for h, _, _ in extra] + [h for h, _ in COST_COLUMNS] + [h for h, _ in PROTOCOL_COLUMNS]
    lines = [table[0] + " " + " | ".join(headers) + " |", table[1] + "---|" * len(headers)]
    values = [leaderboard_cells(row, extra) for row in rows]
    best = [max((v[0][j] for v in values if v[0][j] is not None), default=None) for j in range(len(extra))]
    for line, (metrics, cells) in zip(table[2:], values):
        texts = []
        for j, value in enumerate(metrics):
            text = "–" if value is None else f"{100 * value:.1f}"
            texts.append(f"**{text}**" if value is not None and value == best[j] else text)
        lines.append(line + " " + " | ".join([*texts, *cells]) + " |")
    return "\n".join(lines) + "\n"


def leaderboard_csv(rows: Sequence[Row], tasks: Sequence[str], extra_metrics: bool = True) -> str:
    """The leaderboard as CSV: fractions and seconds at full precision, empty where missing."""
    extra = leaderboard_columns(rows, extra_metrics)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Method", *tasks, "average", *(h for h, _, _ in extra), *(k for _, k in COST_COLUMNS), *(k for _, k in PROTOCOL_COLUMNS)])
    for row in rows:
        protocol = _protocol(row.report)
        writer.writerow([
            *row.labels,
            *(repr(_accuracy(row.report, c)) for c in [*tasks, "average"]),
            *("" if v is None else repr(v) for v in (_extra_value(row.report, e, m) for _, e, m in extra)),
            *("" if v is None else repr(v) for v in (_cost(row.report, k) for _, k in COST_COLUMNS)),
            *(protocol.get(k, "") for _, k in PROTOCOL_COLUMNS),
        ])
    return out.getvalue()


def plot_costs(path: str | os.PathLike, rows: Sequence[Row], title: str = "") -> Path:
    """Average accuracy (%) against merge wall time, one labelled point per method (no merge: at 0)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        x = _cost(row.report, "merge_seconds") or 0.0
        y = 100 * _accuracy(row.report, "average")
        kind = _protocol(row.report).get("kind", "merged")
        marker = {"merged": "o", "task-aware": "s", "ensemble": "^"}.get(kind, "D")
        ax.plot([x], [y], marker=marker, markersize=8, linestyle="none")
        ax.annotate(row.labels[0], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("merge wall time (s; o merged, s task-aware, ^ ensemble)")
    ax.set_ylabel("average accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def write_leaderboard(
    folder: str | os.PathLike, rows: Sequence[Row], tasks: Sequence[str], extra_metrics: bool = True, title: str = "Merging methods"
) -> tuple[Path, Path, Path]:
    """Write ``folder/table.md``, ``table.csv`` (the leaderboard) and ``plot.png`` (average accuracy
    against merge cost); return their paths."""
    folder = Path(folder)
    md = atomic_write_text(folder / "table.md", leaderboard_markdown(rows, tasks, extra_metrics))
    csv_path = atomic_write_text(folder / "table.csv", leaderboard_csv(rows, tasks, extra_metrics))
    return md, csv_path, plot_costs(folder / "plot.png", rows, title=title)


def check_same_tasks(rows: Sequence[Row]) -> list[str]:
    """The rows' common tasks; ``ValueError`` if two rows score different tasks."""
    tasks = report_tasks(rows[0].report)
    for row in rows[1:]:
        if report_tasks(row.report) != tasks:
            raise ValueError(
                f"{row.labels[0]!r} scores {report_tasks(row.report)} but {rows[0].labels[0]!r} scores {tasks}; "
                f"a table compares runs on the same tasks."
            )
    return tasks


def compare(
    paths: Sequence[str | os.PathLike], output_dir: Optional[str | os.PathLike] = None, extra_metrics: bool = True
) -> str:
    """The leaderboard of ``paths`` (accuracy per task, average, extra metrics unless ``extra_metrics``
    is off, costs, data, kind); written to ``output_dir`` if given (``table.md``, ``table.csv``,
    ``plot.png``: average accuracy against merge cost). Returns the markdown."""
    rows = collect_rows(paths)
    if not rows:
        raise ValueError("Nothing to compare: give report files, run folders or sweep folders.")
    tasks = check_same_tasks(rows)
    if output_dir is not None:
        write_leaderboard(output_dir, rows, tasks, extra_metrics)
    return leaderboard_markdown(rows, tasks, extra_metrics)

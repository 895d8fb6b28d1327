"""Reports: FusionBench-compatible JSON files, the callback that writes them, and the per-task table.

Report format (accuracy as a fraction, loss = cross-entropy averaged over examples)::

    {"cola": {"accuracy": a, "loss": l, "mcc": m}, ..., "average": {"accuracy": mean, "loss": mean},
     "mnli_mismatched": {"accuracy": ..., "loss": ...}, "protocol": {...}}

The task entries and ``average`` are FusionBench's (readers that look up task names keep working);
extra metrics are extra keys of a task's entry, never in place of accuracy. Entries that are not
one of the 7 tasks: ``average``; an extra evaluation split such as ``mnli_mismatched`` (scored with
the MNLI head, not in the average); ``protocol`` (what was measured and what the merge cost).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from mergelit.costs import CostRecord
from mergelit.errors import BadData, MergeFailed, NotWritable
from mergelit.metrics import EXTRA_METRICS
from mergelit.tasks import GLUE_TASKS

Report = dict[str, dict[str, Any]]

PROTOCOL = "protocol"
"""The report entry that records the protocol and the costs (no task, no accuracy: readers skip it)."""



def extra_entry(task: str, split: str) -> str:
    """The report entry of an extra evaluation split: ``mnli`` + ``validation_mismatched`` -> ``mnli_mismatched``."""
    return f"{task}_{split.removeprefix('validation_')}"


EXTRA_ENTRIES: dict[str, tuple[str, str]] = {
    extra_entry(task, split): (task, split) for task, info in GLUE_TASKS.items() for split in info.extra_eval_splits
}
"""Entry name -> (task whose head scores it, split), e.g. ``mnli_mismatched`` -> (``mnli``, ``validation_mismatched``)."""

NON_TASK_ENTRIES = ("average", PROTOCOL, *EXTRA_ENTRIES)
"""Report keys that are not one of the averaged tasks."""


def make_report(per_task: Mapping[str, Mapping[str, float]], extra: Mapping[str, Mapping[str, float]] | None = None,
                protocol: Mapping[str, Any] | None = None) -> Report:
    """Add the ``average`` entry (the unweighted mean of the tasks' accuracy and loss), then the
    ``extra`` entries (``mnli_mismatched``: not averaged) and the ``protocol`` entry."""
    report: Report = {task: {k: float(v) for k, v in values.items()} for task, values in per_task.items()}
    tasks = list(per_task)
    report["average"] = {
        key: sum(report[t][key] for t in tasks) / len(tasks) for key in ("accuracy", "loss")
    }
    for name, values in (extra or {}).items():
        report[name] = {k: float(v) for k, v in values.items()}
    if protocol is not None:
        report[PROTOCOL] = dict(protocol)
    return report


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half.

    A full disk or a missing permission fails naming ``path`` (``NotWritable``), and leaves the old file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise NotWritable(f"Cannot write {str(path)!r}: {reason}. Free space or choose another output path.") from None
    except BaseException:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_report(report: Report, path: str | os.PathLike) -> Path:
    return atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def read_report(path: str | os.PathLike) -> Report:
    with open(path) as f:
        return json.load(f)


def format_report(report: Report, extra_metrics: bool = True) -> str:
    """A markdown table: one row per task, the average, then extra splits (``mnli_mismatched``),
    accuracy in percent; ``extra_metrics``: also a column of the task's extra metric (MCC, F1) in percent."""
    header = "| task | accuracy (%) | loss |" + (" other metric (%) |" if extra_metrics else "")
    lines = [header, "|---|---|---|" + ("---|" if extra_metrics else "")]
    for task, values in report.items():
        if task == PROTOCOL or not isinstance(values, dict) or "accuracy" not in values:
            continue
        line = f"| {task} | {100 * values['accuracy']:.2f} | {values['loss']:.4f} |"
        if extra_metrics:
            metric = EXTRA_METRICS.get(task)
            line += f" {metric.upper()} {100 * values[metric]:.2f} |" if metric and metric in values else " |"
        lines.append(line)
    return "\n".join(lines)


def report_table(report: Report) -> tuple[list[str], list[list[Any]]]:
    """The report as a table: one row per entry (tasks, average, extra splits), a column per metric
    any entry has (accuracy, loss, mcc, f1, ...); empty where an entry lacks one. For W&B tables."""
    entries = [(name, values) for name, values in report.items() if name != PROTOCOL and isinstance(values, dict)]
    metrics: list[str] = []
    for _, values in entries:
        metrics += [m for m, v in values.items() if m not in metrics and isinstance(v, (int, float)) and not isinstance(v, bool)]
    rows = [[name, *(values.get(m) for m in metrics)] for name, values in entries]
    return ["entry", *metrics], rows


def prediction_lines(rows: Iterable[Mapping[str, Any]]) -> str:
    """JSON lines, one per example: ``{"idx", "label", "prediction", "logits", "loss"}``."""
    return "".join(json.dumps(dict(row)) + "\n" for row in rows)


PREDICTIONS_MANIFEST = "manifest.json"
"""The file of a predictions folder that lists its entries and says whether the run was partial."""


def write_predictions(
    predictions: Mapping[str, list[Mapping[str, Any]]], folder: str | os.PathLike, partial: bool = False
) -> list[Path]:
    """Write ``folder/<entry>.jsonl`` for every entry (task or ``mnli_mismatched``) and the folder's
    ``manifest.json`` (entries, row counts, ``partial``), atomically. Files an earlier run left there
    for entries this run does not have are removed, so the folder holds this run's predictions only.
    A folder that is a link is refused (it would write outside the output folder)."""
    folder = Path(folder)
    if folder.is_symlink():
        raise NotWritable(f"The predictions folder {str(folder)!r} is a link; mergelit writes only inside its output folder.")
    written = [atomic_write_text(folder / f"{entry}.jsonl", prediction_lines(rows)) for entry, rows in predictions.items()]
    for stale in folder.glob("*.jsonl"):
        if stale.stem not in predictions:
            stale.unlink()
    manifest = {"partial": bool(partial), "entries": {entry: len(rows) for entry, rows in predictions.items()}}
    written.append(atomic_write_text(folder / PREDICTIONS_MANIFEST, json.dumps(manifest, indent=2) + "\n"))
    return written


def remove_predictions(folder: str | os.PathLike) -> None:
    """Remove what ``write_predictions`` writes (a report rewritten without predictions must not sit
    beside an earlier run's)."""
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink():
        for path in [*folder.glob("*.jsonl"), folder / PREDICTIONS_MANIFEST]:
            path.unlink(missing_ok=True)


def read_predictions(folder: str | os.PathLike, allow_partial: bool = False) -> dict[str, list[dict[str, Any]]]:
    """``folder/<entry>.jsonl`` files -> ``{entry: [row, ...]}``, as its manifest lists them.

    A partial run's predictions (``limit_test_batches``, ``fast_dev_run``) are refused unless
    ``allow_partial``: they do not score the whole split. The manifest may name report entries only
    (a task or ``mnli_mismatched``), so no file outside the folder is read; every row must hold an
    integer ``idx``, ``label`` and ``prediction`` (and numbers as its ``logits`` and ``loss``, where
    it has them): a damaged file is named with its line."""
    folder = Path(folder)
    manifest_path = folder / PREDICTIONS_MANIFEST
    entries = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            entries = list(manifest["entries"])
            if not all(isinstance(entry, str) for entry in entries):
                raise TypeError("its 'entries' are not names")
            partial = manifest.get("partial", False)
            if not isinstance(partial, bool):
                raise TypeError(f"'partial' is {partial!r:.40}, not true or false")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise BadData(f"The predictions manifest {str(manifest_path)!r} is damaged ({type(error).__name__}: {error}).") from None
        unknown = [entry for entry in entries if entry not in GLUE_TASKS and entry not in EXTRA_ENTRIES]
        if unknown:
            raise BadData(
                f"The predictions manifest {str(manifest_path)!r} names {unknown[0]!r}, which is no report entry "
                f"(a GLUE task or {', '.join(EXTRA_ENTRIES)}); mergelit reads only <entry>.jsonl files of the folder."
            )
        if partial and not allow_partial:
            raise BadData(
                f"The predictions in {str(folder)!r} come from a partial run (limit_test_batches / fast_dev_run): "
                f"they do not cover the whole split. Rerun without those limits."
            )
    paths = [folder / f"{entry}.jsonl" for entry in entries] if entries is not None else sorted(folder.glob("*.jsonl"))
    out = {}
    for path in paths:
        try:
            out[path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as error:
            raise BadData(f"The predictions file {str(path)!r} cannot be read ({type(error).__name__}: {error}).") from None
        for line, row in enumerate(out[path.stem], 1):
            if not _prediction_row(row):
                raise BadData(
                    f"The predictions file {str(path)!r} line {line} is not a prediction row (integer idx, label and "
                    f"prediction; a list of logits and a number loss if any): {json.dumps(row)[:80]}"
                )
    return out


def _prediction_row(row: Any) -> bool:
    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    logits = row.get("logits", [0.0]) if isinstance(row, dict) else None
    return (
        isinstance(row, dict) and all(integer(row.get(key)) for key in ("idx", "label", "prediction"))
        and isinstance(logits, list) and bool(logits) and all(number(z) for z in logits)
        and number(row.get("loss", 0.0))
    )


def check_finite_predictions(predictions: Mapping[str, list[Mapping[str, Any]]]) -> None:
    """Refuse to report a task whose logits or losses are not finite, naming it and the likely cause."""
    import math

    for entry, rows in predictions.items():
        bad = sum(1 for row in rows if not (math.isfinite(row["loss"]) and all(math.isfinite(z) for z in row["logits"])))
        if bad:
            raise MergeFailed(
                f"Task {entry!r}: {bad} of {len(rows)} examples have non-finite logits or loss (NaN/inf), so its "
                f"accuracy would be meaningless; no report was written. The likely cause is a forward pass that "
                f"overflows: merged weights far too large (a huge scaling factor, or an extreme weight in the pool)."
            )


class ReportWriter(Callback):
    """The Lightning callback that makes and writes a run's report (rank 0 writes).

    It owns what is measured around the method rather than by it: the run's costs (``costs``, a
    ``mergelit.costs.CostRecord`` that ``mergelit.run.run_test`` activates around ``prepare`` and
    ``trainer.test``), the per-example rows of every task (gathered from every process at the end),
    and the ``protocol`` entry. The report is ``make_report`` of the method's ``results`` plus that
    protocol; it is in ``report`` after the test, written to ``report.json`` in the run's log folder
    and to ``path`` (``--report_save_path``). From the per-example rows the protocol also gets
    ``per_example`` (each entry's correctness, compactly), ``uncertainty`` (95 % bootstrap
    intervals of each task's accuracy and of the average: ``mergelit.uncertainty``) and, when the
    data holds dev rows out of scoring, ``evaluation`` (which rows were scored).

    Args:
        log_dir: also write ``report.json`` into the run's log folder (``trainer.log_dir``).
        path: also write the report to this file (``--report_save_path``).
        save_predictions: also write the per-example predictions, ``predictions/<task>.jsonl``
            next to each report (``--save_predictions``).

    After the test, ``written`` lists the files it wrote.
    """

    def __init__(self, log_dir: bool = True, path: str | os.PathLike | None = None, save_predictions: bool = False):
        self.log_dir = log_dir
        self.path = path
        self.save_predictions = save_predictions
        self.written: list[Path] = []
        self.report: Report | None = None
        self.predictions: dict[str, list[dict[str, Any]]] | None = None
        self.costs = CostRecord()
        self._rows: dict[str, list[tuple]] = {}

    def new_run(self, path: str | os.PathLike | None = None, save_predictions: bool = False) -> CostRecord:
        """Start a run's report: where to write it, and a fresh cost record (returned)."""
        self.path = path
        self.save_predictions = save_predictions
        self.costs = CostRecord()
        self.report = self.predictions = None
        self.written = []
        return self.costs

    def on_test_start(self, trainer, pl_module) -> None:
        self._rows = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or "entry" not in outputs:
            return
        idx = outputs.get("idx")
        if idx is None:
            idx = torch.full_like(outputs["label"], -1)
        self._rows.setdefault(outputs["entry"], []).append(
            tuple(t.detach().cpu() for t in (idx, outputs["label"], outputs["prediction"], outputs["logits"], outputs["loss"]))
        )

    def on_test_end(self, trainer, pl_module) -> None:
        results = getattr(pl_module, "results", None)
        # trainer.log_dir broadcasts under DDP, so every rank asks; rank 0 alone writes.
        log_dir = trainer.log_dir if self.log_dir else None
        if results is None:
            return
        predictions = gather_predictions(self._rows, [entry for entry, _, _ in pl_module.test_entries], trainer)
        self._rows = {}
        check_finite_predictions(predictions)  # every rank holds every row: they all fail alike
        tasks = list(pl_module.tasks)
        extra = {entry: values for entry, values in results.items() if entry not in tasks}
        self.report = make_report({t: results[t] for t in tasks}, extra, protocol_entry(pl_module, trainer, self.costs))
        self.report[PROTOCOL].update(sampling_entries(getattr(trainer, "datamodule", None), tasks, predictions))
        self.predictions = predictions
        if not trainer.is_global_zero:
            return
        self.written = []
        folders = []
        if log_dir:
            self.written.append(write_report(self.report, os.path.join(log_dir, "report.json")))
            folders.append(Path(log_dir))
        if self.path:
            self.written.append(write_report(self.report, self.path))
            folders.append(Path(self.path).parent)
        # predictions/<task>.jsonl next to each report; an earlier run's there are removed either way.
        partial = bool(self.report[PROTOCOL].get("partial"))
        for folder in dict.fromkeys(f.absolute() for f in folders):
            if self.save_predictions and predictions:
                self.written.extend(write_predictions(predictions, folder / "predictions", partial))
            else:
                remove_predictions(folder / "predictions")


def sampling_entries(datamodule: Any, tasks: list[str], predictions: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, Any]:
    """The protocol entries about what was sampled: ``evaluation`` (the dev rows held out of scoring,
    when the data holds some out), ``per_example`` (each entry's correctness, compactly:
    ``mergelit.uncertainty.encode_correct``) and ``uncertainty`` (95 % bootstrap intervals of each
    task's accuracy and of the average, from the same resamples)."""
    from mergelit import uncertainty

    out: dict[str, Any] = {}
    record = datamodule.evaluation_record() if hasattr(datamodule, "evaluation_record") else None
    if record is not None:
        out["evaluation"] = record
    if not predictions or any(not predictions.get(task) for task in tasks):
        return out
    per_example = {entry: uncertainty.encode_correct(rows) for entry, rows in predictions.items() if rows}
    out["per_example"] = per_example
    out["uncertainty"] = uncertainty.uncertainty_entry(per_example, tasks)
    return out


def gather_predictions(rows: dict[str, list[tuple]], entries: list[str], trainer=None) -> dict[str, list[dict[str, Any]]]:
    """Every process's per-example rows, on every process, sorted by ``idx`` (each example once)."""
    local = {entry: [torch.cat(parts) for parts in zip(*batches)] for entry, batches in rows.items()}
    gathered = [local]
    if (
        trainer is not None
        and trainer.world_size > 1
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
    predictions = {}
    for entry in entries:
        out = []
        for part in gathered:
            if entry in part:
                columns = (t.tolist() for t in part[entry])
                out.extend({"idx": i, "label": y, "prediction": p, "logits": z, "loss": l} for i, y, p, z, l in zip(*columns))
        predictions[entry] = sorted(out, key=lambda row: row["idx"])
    return predictions


def _partial_evaluation(trainer: Any) -> bool:
    if trainer is None:
        return False
    limit = getattr(trainer, "limit_test_batches", 1.0)
    return bool(getattr(trainer, "fast_dev_run", False)) or not (isinstance(limit, float) and limit == 1.0)


def plain_value(value: Any) -> Any:
    """A JSON-safe copy of a hyperparameter value (a nested method becomes its class path and arguments)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if hasattr(value, "hparams") and hasattr(value, "display_name"):  # a base method given to a wrapper
        return {"class_path": f"{type(value).__module__}.{type(value).__name__}", "init_args": plain_value(dict(value.hparams))}
    return repr(value)


def protocol_entry(method, trainer, record: CostRecord | None = None) -> dict[str, Any]:
    """The report's ``protocol`` entry: what was scored how, and what it cost (``record``)."""
    return {
        "method": method.display_name,
        "class_path": f"{type(method).__module__}.{type(method).__name__}",
        "hyperparameters": plain_value(dict(getattr(method, "hparams", {}))),
        "kind": method.kind,
        "data": method.data,
        "bodies_at_inference": method.bodies_at_inference(),
        # A run with limit_test_batches / fast_dev_run scores only part of each split: the report
        # says so, and tables.check_report (compare, sweep resume) never takes it as complete.
        "partial": _partial_evaluation(trainer),
        "splits": {entry: split for entry, _, split in method.test_entries},
        "metrics": {
            entry: ["accuracy", "loss", *([EXTRA_METRICS[entry]] if entry in EXTRA_METRICS else [])]
            for entry, _, _ in method.test_entries
        },
        "costs": (record or CostRecord()).as_dict(),
    }


class RunLogger(CSVLogger):
    """Lightning's ``CSVLogger`` whose ``version_N`` folder is claimed atomically.

    ``CSVLogger`` picks the next free number by listing the folder, so two runs started together
    in one folder both take ``version_0`` and one report overwrites the other. Here the number is
    claimed by creating its folder (``mkdir`` fails if another run made it first, and the next number
    is tried), so concurrent runs get distinct folders. Only rank 0 claims; the other processes of a
    distributed run use rank 0's folder (``trainer.log_dir`` broadcasts it).
    """

    def _get_next_version(self) -> int:
        version = super()._get_next_version()
        if rank_zero_only.rank != 0:
            return version
        root = Path(self.root_dir)
        root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                (root / f"version_{version}").mkdir()
                return version
            except FileExistsError:
                version += 1

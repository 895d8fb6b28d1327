"""Reports: FusionBench-compatible JSON files (docs/sweeps.md), the callback that writes them, predictions.

FusionBench's readers look up task names: extra metrics are extra keys of a task's entry, never in place of
its accuracy, and the entries that are no task (``average``, ``mnli_mismatched``, ``protocol``) come after.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from mergelit import uncertainty
from mergelit.cache import atomic_write_bytes
from mergelit.costs import CostRecord
from mergelit.errors import BadData, MergeFailed, NotWritable
from mergelit.metrics import EXTRA_METRICS
from mergelit.tasks import GLUE_TASKS

Report = dict[str, dict[str, Any]]

PROTOCOL = "protocol"  # the entry of the protocol and the costs (no task, no accuracy: readers skip it)
PREDICTIONS_MANIFEST = "manifest.json"  # a predictions folder's entries, and whether the run was partial


def extra_entry(task: str, split: str) -> str:
    """The report entry of an extra evaluation split: ``mnli`` + ``validation_mismatched`` -> ``mnli_mismatched``."""
    return f"{task}_{split.removeprefix('validation_')}"


# Entry -> (the task whose head scores it, its split), e.g. mnli_mismatched -> (mnli, validation_mismatched).
EXTRA_ENTRIES: dict[str, tuple[str, str]] = {
    extra_entry(task, split): (task, split) for task, info in GLUE_TASKS.items() for split in info.extra_eval_splits
}
NON_TASK_ENTRIES = ("average", PROTOCOL, *EXTRA_ENTRIES)


def make_report(per_task: Mapping[str, Mapping[str, float]], extra: Mapping[str, Mapping[str, float]] | None = None,
                protocol: Mapping[str, Any] | None = None) -> Report:
    """The tasks, their ``average`` (the unweighted mean of accuracy and loss), the ``extra`` entries, ``protocol``."""
    report: Report = {task: {k: float(v) for k, v in values.items()} for task, values in per_task.items()}
    report["average"] = {key: sum(report[t][key] for t in per_task) / len(per_task) for key in ("accuracy", "loss")}
    for name, values in (extra or {}).items():
        report[name] = {k: float(v) for k, v in values.items()}
    if protocol is not None:
        report[PROTOCOL] = dict(protocol)
    return report


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half."""
    return atomic_write_bytes(path, text.encode(), elsewhere="another output path")


def write_report(report: Report, path: str | os.PathLike) -> Path:
    return atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def read_report(path: str | os.PathLike) -> Report:
    with open(path) as f:
        return json.load(f)


def format_report(report: Report, extra_metrics: bool = True) -> str:
    """A markdown table of the entries with an accuracy (in percent) and, with ``extra_metrics``, MCC or F1."""
    lines = ["| task | accuracy (%) | loss |" + (" other metric (%) |" if extra_metrics else ""),
             "|---|---|---|" + ("---|" if extra_metrics else "")]
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
    """For W&B: a row per entry, a column per metric any entry has (empty where an entry lacks it)."""
    entries = [(name, values) for name, values in report.items() if name != PROTOCOL and isinstance(values, dict)]
    metrics: list[str] = []
    for _, values in entries:
        metrics += [m for m, v in values.items()
                    if m not in metrics and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ["entry", *metrics], [[name, *(values.get(m) for m in metrics)] for name, values in entries]


def write_predictions(predictions: Mapping[str, list[Mapping[str, Any]]], folder: str | os.PathLike,
                      partial: bool = False) -> list[Path]:
    """Write ``folder/<entry>.jsonl`` per entry and the manifest; an earlier run's other entries are removed."""
    folder = Path(folder)
    if folder.is_symlink():
        raise NotWritable(f"The predictions folder {str(folder)!r} is a link; mergelit writes only inside its output "
                          f"folder.")
    written = [atomic_write_text(folder / f"{entry}.jsonl", "".join(json.dumps(dict(row)) + "\n" for row in rows))
               for entry, rows in predictions.items()]
    for stale in folder.glob("*.jsonl"):
        if stale.stem not in predictions:
            stale.unlink()
    manifest = {"partial": bool(partial), "entries": {entry: len(rows) for entry, rows in predictions.items()}}
    written.append(atomic_write_text(folder / PREDICTIONS_MANIFEST, json.dumps(manifest, indent=2) + "\n"))
    return written


def remove_predictions(folder: str | os.PathLike) -> None:
    """Remove what ``write_predictions`` writes (a report written without predictions has none beside it)."""
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink():
        for path in [*folder.glob("*.jsonl"), folder / PREDICTIONS_MANIFEST]:
            path.unlink(missing_ok=True)


def read_predictions(folder: str | os.PathLike, allow_partial: bool = False) -> dict[str, list[dict[str, Any]]]:
    """``{entry: [row, ...]}`` of the entries the manifest lists (report entries only, so no file outside the folder
    is read), every row checked; a partial run's are refused unless ``allow_partial``."""
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
            raise BadData(f"The predictions manifest {str(manifest_path)!r} is damaged "
                          f"({type(error).__name__}: {error}).") from None
        unknown = [entry for entry in entries if entry not in GLUE_TASKS and entry not in EXTRA_ENTRIES]
        if unknown:
            raise BadData(f"The predictions manifest {str(manifest_path)!r} names {unknown[0]!r}, which is no report "
                          f"entry (a GLUE task or {', '.join(EXTRA_ENTRIES)}); mergelit reads only <entry>.jsonl files "
                          f"of the folder.")
        if partial and not allow_partial:
            raise BadData(f"The predictions in {str(folder)!r} come from a partial run (limit_test_batches / "
                          f"fast_dev_run): they do not cover the whole split. Rerun without those limits.")
    paths = [folder / f"{entry}.jsonl" for entry in entries] if entries is not None else sorted(folder.glob("*.jsonl"))
    out = {}
    for path in paths:
        try:
            out[path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as error:
            raise BadData(f"The predictions file {str(path)!r} cannot be read "
                          f"({type(error).__name__}: {error}).") from None
        for line, row in enumerate(out[path.stem], 1):
            if not _prediction_row(row):
                raise BadData(f"The predictions file {str(path)!r} line {line} is not a prediction row (integer idx, "
                              f"label and prediction; a list of logits and a number loss if any): "
                              f"{json.dumps(row)[:80]}")
    return out


def _prediction_row(row: Any) -> bool:
    def number(value: Any, kinds: tuple = (int, float)) -> bool:
        return isinstance(value, kinds) and not isinstance(value, bool)

    logits = row.get("logits", [0.0]) if isinstance(row, dict) else None
    return (
        isinstance(row, dict) and all(number(row.get(key), int) for key in ("idx", "label", "prediction"))
        and isinstance(logits, list) and bool(logits) and all(number(z) for z in logits)
        and number(row.get("loss", 0.0))
    )


class ReportWriter(Callback):
    """The Lightning callback that makes a run's report (the method's ``results`` and the ``protocol`` entry, with
    the ``costs`` that ``mergelit.run.run_test`` activates and the rows gathered from every process); rank 0 writes.

    Args:
        log_dir: also write ``report.json`` into the run's log folder (``trainer.log_dir``).
        path: also write the report to this file (``--report_save_path``).
        save_predictions: also write ``predictions/<task>.jsonl`` next to each report (``--save_predictions``).
    """

    def __init__(self, log_dir: bool = True, path: str | os.PathLike | None = None, save_predictions: bool = False):
        self.log_dir = log_dir
        self._rows: dict[str, list[tuple]] = {}
        self.new_run(path, save_predictions)

    def new_run(self, path: str | os.PathLike | None = None, save_predictions: bool = False) -> CostRecord:
        """Start a run's report: where to write it, and a fresh cost record (returned)."""
        self.path = path
        self.save_predictions = save_predictions
        self.costs = CostRecord()
        self.report: Report | None = None
        self.predictions: dict[str, list[dict[str, Any]]] | None = None
        self.written: list[Path] = []
        return self.costs

    def on_test_start(self, trainer, pl_module) -> None:
        self._rows = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not isinstance(outputs, dict) or "entry" not in outputs:
            return
        idx = outputs.get("idx")
        if idx is None:
            idx = torch.full_like(outputs["label"], -1)
        columns = (idx, outputs["label"], outputs["prediction"], outputs["logits"], outputs["loss"])
        self._rows.setdefault(outputs["entry"], []).append(tuple(t.detach().cpu() for t in columns))

    def on_test_end(self, trainer, pl_module) -> None:
        results = getattr(pl_module, "results", None)
        # trainer.log_dir broadcasts under DDP, so every rank asks; rank 0 alone writes.
        log_dir = trainer.log_dir if self.log_dir else None
        if results is None:
            return
        predictions = gather_predictions(self._rows, [entry for entry, _, _ in pl_module.test_entries], trainer)
        self._rows = {}
        for entry, rows in predictions.items():  # every rank holds every row: they all fail alike
            bad = sum(1 for row in rows if not (math.isfinite(row["loss"]) and all(map(math.isfinite, row["logits"]))))
            if bad:
                raise MergeFailed(f"Task {entry!r}: {bad} of {len(rows)} examples have non-finite logits or loss "
                                  f"(NaN/inf), so its accuracy would be meaningless; no report was written. The likely "
                                  f"cause is a forward pass that overflows: merged weights far too large (a huge "
                                  f"scaling factor, or an extreme weight in the pool).")
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


def sampling_entries(datamodule: Any, tasks: list[str], predictions: Mapping[str, list[Mapping[str, Any]]]
                     ) -> dict[str, Any]:
    """The protocol's ``evaluation`` (the dev rows held out of scoring, if any), ``per_example`` (each entry's
    correctness, compactly) and ``uncertainty`` (bootstrap intervals of each accuracy and the average)."""
    out: dict[str, Any] = {}
    record = datamodule.evaluation_record() if hasattr(datamodule, "evaluation_record") else None
    if record is not None:
        out["evaluation"] = record
    if not predictions or any(not predictions.get(task) for task in tasks):
        return out
    out["per_example"] = {entry: uncertainty.encode_correct(rows) for entry, rows in predictions.items() if rows}
    out["uncertainty"] = uncertainty.uncertainty_entry(out["per_example"], tasks)
    return out


def gather_predictions(rows: dict[str, list[tuple]], entries: list[str], trainer=None
                       ) -> dict[str, list[dict[str, Any]]]:
    """Every process's per-example rows, on every process, sorted by ``idx`` (each example once)."""
    local = {entry: [torch.cat(parts) for parts in zip(*batches)] for entry, batches in rows.items()}
    gathered = [local]
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if trainer is not None and trainer.world_size > 1 and distributed:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
    predictions = {}
    for entry in entries:
        out = []
        for part in gathered:
            if entry in part:
                columns = zip(*(t.tolist() for t in part[entry]))
                out.extend({"idx": i, "label": y, "prediction": p, "logits": z, "loss": l} for i, y, p, z, l in columns)
        predictions[entry] = sorted(out, key=lambda row: row["idx"])
    return predictions


def plain_value(value: Any) -> Any:
    """A JSON-safe copy of a hyperparameter value (a nested method becomes its class path and arguments)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if hasattr(value, "hparams") and hasattr(value, "display_name"):  # a base method given to a wrapper
        class_path = f"{type(value).__module__}.{type(value).__name__}"
        return {"class_path": class_path, "init_args": plain_value(dict(value.hparams))}
    return repr(value)


def protocol_entry(method, trainer, record: CostRecord | None = None) -> dict[str, Any]:
    """The report's ``protocol`` entry: what was scored how, and what it cost (``record``)."""
    limit = getattr(trainer, "limit_test_batches", 1.0)
    return {
        "method": method.display_name,
        "class_path": f"{type(method).__module__}.{type(method).__name__}",
        "hyperparameters": plain_value(dict(getattr(method, "hparams", {}))),
        "kind": method.kind,
        "data": method.data,
        "bodies_at_inference": method.bodies_at_inference(),
        # limit_test_batches / fast_dev_run score part of each split: tables.check_report never takes it as complete.
        "partial": trainer is not None and (bool(getattr(trainer, "fast_dev_run", False))
                                            or not (isinstance(limit, float) and limit == 1.0)),
        "splits": {entry: split for entry, _, split in method.test_entries},
        "metrics": {entry: ["accuracy", "loss", *([EXTRA_METRICS[entry]] if entry in EXTRA_METRICS else [])]
                    for entry, _, _ in method.test_entries},
        "costs": (record or CostRecord()).as_dict(),
    }


class RunLogger(CSVLogger):
    """Lightning's ``CSVLogger`` whose ``version_N`` folder rank 0 claims by creating it (``mkdir`` fails if another
    run made it first), where listing the folder would give two runs started together ``version_0``."""

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

"""The flow of one ``mergelit test``, top to bottom (a sweep point runs the same function).

1. ``method.prepare(trainer, datamodule)``: statistics (``trainer.predict``) or adaptation
   (``trainer.fit``) of data-driven methods; nothing for the others.
2. ``trainer.test(method, datamodule)``: ``method.setup`` merges the pool once, ``test_step``
   scores every task with its own head, ``on_test_epoch_end`` computes the report, and the
   ``ReportWriter`` callback writes it (rank 0).
3. The table is printed, and the merged model exported if asked.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from mergelit import costs
from mergelit.errors import MergelitError, NotWritable
from mergelit.export import Provenance, check_export_folder, command_line, save_merged
from mergelit.methods.base import MergeMethod
from mergelit.tasks import GLUE_TASKS
from mergelit.report import Report, ReportWriter, format_report, report_table


def report_writer(trainer: L.Trainer) -> ReportWriter:
    """The trainer's ``ReportWriter``, added (writing to the log dir) if it has none."""
    for callback in trainer.callbacks:
        if isinstance(callback, ReportWriter):
            return callback
    writer = ReportWriter()
    trainer.callbacks.append(writer)
    return writer


def run_test(
    trainer: L.Trainer,
    method: MergeMethod,
    datamodule: Optional[L.LightningDataModule],
    report_save_path: Optional[str] = None,
    merged_model_save_path: Optional[str] = None,
    verbose: bool = False,
    quiet: bool = False,
    save_predictions: bool = False,
    fused_gelu: bool = False,
    extra_metrics: bool = True,
    config_yaml: Optional[str] = None,
    wandb_artifact: bool = False,
) -> Report:
    """Prepare, merge and score ``method``; write and print its report; export it if asked.

    ``save_predictions``: also write ``predictions/<task>.jsonl`` (idx, label, predicted class,
    logits per example) next to the report. ``fused_gelu``: score with torch's fused tanh GELU
    (faster on CPU; changes logits in the last bits, see benchmarks/gelu.py). The report's
    ``protocol.costs`` holds the time and peak memory of ``prepare`` (statistics, adaptation), of
    the merge, and of reading the pool (``mergelit.costs``). ``config_yaml``: the run's resolved
    config, written into an export beside its model card; ``wandb_artifact``: also log the
    export as a W&B artifact.
    """
    writer = report_writer(trainer)
    record = writer.new_run(report_save_path, save_predictions)
    method.use_fused_gelu(fused_gelu)
    if wandb_artifact and not (merged_model_save_path and _wandb_loggers(trainer)):
        raise MergelitError(
            "--export.wandb_artifact true logs the export to W&B: it needs --merged_model_save_path and a W&B logger "
            "(--trainer.logger lightning.pytorch.loggers.WandbLogger)."
        )
    check_inputs(trainer, method, datamodule, report_save_path, merged_model_save_path)
    with costs.recording(record):
        with costs.phase("prepare"):
            method.prepare(trainer, datamodule)
        trainer.test(method, datamodule=datamodule, verbose=verbose)
    _log_to_wandb(trainer, writer.report)
    if not quiet:
        _print_report(method, writer.report, writer.written, extra_metrics)
    if merged_model_save_path:
        _export(method, merged_model_save_path, Provenance(writer.report, config_yaml, command_line()))
        if wandb_artifact:
            _log_artifact(trainer, method, merged_model_save_path)
    return writer.report


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Fail, naming ``what`` and ``path``, unless ``path`` (a file or folder to be written) can be created there."""
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != target and not existing.is_dir():
        raise NotWritable(f"The {what} {str(path)!r} cannot be written: {str(existing)!r} is a file, not a folder.")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise NotWritable(f"The {what} {str(path)!r} cannot be written: no write permission in {str(folder)!r}.")
    # os.access says yes to root on a read-only or pseudo file system: a real file says it now, not after the run.
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mergelit-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise NotWritable(f"The {what} {str(path)!r} cannot be written: {reason} in {str(folder)!r}.") from None


def _check_batches_per_process(trainer: L.Trainer, datamodule) -> None:
    # Each process scores every world_size-th batch; Lightning refuses a process with no batch (a
    # crash of one rank that hangs the others), so say it now, on every rank alike.
    world = trainer.world_size
    batch_size = getattr(datamodule, "batch_size", None)
    if world <= 1 or not isinstance(batch_size, int) or not hasattr(datamodule, "raw"):
        return
    for task in datamodule.tasks:
        info = GLUE_TASKS[task]
        for split in (info.eval_split, *info.extra_eval_splits):
            try:
                rows = len(datamodule.raw(task, split))
            except KeyError:
                continue  # an optional extra split that is absent
            batches = -(-rows // batch_size)
            if batches < world:
                raise MergelitError(
                    f"Task {task!r} split {split!r} has {rows} rows: {batches} batch(es) of data.batch_size {batch_size} "
                    f"for {world} processes, so a process would score nothing. Use data.batch_size <= "
                    f"{max(1, rows // world)} or fewer devices."
                )


def check_inputs(
    trainer: L.Trainer,
    method: MergeMethod,
    datamodule: Optional[L.LightningDataModule],
    report_save_path: Optional[str] = None,
    merged_model_save_path: Optional[str] = None,
) -> None:
    """Everything knowable before the heavy work (statistics, adaptation, the merge, evaluation).

    Every output path is checked for writability; every model of the pool is loaded and checked
    (labels, shapes, finite weights); every split the method reads is checked (present, columns,
    labels in range, not empty); the tokenizer must agree with the heads' pad id and fit the
    embedding; ``max_length`` must fit the model's positions.
    """
    for path, what in (
        (report_save_path, "report path (--report_save_path)"),
        (merged_model_save_path, "export folder (--merged_model_save_path)"),
        (getattr(trainer.logger, "save_dir", None) if trainer.logger else None, "log folder (trainer.logger's save_dir)"),
        (getattr(datamodule, "cache_dir", None), "tokenized-data cache folder (data.cache_dir)"),
        (getattr(method, "cache_dir", None), "statistics cache folder (model.init_args.cache_dir)"),
    ):
        if path:
            check_writable(path, what)
    if report_save_path and Path(report_save_path).is_symlink():
        raise NotWritable(
            f"The report path (--report_save_path) {str(report_save_path)!r} is a link (to {os.readlink(report_save_path)!r}); "
            f"mergelit writes its report only as a file of its own. Give another path, or remove the link."
        )
    if report_save_path and Path(report_save_path).is_dir():
        raise NotWritable(f"The report path (--report_save_path) {str(report_save_path)!r} is a folder; give a file name.")
    if report_save_path and (Path(report_save_path).parent / "predictions").is_symlink():
        # Predictions beside the report go to predictions/: never through a link out of the output folder.
        raise NotWritable(
            f"The predictions folder {str(Path(report_save_path).parent / 'predictions')!r} beside the report is a link; "
            f"mergelit writes only inside its output folder. Remove the link, or choose another --report_save_path."
        )
    if merged_model_save_path:
        if not method.exportable:
            raise MergelitError(
                f"{type(method).__name__} has no merged body to export; drop --merged_model_save_path, or export a merging method."
            )
        check_export_folder(merged_model_save_path)
    pool = method.pool
    pool.check()
    pool.check_weights()
    if datamodule is None or not hasattr(datamodule, "check"):
        return
    if list(getattr(datamodule, "tasks", pool.tasks)) != list(pool.tasks):
        raise MergelitError(
            f"The data's tasks {list(datamodule.tasks)} differ from the pool's {list(pool.tasks)}; "
            f"set data.tasks to the pool's (the CLI links them)."
        )
    roles = ["eval"]
    if "train" in str(getattr(method, "data", "none")):
        roles.append("train")
    datamodule.check(tuple(roles))
    _check_batches_per_process(trainer, datamodule)
    config = pool.body_config()
    max_length = getattr(datamodule, "max_length", None)
    if isinstance(max_length, int) and max_length > config.n_positions:
        raise MergelitError(
            f"data.max_length {max_length} exceeds the model's n_positions {config.n_positions} (its position "
            f"embedding); set data.max_length <= {config.n_positions}."
        )
    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is None:
        return
    rows = pool.body_shapes()["wte.weight"][0]
    if len(tokenizer) > rows:
        raise MergelitError(
            f"The tokenizer {getattr(datamodule, 'tokenizer_path', '')!r} has {len(tokenizer)} tokens but the model's "
            f"embedding has {rows} rows; use the pool's own tokenizer (pool.tokenizer)."
        )
    check_tokenizer_matches_pool(tokenizer, getattr(datamodule, "tokenizer_path", ""), pool)
    for task in pool.tasks:
        head_pad = pool.task_config(task).pad_token_id
        if head_pad != tokenizer.pad_token_id:
            raise MergelitError(
                f"The tokenizer's pad id is {tokenizer.pad_token_id} but the {task!r} head reads out at pad_token_id "
                f"{head_pad} (its config.json): predictions would be read at padding. Use the tokenizer the heads "
                f"were trained with, or fix pad_token_id in {pool.finetuned_paths[task]}/config.json."
            )


def check_tokenizer_matches_pool(tokenizer, tokenizer_path: str, pool) -> None:
    """The tokenizer that makes the token ids must be the one the models were trained with: where a
    fine-tuned checkpoint folder holds tokenizer files of its own, they must give the same ids
    (vocabulary, merges, normalisation, pad), else the run is refused naming both."""
    from mergelit.glue import has_tokenizer_files, load_tokenizer, tokenizer_files_digest, tokenizer_fingerprint

    used_files = tokenizer_files_digest(str(tokenizer_path))
    for task in pool.tasks:
        folder = pool._finetuned_checkpoint(task).folder
        if os.path.abspath(folder) == os.path.abspath(str(tokenizer_path)) or not has_tokenizer_files(folder):
            continue
        if used_files is not None and tokenizer_files_digest(folder) == used_files:
            continue  # byte-identical files: the same tokenizer
        if tokenizer_fingerprint(load_tokenizer(folder)) != tokenizer_fingerprint(tokenizer):
            raise MergelitError(
                f"The tokenizer {tokenizer_path!r} (data.tokenizer / pool.tokenizer) gives other token ids than the "
                f"{task!r} model's own tokenizer in {folder!r} (another vocabulary or merges): its scores would be "
                f"silently wrong. Use the pool's own tokenizer (pool.tokenizer: {folder!r})."
            )


def _wandb_loggers(trainer: L.Trainer) -> list:
    # By class name: importing wandb (slow) only when a run has such a logger.
    return [logger for logger in trainer.loggers if type(logger).__name__ == "WandbLogger"]


@rank_zero_only
def _log_to_wandb(trainer: L.Trainer, report: Report) -> None:
    """With a W&B logger: the report as a ``wandb.Table`` (``test/table``) and its costs in the run's summary."""
    loggers = _wandb_loggers(trainer)
    if not loggers or report is None:
        return
    import wandb

    columns, rows = report_table(report)
    costs = {f"costs/{k}": v for k, v in ((report.get("protocol") or {}).get("costs") or {}).items() if v is not None}
    for logger in loggers:
        logger.experiment.log({"test/table": wandb.Table(columns=columns, data=rows)})
        logger.experiment.summary.update(costs)


@rank_zero_only
def _log_artifact(trainer: L.Trainer, method: MergeMethod, folder: str) -> None:
    """The export folder as a W&B ``model`` artifact, to each W&B logger of the run."""
    import wandb

    name = re.sub(r"[^A-Za-z0-9._-]", "-", f"{method.display_name}-{Path(folder).name}")
    for logger in _wandb_loggers(trainer):
        artifact = wandb.Artifact(name, type="model", metadata={"method": method.display_name, **dict(method.hparams)})
        artifact.add_dir(str(folder))
        logger.experiment.log_artifact(artifact)


@rank_zero_only
def _print_report(method: MergeMethod, report: Report, written: list[Path], extra_metrics: bool = True) -> None:
    print(f"\n{method.display_name} on {len(method.tasks)} GLUE tasks\n{format_report(report, extra_metrics)}\n")
    for path in written:
        if path.suffix != ".jsonl" and path.parent.name != "predictions":
            print(f"Report: {path}")
    for folder in dict.fromkeys(path.parent for path in written if path.suffix == ".jsonl"):
        print(f"Predictions: {folder}/<task>.jsonl")


@rank_zero_only
def _export(method: MergeMethod, folder: str, provenance: Provenance) -> None:
    folders = save_merged(folder, method.pool, lambda task: method.body_for(task).state_dict(), provenance)
    print(f"Merged model exported to {folder} ({len(folders)} task checkpoints)")

"""The flow of one ``mergelit test``, top to bottom (a sweep point runs the same function): check the
inputs; ``method.prepare`` (statistics or adaptation of data-driven methods); ``trainer.test``
(``method.setup`` merges once, each task is scored with its own head, the ``ReportWriter`` callback
writes the report on rank 0); print the table; export the merged model if asked.
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
from mergelit.report import Report, ReportWriter, format_report, report_table
from mergelit.tasks import GLUE_TASKS
from mergelit.tracking import wandb_loggers


def run_test(
    trainer: L.Trainer, method: MergeMethod, datamodule: Optional[L.LightningDataModule],
    report_save_path: Optional[str] = None, merged_model_save_path: Optional[str] = None, verbose: bool = False,
    quiet: bool = False, save_predictions: bool = False, fused_gelu: bool = False, extra_metrics: bool = True,
    config_yaml: Optional[str] = None, wandb_artifact: bool = False,
) -> Report:
    """Prepare, merge and score ``method``; write and print its report (``protocol.costs``: time and peak
    memory of ``prepare``, the merge and reading the pool); export it if asked. The options are
    ``mergelit test``'s (``config_yaml``: the resolved config, written into an export)."""
    writer = next((c for c in trainer.callbacks if isinstance(c, ReportWriter)), None)
    if writer is None:  # a trainer without one: its report goes to the log dir
        writer = ReportWriter()
        trainer.callbacks.append(writer)
    record = writer.new_run(report_save_path, save_predictions)
    method.use_fused_gelu(fused_gelu)
    if wandb_artifact and not (merged_model_save_path and wandb_loggers(trainer)):
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
        provenance = Provenance(writer.report, config_yaml, command_line())
        _export(trainer, method, merged_model_save_path, provenance, wandb_artifact)
    return writer.report


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Fail, naming ``what`` and ``path``, unless ``path`` (a file or folder) can be created there."""
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


def check_inputs(
    trainer: L.Trainer, method: MergeMethod, datamodule: Optional[L.LightningDataModule],
    report_save_path: Optional[str] = None, merged_model_save_path: Optional[str] = None,
) -> None:
    """Everything knowable before the heavy work: output paths writable; the pool's models (labels,
    shapes, finite weights); every split the method reads; the tokenizer against the heads and the
    embedding; ``max_length`` against the positions (docs/reliability.md)."""
    for path, what in (
        (report_save_path, "report path (--report_save_path)"),
        (merged_model_save_path, "export folder (--merged_model_save_path)"),
        (getattr(trainer.logger, "save_dir", None) if trainer.logger else None, "log folder (trainer.logger's save_dir)"),
        (getattr(datamodule, "cache_dir", None), "tokenized-data cache folder (data.cache_dir)"),
        (getattr(method, "cache_dir", None), "statistics cache folder (model.init_args.cache_dir)"),
    ):
        if path:
            check_writable(path, what)
    report = Path(report_save_path) if report_save_path else None
    if report and report.is_symlink():
        raise NotWritable(
            f"The report path (--report_save_path) {str(report_save_path)!r} is a link (to {os.readlink(report_save_path)!r}); "
            f"mergelit writes its report only as a file of its own. Give another path, or remove the link."
        )
    if report and report.is_dir():
        raise NotWritable(f"The report path (--report_save_path) {str(report_save_path)!r} is a folder; give a file name.")
    if report and (report.parent / "predictions").is_symlink():  # never write through a link out of the folder
        raise NotWritable(
            f"The predictions folder {str(report.parent / 'predictions')!r} beside the report is a link; "
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
    datamodule.check(("eval", "train") if "train" in str(getattr(method, "data", "none")) else ("eval",))
    # Each process scores every world_size-th batch; Lightning refuses a process with no batch (a
    # crash of one rank that hangs the others), so say it now, on every rank alike.
    world, batch_size = trainer.world_size, getattr(datamodule, "batch_size", None)
    if world > 1 and isinstance(batch_size, int) and hasattr(datamodule, "raw"):
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
                        f"Task {task!r} split {split!r} has {rows} rows: {batches} batch(es) of data.batch_size "
                        f"{batch_size} for {world} processes, so a process would score nothing. Use data.batch_size <= "
                        f"{max(1, rows // world)} or fewer devices."
                    )
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
    from mergelit.glue import has_tokenizer_files, load_tokenizer, tokenizer_files_digest, tokenizer_fingerprint

    tokenizer_path = getattr(datamodule, "tokenizer_path", "")
    rows = pool.body_shapes()["wte.weight"][0]
    if len(tokenizer) > rows:
        raise MergelitError(
            f"The tokenizer {tokenizer_path!r} has {len(tokenizer)} tokens but the model's "
            f"embedding has {rows} rows; use the pool's own tokenizer (pool.tokenizer)."
        )
    # Where a fine-tuned checkpoint folder holds tokenizer files, they must give the same token ids
    # (vocabulary, merges, normalisation, pad) as the tokenizer used.
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
    for task in pool.tasks:
        head_pad = pool.task_config(task).pad_token_id
        if head_pad != tokenizer.pad_token_id:
            raise MergelitError(
                f"The tokenizer's pad id is {tokenizer.pad_token_id} but the {task!r} head reads out at pad_token_id "
                f"{head_pad} (its config.json): predictions would be read at padding. Use the tokenizer the heads "
                f"were trained with, or fix pad_token_id in {pool.finetuned_paths[task]}/config.json."
            )


@rank_zero_only
def _log_to_wandb(trainer: L.Trainer, report: Report) -> None:
    """With a W&B logger: the report as a ``wandb.Table`` (``test/table``) and its costs in the run's summary."""
    loggers = wandb_loggers(trainer)
    if not loggers or report is None:
        return
    import wandb  # slow: only when a run has such a logger

    columns, rows = report_table(report)
    costs = {f"costs/{k}": v for k, v in ((report.get("protocol") or {}).get("costs") or {}).items() if v is not None}
    for logger in loggers:
        logger.experiment.log({"test/table": wandb.Table(columns=columns, data=rows)})
        logger.experiment.summary.update(costs)


@rank_zero_only
def _print_report(method: MergeMethod, report: Report, written: list[Path], extra_metrics: bool = True) -> None:
    print(f"\n{method.display_name} on {len(method.tasks)} GLUE tasks\n{format_report(report, extra_metrics)}\n")
    for path in written:
        if path.suffix != ".jsonl" and path.parent.name != "predictions":
            print(f"Report: {path}")
    for folder in dict.fromkeys(path.parent for path in written if path.suffix == ".jsonl"):
        print(f"Predictions: {folder}/<task>.jsonl")


@rank_zero_only
def _export(trainer: L.Trainer, method: MergeMethod, folder: str, provenance: Provenance, wandb_artifact: bool) -> None:
    """The merged model's checkpoints; with ``wandb_artifact``, also a W&B ``model`` artifact per W&B logger."""
    folders = save_merged(folder, method.pool, lambda task: method.body_for(task).state_dict(), provenance)
    print(f"Merged model exported to {folder} ({len(folders)} task checkpoints)")
    if not wandb_artifact:
        return
    import wandb

    name = re.sub(r"[^A-Za-z0-9._-]", "-", f"{method.display_name}-{Path(folder).name}")
    for logger in wandb_loggers(trainer):
        artifact = wandb.Artifact(name, type="model", metadata={"method": method.display_name, **dict(method.hparams)})
        artifact.add_dir(str(folder))
        logger.experiment.log_artifact(artifact)

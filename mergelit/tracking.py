"""Weights & Biases through Lightning's ``WandbLogger``: offline unless the user has a key; the sweep's summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info


def has_wandb_key() -> bool:
    """Whether W&B finds credentials (environment, settings or netrc), asking W&B itself; no prompt, no network."""
    import wandb
    return bool(wandb.login(prompt=False, verify=False))


def wandb_logger(class_type: type, *args: Any, **kwargs: Any):
    """A jsonargparse instantiator for ``WandbLogger``: offline (to ./wandb, for ``wandb sync``) when no mode is
    chosen (``WANDB_MODE``, ``offline:``) and no key is found, since ``wandb.init`` would fail at once."""
    if not kwargs.get("offline") and not os.environ.get("WANDB_MODE") and not has_wandb_key():
        kwargs["offline"] = True
        rank_zero_info("W&B: no API key found, logging offline to ./wandb (upload later with `wandb sync`).")
    return class_type(*args, **kwargs)


def wandb_logger_class() -> type:
    return WandbLogger


def is_wandb_logger_class(class_type: type) -> bool:
    return issubclass(class_type, wandb_logger_class())


def wandb_loggers(trainer) -> list:
    return [logger for logger in trainer.loggers if isinstance(logger, wandb_logger_class())]


def finish() -> None:
    """End the active W&B run, so that the next point starts its own (a new WandbLogger would join it)."""
    import wandb
    wandb.finish()


def log_summary(logger, columns: Sequence[str], data: Sequence[Sequence[Any]], plot: Optional[Path],
                markdown: str) -> None:
    """Log the sweep table as a ``wandb.Table`` and the plot as an image to ``logger``'s run, then end it."""
    import wandb
    experiment = logger.experiment
    payload: dict[str, Any] = {"sweep/table": wandb.Table(columns=list(columns), data=[list(row) for row in data])}
    if plot is not None and Path(plot).is_file():
        payload["sweep/plot"] = wandb.Image(str(plot))
    experiment.log(payload)
    experiment.summary["sweep/table_markdown"] = markdown
    finish()
    # finish() returns before W&B's service has written everything (offline files too); wait for
    # it here, so that the runs are complete when the command returns (in-process callers, tests).
    wandb.teardown()

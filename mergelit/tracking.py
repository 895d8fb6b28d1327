"""Weights & Biases: offline unless the user has a key; one run per sweep point; the sweep's table and plot.

W&B is used through Lightning's ``WandbLogger`` (``--trainer.logger
lightning.pytorch.loggers.WandbLogger``, or in YAML), never imported by the rest of mergelit.
Without an API key ``wandb.init`` fails at once, so ``default_wandb_mode`` picks offline
mode when the user has neither ``WANDB_API_KEY`` nor a ``wandb login`` entry in their netrc
and has not chosen a mode: runs go to ``./wandb/offline-run-*`` and ``wandb sync`` uploads
them later. With a key, nothing changes (online).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlparse


def has_wandb_key() -> bool:
    """Whether W&B would find an API key: ``WANDB_API_KEY``, or the netrc entry ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def default_wandb_mode() -> Optional[str]:
    """Set ``WANDB_MODE=offline`` when no mode is chosen and no key is found; return the mode set."""
    if os.environ.get("WANDB_MODE") or has_wandb_key():
        return None
    os.environ["WANDB_MODE"] = "offline"
    return "offline"


def is_wandb_logger_class(class_type: type) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return issubclass(class_type, WandbLogger)


def is_wandb_logger(logger: Any) -> bool:
    return is_wandb_logger_class(type(logger))


def wandb_loggers(trainer) -> list:
    return [logger for logger in trainer.loggers if is_wandb_logger(logger)]


def finish(logger) -> None:
    """End the logger's W&B run (if it started one), so that the next point starts its own
    (a WandbLogger made while a run is active would join that run)."""
    experiment = getattr(logger, "_experiment", None)  # not `.experiment`: that would start a run
    if experiment is not None:
        experiment.finish()


def log_summary(
    logger, columns: Sequence[str], data: Sequence[Sequence[Any]], plot: Optional[Path], markdown: str
) -> None:
    """Log the sweep table as a ``wandb.Table`` and the plot as an image to ``logger``'s run, then end it."""
    import wandb

    experiment = logger.experiment
    payload: dict[str, Any] = {"sweep/table": wandb.Table(columns=list(columns), data=[list(row) for row in data])}
    if plot is not None and Path(plot).is_file():
        payload["sweep/plot"] = wandb.Image(str(plot))
    experiment.log(payload)
    experiment.summary["sweep/table_markdown"] = markdown
    finish(logger)
    # finish() returns before W&B's service has written everything (offline files too); wait for
    # it here, so that the runs are complete when the command returns (in-process callers, tests).
    wandb.teardown()

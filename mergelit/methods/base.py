"""MergeMethod: the one base class. ``setup`` merges the pool once; ``test_step`` scores it.

A subclass implements ``merge() -> state dict`` of the merged GPT-2 body. Scoring task t
always uses task t's own fine-tuned head on the evaluated body, read out at the last
non-pad token of each row (as ``GPT2ForSequenceClassification`` does).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from mergelit.pool import ModelPool
from mergelit.report import Report, make_report, write_report


def last_non_pad_index(input_ids: Tensor, pad_token_id: int) -> Tensor:
    """Index of the rightmost token that is not the pad id, per row (GPT-2's read-out)."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def _mean_metric() -> torchmetrics.MeanMetric:
    return torchmetrics.MeanMetric().set_dtype(torch.float64)


def build_body(config, state: dict[str, Tensor]) -> nn.Module:
    """A frozen ``GPT2Model`` holding ``state`` (built on the meta device: no random init)."""
    from transformers import GPT2Model

    with torch.device("meta"):
        body = GPT2Model(config)
    body.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    return body.eval().requires_grad_(False)


class MergeMethod(L.LightningModule):
    """Base of every method: merge in ``setup``, score each GLUE task with its own head.

    Args:
        pool: the models to merge (the CLI's ``pool:`` group, linked in).
    """

    def __init__(self, pool: ModelPool):
        super().__init__()
        self.pool = pool
        self.tasks = list(pool.tasks)
        self.body: nn.Module | None = None
        self.heads = nn.ModuleDict()
        self.pad_token_ids: dict[str, int] = {}
        self.report: Report | None = None
        self.report_path: str | None = None  # the run's log_dir/report.json, once tested
        # Plain (micro) accuracy = mean of per-example correctness, and cross-entropy averaged
        # over examples (not over batch means, which would depend on the batch size). Both are
        # torchmetrics means (synced across processes) in float64, so the report holds the
        # exact fraction correct/total.
        self.test_accuracy = nn.ModuleDict({task: _mean_metric() for task in self.tasks})
        self.test_loss = nn.ModuleDict({task: _mean_metric() for task in self.tasks})

    # ---- merging --------------------------------------------------------------------------
    def merge(self) -> dict[str, Tensor]:
        """Return the merged ``GPT2Model`` state dict. Subclasses implement this."""
        raise NotImplementedError(f"{type(self).__name__} must implement merge().")

    def prepare(self, trainer: L.Trainer, datamodule: L.LightningDataModule | None) -> None:
        """Work that needs ``trainer`` before ``trainer.test(self, datamodule)``; nothing by default.

        Data-driven methods (Fisher, RegMean) compute their statistics here with
        ``trainer.predict``, which cannot run inside a running ``trainer.test`` (where ``setup``
        merges). The CLI calls it in ``before_test``; programmatic users call it before ``test``.
        """

    def setup(self, stage: str | None = None) -> None:
        # Lightning calls setup on every process and every entry point: merge only once.
        if self.body is not None:
            return
        self.pool.check()
        self.body = build_body(self.pool.body_config(), self.merge())
        self.heads = nn.ModuleDict({task: self._head(task) for task in self.tasks})
        self.pad_token_ids = {task: self.pool.task_config(task).pad_token_id for task in self.tasks}

    def _head(self, task: str) -> nn.Linear:
        weight = self.pool.head(task)
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        head.weight.data.copy_(weight)
        return head.requires_grad_(False)

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged body's state dict (after ``setup``)."""
        if self.body is None:
            self.setup("test")
        return self.body.state_dict()

    # ---- scoring --------------------------------------------------------------------------
    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Last hidden states of the evaluated body, [batch, length, n_embd]."""
        return self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor, task: str) -> Tensor:
        """Logits of ``task``'s head at each row's last non-pad token, [batch, num_labels]."""
        hidden = self.hidden_states(input_ids, attention_mask)
        last = last_non_pad_index(input_ids, self.pad_token_ids[task])
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.heads[task](pooled)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.tasks[dataloader_idx]
        logits = self(batch["input_ids"], batch["attention_mask"], task).float()
        labels = batch["labels"]
        self.test_accuracy[task].update((logits.argmax(-1) == labels).double())
        self.test_loss[task].update(F.cross_entropy(logits, labels, reduction="none").double())

    def on_test_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and list(getattr(datamodule, "tasks", self.tasks)) != self.tasks:
            raise ValueError(
                f"The data's tasks {datamodule.tasks} differ from the pool's {self.tasks}; "
                f"test loader i must be task i (the CLI links data.tasks to pool.finetuned)."
            )

    def on_test_epoch_end(self) -> None:
        # compute() reduces across processes (torchmetrics), so every rank sees the same numbers.
        per_task = {
            task: {
                "accuracy": self.test_accuracy[task].compute().item(),
                "loss": self.test_loss[task].compute().item(),
            }
            for task in self.tasks
        }
        self.report = make_report(per_task)
        for task, values in self.report.items():
            for name, value in values.items():
                self.log(f"test/{task}/{name}", value, add_dataloader_idx=False, sync_dist=False)
        for metric in (*self.test_accuracy.values(), *self.test_loss.values()):
            metric.reset()
        # trainer.log_dir broadcasts under DDP, so every rank asks; rank 0 alone writes.
        log_dir = self.trainer.log_dir
        self.report_path = os.path.join(log_dir, "report.json") if log_dir else None
        if self.report_path and self.trainer.is_global_zero:
            write_report(self.report, self.report_path)

    # ---- export ---------------------------------------------------------------------------
    def save_merged(self, folder: str | os.PathLike) -> list[Path]:
        """Write ``folder/<task>/``: the merged body + that task's head as a complete
        ``GPT2ForSequenceClassification`` checkpoint (config, tokenizer, safetensors) that
        ``AutoModelForSequenceClassification.from_pretrained`` loads."""
        from transformers import GPT2ForSequenceClassification

        body_state = {k: v.detach().cpu() for k, v in self.merged_state_dict().items()}
        tokenizer = self.pool.load_tokenizer()
        written = []
        for task in self.tasks:
            config = self.pool.task_config(task)
            with torch.device("meta"):
                model = GPT2ForSequenceClassification(config)
            state = {f"transformer.{k}": v.clone() for k, v in body_state.items()}
            state["score.weight"] = self.heads[task].weight.detach().cpu().clone()
            model.load_state_dict(state, strict=True, assign=True)
            out = Path(folder) / task
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            written.append(out)
        return written

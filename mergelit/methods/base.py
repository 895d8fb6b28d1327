"""MergeMethod: the one base class. ``setup`` merges the pool once; ``test_step`` scores it.

A subclass implements ``merge() -> state dict`` of the merged GPT-2 body (or, for a task-aware
method such as EMR, ``merge_task(task)``: the body that task is scored with). Scoring task t
always uses task t's own fine-tuned head on the evaluated body, read out at the last non-pad
token of each row (as ``GPT2ForSequenceClassification`` does).

A method is one file in ``mergelit/methods/``: the class is found there by
``mergelit.methods.method_classes()`` (tests, the demo and ``compare`` use it), and the tables
print its ``display_name`` and the ``symbols`` of its arguments.
"""

from __future__ import annotations

import resource
from pathlib import Path
import time
from typing import Any, ClassVar, Hashable, Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from mergelit.errors import MergeFailed
from mergelit.gpt2 import build_body, build_head, last_non_pad_index
from mergelit.pool import ModelPool
from mergelit.report import EXTRA_ENTRIES, EXTRA_METRICS, Report, extra_entry, make_report


def _mean_metric() -> torchmetrics.MeanMetric:
    return torchmetrics.MeanMetric().set_dtype(torch.float64)


def _extra_metric(name: str) -> torchmetrics.Metric:
    # Confusion counts (summed across processes), so DDP gives the one-process value; class 1 positive.
    if name == "mcc":
        return torchmetrics.classification.BinaryMatthewsCorrCoef()
    return torchmetrics.classification.BinaryF1Score()


def _reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: ``/proc/self/clear_refs`` resets VmHWM); else nothing."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # other systems: the peak stays the process's lifetime peak (ru_maxrss)


def _peak_rss_gb() -> float:
    """The process's peak resident memory since ``_reset_peak_rss`` (Linux: VmHWM), else its lifetime
    peak (``ru_maxrss``: KiB on Linux, bytes on macOS), in GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if peak > 1 << 40 else 1024) / 1e9


def _partial_evaluation(trainer: Any) -> bool:
    if trainer is None:
        return False
    limit = getattr(trainer, "limit_test_batches", 1.0)
    return bool(getattr(trainer, "fast_dev_run", False)) or not (isinstance(limit, float) and limit == 1.0)


def check_merged_finite(state: dict[str, Tensor], name: str) -> None:
    """A merge of finite weights must be finite: refuse to score one that is not, naming the tensor."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MergeFailed(
                f"The merge of {name} produced {int((~torch.isfinite(tensor)).sum())} NaN/inf value(s) in tensor "
                f"{key!r} from finite weights; it is not scored. Check the method's arguments (a degenerate "
                f"normalisation or scaling)."
            )


class MergeMethod(L.LightningModule):
    """Base of every method: merge in ``setup``, score each GLUE task with its own head.

    Args:
        pool: the models to merge (the CLI's ``pool:`` group, linked in).
    """

    display_name: ClassVar[str] = "Merge method"
    """The name tables print (``TIES-Merging``)."""
    symbols: ClassVar[dict[str, str]] = {}
    """Init argument -> the paper's symbol, for table labels (``{"scaling_factor": "λ"}``)."""
    recommended: ClassVar[dict[str, Any]] = {}
    """Init arguments that ``compare`` of every method (and the demo) uses, e.g. the best published λ."""
    kind: ClassVar[Literal["merged", "task-aware", "ensemble"]] = "merged"
    """One merged body; a body per task (needs the task identity at inference); or no merge at all."""
    comparison: ClassVar[bool] = True
    """Whether ``compare`` of every method includes it (``Individual`` is the 7x7 table's instead)."""
    data: str = "none"
    """Which data the method reads beside the weights: ``none``, ``train inputs``, ``validation inputs`` ..."""
    fused_gelu: bool = False
    """Score with torch's fused tanh GELU instead of transformers' Python formula (``--fused_gelu``)."""

    def __init__(self, pool: ModelPool):
        super().__init__()
        self.pool = pool
        self.tasks = list(pool.tasks)
        self.body: nn.Module | None = None
        self.body_task: str | None = None  # task-aware methods: whose body ``self.body`` is
        self.heads = nn.ModuleDict()
        self.pad_token_ids: dict[str, int] = {}
        self.report: Report | None = None
        self.reusable: Any = None
        # Plain (micro) accuracy = mean of per-example correctness, and cross-entropy averaged
        # over examples (not over batch means, which would depend on the batch size). Both are
        # torchmetrics means (synced across processes) in float64, so the report holds the
        # exact fraction correct/total.
        # Extra splits (mnli_mismatched) are entries of their own, scored with their task's head.
        entries = [*self.tasks, *(name for name, (task, _) in EXTRA_ENTRIES.items() if task in self.tasks)]
        self.test_accuracy = nn.ModuleDict({entry: _mean_metric() for entry in entries})
        self.test_loss = nn.ModuleDict({entry: _mean_metric() for entry in entries})
        # Beside accuracy, never instead: CoLA MCC, MRPC/QQP F1 (``report.EXTRA_METRICS``).
        self.test_extra = nn.ModuleDict({t: _extra_metric(m) for t, m in EXTRA_METRICS.items() if t in self.tasks})
        self.test_entries: list[tuple[str, str, str]] = [(t, t, "") for t in self.tasks]  # (entry, task, split) per loader
        # Per-example predictions (``--save_predictions``): gathered from every rank at the epoch's end.
        self.save_predictions = False
        self.predictions: dict[str, list[dict[str, Any]]] | None = None
        self._batches: dict[str, list[tuple[Tensor, ...]]] = {}
        # Costs, for the report's protocol entry (``mergelit.run`` sets prepare_seconds).
        self.merge_seconds: float | None = None
        self.merge_peak_rss_gb: float | None = None
        self.prepare_seconds: float | None = None
        self._merged_tasks: set[str] = set()

    # ---- merging --------------------------------------------------------------------------
    def merge(self) -> dict[str, Tensor]:
        """Return the merged ``GPT2Model`` state dict. Subclasses implement this."""
        raise NotImplementedError(f"{type(self).__name__} must implement merge().")

    def merge_task(self, task: str) -> dict[str, Tensor]:
        """The body ``task`` is scored with: the merged body, or (task-aware methods) the task's own."""
        return self.merge()

    def prepare(self, trainer: L.Trainer, datamodule: L.LightningDataModule | None) -> None:
        """Work that needs ``trainer`` before ``trainer.test(self, datamodule)``; nothing by default.

        Data-driven methods compute statistics here with ``trainer.predict`` (Fisher, RegMean) or
        adapt with ``trainer.fit`` (AdaMerging): neither can run inside a running ``trainer.test``,
        where ``setup`` merges. ``mergelit test`` calls it; programmatic users call it before ``test``.
        """

    # ---- reuse across sweep points --------------------------------------------------------
    def reusable_key(self) -> Hashable | None:
        """What the λ-independent part of this merge depends on besides the pool (None: no such part).

        A sweep hands ``self.reusable`` from one point to the next when the method's class, pool
        and this key are equal, so a λ sweep computes Σ τi (TIES: τm) once. The method computes
        ``self.reusable`` itself in ``merge`` when nobody handed it over.
        """
        return None

    # ---- setup ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        # Lightning calls setup on every process and every entry point: merge only once.
        if self.heads:
            return
        self.pool.check()
        self.heads = nn.ModuleDict({task: build_head(self.pool.head(task)) for task in self.tasks})
        self.pad_token_ids = {task: self.pool.task_config(task).pad_token_id for task in self.tasks}
        if self.kind == "merged":
            _reset_peak_rss()
            start = time.perf_counter()
            merged = self.merge()
            self._add_merge_cost(time.perf_counter() - start)
            check_merged_finite(merged, type(self).__name__)
            self.body = build_body(self.pool.body_config(), merged, fused_gelu=self.fused_gelu)
        # task-aware: each task's body is built when its loader starts (on_test_batch_start),
        # so that only one is in memory at a time.

    def use_task_body(self, task: str) -> None:
        """Task-aware methods: make ``self.body`` the body ``task`` is scored with (built from θ0 each time)."""
        if self.body_task == task:
            return
        self.body = None  # free the previous task's body first
        _reset_peak_rss()
        start = time.perf_counter()
        body_state = self.merge_task(task)
        check_merged_finite(body_state, f"{type(self).__name__} (task {task!r})")
        if task not in self._merged_tasks:  # a task scored again (mnli_mismatched) is not merged twice
            self._merged_tasks.add(task)
            self._add_merge_cost(time.perf_counter() - start)
        self.body = build_body(self.pool.body_config(), body_state, fused_gelu=self.fused_gelu).to(self.device)
        self.body_task = task

    def _add_merge_cost(self, seconds: float) -> None:
        self.merge_seconds = (self.merge_seconds or 0.0) + seconds
        self.merge_peak_rss_gb = _peak_rss_gb()

    def inference_bodies(self) -> float:
        """What the method keeps at inference, in bodies: 1 merged; n for the ensemble (and task-aware
        methods without a count of their own); EMR's ``inference_parameters()`` (body + masks)."""
        if hasattr(self, "inference_parameters"):
            return float(self.inference_parameters())
        return 1.0 if self.kind == "merged" else float(len(self.tasks))

    def protocol(self) -> dict[str, Any]:
        """The report's ``protocol`` entry: what was scored how, and what the method cost."""
        return {
            "method": self.display_name,
            "class_path": f"{type(self).__module__}.{type(self).__name__}",
            "kind": self.kind,
            "data": self.data,
            "bodies_at_inference": self.inference_bodies(),
            # A run with limit_test_batches / fast_dev_run scores only part of each split: the report
            # says so, and tables.check_report (compare, sweep resume) never takes it as complete.
            "partial": _partial_evaluation(self._attached_trainer()),
            "splits": {entry: split for entry, _, split in self.test_entries},
            "metrics": {entry: ["accuracy", "loss", *([EXTRA_METRICS[entry]] if entry in self.test_extra else [])]
                        for entry, _, _ in self.test_entries},
            "costs": {
                "merge_seconds": self.merge_seconds,
                "merge_peak_rss_gb": self.merge_peak_rss_gb,
                "prepare_seconds": self.prepare_seconds,
            },
        }

    def _attached_trainer(self) -> L.Trainer | None:
        try:
            return self.trainer
        except RuntimeError:  # not attached to a Trainer (a programmatic merge)
            return None

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged body's state dict (after ``setup``); one merged model only."""
        if self.kind != "merged":
            raise NotImplementedError(
                f"{type(self).__name__} has no single merged body ({self.kind}); export each task's body instead."
            )
        if self.body is None:
            self.setup("test")
        return self.body.state_dict()

    # ---- scoring --------------------------------------------------------------------------
    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Last hidden states of the evaluated body, [batch, length, n_embd]."""
        return self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor, task: str) -> Tensor:
        """Logits of ``task``'s head at each row's last non-pad token, [batch, num_labels]."""
        if self.kind == "task-aware":
            self.use_task_body(task)
        hidden = self.hidden_states(input_ids, attention_mask)
        last = last_non_pad_index(input_ids, self.pad_token_ids[task])
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.heads[task](pooled)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        entry, task, _ = self.test_entries[dataloader_idx]
        logits = self(batch["input_ids"], batch["attention_mask"], task).float()
        labels = batch["labels"]
        predicted = logits.argmax(-1)
        self.test_accuracy[entry].update((predicted == labels).double())
        losses = F.cross_entropy(logits, labels, reduction="none").double()
        self.test_loss[entry].update(losses)
        if entry in self.test_extra:
            self.test_extra[entry].update(predicted, labels)
        if self.save_predictions:
            idx = batch.get("idx")
            if idx is None:
                raise ValueError("--save_predictions needs each batch's `idx` (GLUEDataModule.collate gives it).")
            self._batches.setdefault(entry, []).append(
                tuple(t.detach().cpu() for t in (idx, labels, predicted, logits, losses))
            )

    def on_test_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        # dataloader_idx -> (report entry, task whose head scores it, split): the 7 tasks, then extras.
        splits = datamodule.test_splits() if hasattr(datamodule, "test_splits") else [(t, "") for t in self.tasks]
        self.test_entries = [
            (task if i < len(self.tasks) else extra_entry(task, split), task, split) for i, (task, split) in enumerate(splits)
        ]
        self._batches = {}
        self.predictions = None
        if datamodule is not None and list(getattr(datamodule, "tasks", self.tasks)) != self.tasks:
            raise ValueError(
                f"The data's tasks {datamodule.tasks} differ from the pool's {self.tasks}; "
                f"test loader i must be task i (the CLI links data.tasks to pool.finetuned)."
            )

    def on_test_epoch_end(self) -> None:
        # compute() reduces across processes (torchmetrics), so every rank sees the same numbers.
        values = {}
        for entry, _, _ in self.test_entries:
            values[entry] = {
                "accuracy": self.test_accuracy[entry].compute().item(),
                "loss": self.test_loss[entry].compute().item(),
            }
            if entry in self.test_extra:
                values[entry][EXTRA_METRICS[entry]] = self.test_extra[entry].compute().item()
        per_task = {task: values[task] for task in self.tasks}
        extra = {entry: v for entry, v in values.items() if entry not in per_task}
        self.report = make_report(per_task, extra, self.protocol())
        for entry, entry_values in self.report.items():
            if entry in values or entry == "average":
                for name, value in entry_values.items():
                    self.log(f"test/{entry}/{name}", value, add_dataloader_idx=False, sync_dist=False)
        if self.save_predictions:
            self.predictions = self._gather_predictions()
        for metric in (*self.test_accuracy.values(), *self.test_loss.values(), *self.test_extra.values()):
            metric.reset()

    def _gather_predictions(self) -> dict[str, list[dict[str, Any]]]:
        """Every rank's per-example rows, on every rank, sorted by ``idx`` (each example once)."""
        local = {entry: [torch.cat(parts) for parts in zip(*batches)] for entry, batches in self._batches.items()}
        self._batches = {}
        gathered = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.trainer.world_size > 1:
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, local)
        predictions = {}
        for entry, _, _ in self.test_entries:
            rows = []
            for part in gathered:
                if entry in part:
                    columns = (t.tolist() for t in part[entry])
                    rows.extend(
                        {"idx": i, "label": y, "prediction": p, "logits": z, "loss": l} for i, y, p, z, l in zip(*columns)
                    )
            predictions[entry] = sorted(rows, key=lambda row: row["idx"])
        return predictions

"""MergeMethod: the one base class. ``setup`` merges the pool; ``test_step`` scores it.

A method says how to merge one tensor, ``merge_tensor(key, theta0, thetas)``, and ``merge`` streams
the pool's keys through it, reading each tensor from the memory-mapped checkpoints when asked for.
Task t is always scored with task t's own fine-tuned head on ``body_for(t)``, at the last non-pad
token of each row. The hooks (``prepare_merge``, ``reusable_key``/``reused``, ``body_for``,
``prepare``, ``WrapperMethod``, the class attributes) are described in docs/adding-a-method.md.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Hashable, Literal, Sequence, TypeVar

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from mergelit import costs, progress
from mergelit.errors import KeyMissing, MergeFailed, MergelitError
from mergelit.gpt2 import build_body, build_head, last_non_pad_index
from mergelit.metrics import EXTRA_METRICS, BinaryCounts
from mergelit.pool import ModelPool

T = TypeVar("T")


def check_merged_finite(state: dict[str, Tensor], name: str) -> None:
    """A merge of finite weights must be finite: refuse to score one that is not, naming the tensor."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MergeFailed(
                f"The merge of {name} produced {int((~torch.isfinite(tensor)).sum())} NaN/inf value(s) in tensor "
                f"{key!r} from finite weights; it is not scored. Check the method's arguments (a degenerate "
                f"normalisation or scaling)."
            )


def _mean_metric() -> torchmetrics.MeanMetric:
    return torchmetrics.MeanMetric().set_dtype(torch.float64)


# The λ range (``search``) of methods that scale a merged task vector.
LAMBDAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


class MergeMethod(L.LightningModule):
    """Base of every method: merge in ``setup``, score each GLUE task with its own head.

    Args:
        pool: the models to merge (the CLI's ``pool:`` group, linked in).
    """

    # What each class attribute means: docs/adding-a-method.md.
    display_name: ClassVar[str] = "Merge method"
    symbols: ClassVar[dict[str, str]] = {}
    recommended: ClassVar[dict[str, Any]] = {}
    search: ClassVar[dict[str, list[Any]]] = {}
    quick: ClassVar[dict[str, Any]] = {}
    kind: ClassVar[Literal["merged", "task-aware", "ensemble"]] = "merged"  # a label: body_for decides what is scored
    exportable: ClassVar[bool] = True
    comparison: ClassVar[bool] = True
    data: str = "none"

    def __init__(self, pool: ModelPool):
        from mergelit.report import EXTRA_ENTRIES

        super().__init__()
        self.pool = pool
        self.tasks = list(pool.tasks)
        self.heads = nn.ModuleDict()
        self.pad_token_ids: dict[str, int] = {}
        self.fused_gelu = False
        self._body: nn.Module | None = None
        self._body_task: str | None = None  # whose body ``_body`` is (``task_body``)
        self.results: dict[str, dict[str, float]] | None = None
        # Accuracy and cross-entropy are means over examples (not over batch means, which depend on
        # the batch size), torchmetrics (synced across processes) in float64: the exact fraction.
        self.test_entries: list[tuple[str, str, str]] = [(t, t, "") for t in self.tasks]  # (entry, task, split) per loader
        extras = (name for name, (task, _) in EXTRA_ENTRIES.items() if task in self.tasks)
        entries = [*self.tasks, *extras]
        self.test_accuracy = nn.ModuleDict({entry: _mean_metric() for entry in entries})
        self.test_loss = nn.ModuleDict({entry: _mean_metric() for entry in entries})
        # Beside accuracy, never instead: CoLA MCC, MRPC/QQP F1, from confusion counts.
        self.test_extra = nn.ModuleDict({t: BinaryCounts() for t in EXTRA_METRICS if t in self.tasks})

    # ---- the per-tensor contract ------------------------------------------------------------
    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        """θ*[key] (θ0's shape and dtype) from θ0[key] and θ1[key] … θn[key], each read when indexed;
        never modify them in place when the method reads them again. Subclasses implement this or ``body_for``."""
        raise NotImplementedError(f"{type(self).__name__} must implement merge_tensor(key, theta0, thetas).")

    def prepare_merge(self) -> None:
        """A pass over the whole pool before the per-key merges (TIES's trim cut, DARE's draws); nothing by default."""

    def merge(self) -> dict[str, Tensor]:
        """The merged ``GPT2Model`` state dict: ``prepare_merge``, then ``merge_tensor`` key by key."""
        self.pool.check()
        self.prepare_merge()
        pool = self.pool
        keys = progress.bar(pool.keys(), f"Merging ({self.display_name})", unit="tensor")
        return {key: self.merge_tensor(key, pool.pretrained_tensor(key), pool.finetuned_tensors(key)) for key in keys}

    def reusable_key(self) -> Hashable | None:
        """What this method's λ-free parts depend on besides the pool (None: none to reuse): a sweep's pool
        keeps the parts computed through ``reused`` across points of equal class and key."""
        return None

    def reused(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` for the λ-free part named ``key``, or the value an earlier sweep point kept."""
        group = self.reusable_key()
        if group is None:
            return compute()
        return self.pool.reused((type(self).__qualname__, group), key, compute)

    def prepare(self, trainer: L.Trainer, datamodule: L.LightningDataModule | None) -> None:
        """Work that needs ``trainer`` before ``trainer.test(self, datamodule)`` (statistics by ``trainer.predict``,
        adaptation by ``trainer.fit``: neither can run inside ``trainer.test``); nothing by default."""

    # ---- bodies -----------------------------------------------------------------------------
    def use_fused_gelu(self, enabled: bool = True) -> None:
        """Score with torch's fused tanh GELU (``--fused_gelu``); set before the body is built."""
        self.fused_gelu = bool(enabled)

    def build_body(self, state: dict[str, Tensor], name: str | None = None) -> nn.Module:
        """A frozen ``GPT2Model`` holding ``state`` (refused, naming the tensor, if it is not finite)."""
        check_merged_finite(state, name or type(self).__name__)
        return build_body(self.pool.body_config(), state, fused_gelu=self.fused_gelu)

    def body_for(self, task: str) -> nn.Module:
        """The body ``task`` is scored with: the merged body (merged once, on first use)."""
        if self._body is None:
            with costs.phase("merge"):
                self._body = self.build_body(self.merge()).to(self.device)
        return self._body

    def task_body(self, task: str, state: Callable[[], dict[str, Tensor]], name: str) -> nn.Module:
        """For a task-aware ``body_for``: the body of ``state()`` (task ``task``'s state dict, built in the merge
        phase), kept until another task's body is asked for (one in memory at a time)."""
        if self._body_task != task:
            self._body, self._body_task = None, None  # let the previous body go before building this one
            with costs.phase("merge"):
                self._body = self.build_body(state(), name).to(self.device)
                self._body_task = task
        return self._body

    def bodies_at_inference(self) -> float:
        """What the method keeps at inference, in fp32 bodies (1 for a merged body)."""
        return 1.0

    # ---- setup ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        # Lightning calls setup on every process and every entry point: merge only once.
        if self.heads:
            return
        self.pool.check()
        self.heads = nn.ModuleDict({task: build_head(self.pool.head(task)) for task in self.tasks})
        self.pad_token_ids = {task: self.pool.task_config(task).pad_token_id for task in self.tasks}
        self.body_for(self.tasks[0])  # the merge (task-aware methods: their shared part and the first task's body)

    # ---- scoring ----------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor, task: str) -> Tensor:
        """Logits of ``task``'s head at each row's last non-pad token, [batch, num_labels]."""
        hidden = self.body_for(task)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = last_non_pad_index(input_ids, self.pad_token_ids[task])
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.heads[task](pooled)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        entry, task, _ = self.test_entries[dataloader_idx]
        logits = self(batch["input_ids"], batch["attention_mask"], task).float()
        labels = batch["labels"]
        predicted = logits.argmax(-1)
        correct = (predicted == labels).double()
        losses = F.cross_entropy(logits, labels, reduction="none").double()
        self.test_accuracy[entry].update(correct)
        self.test_loss[entry].update(losses)
        if entry in self.test_extra:
            self.test_extra[entry].update(predicted, labels)
        # Per-example rows for the report callback (intervals, --save_predictions).
        return {"entry": entry, "idx": batch.get("idx"), "label": labels, "prediction": predicted, "logits": logits, "loss": losses}

    def on_test_start(self) -> None:
        from mergelit.report import extra_entry

        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and list(getattr(datamodule, "tasks", self.tasks)) != self.tasks:
            raise ValueError(
                f"The data's tasks {datamodule.tasks} differ from the pool's {self.tasks}; "
                f"test loader i must be task i (the CLI links data.tasks to pool.finetuned)."
            )
        # dataloader_idx -> (report entry, task whose head scores it, split): the tasks, then extras.
        splits = datamodule.test_splits() if hasattr(datamodule, "test_splits") else [(t, "") for t in self.tasks]
        self.test_entries = [
            (task if i < len(self.tasks) else extra_entry(task, split), task, split) for i, (task, split) in enumerate(splits)
        ]
        self.results = None

    def on_test_epoch_end(self) -> None:
        # compute() reduces across processes (torchmetrics), so every rank sees the same numbers.
        results = {}
        for entry, _, _ in self.test_entries:
            results[entry] = {
                "accuracy": self.test_accuracy[entry].compute().item(),
                "loss": self.test_loss[entry].compute().item(),
            }
            if entry in self.test_extra:
                results[entry][EXTRA_METRICS[entry]] = self.test_extra[entry].compute_metric(EXTRA_METRICS[entry])
        self.results = results
        average = {name: sum(results[t][name] for t in self.tasks) / len(self.tasks) for name in ("accuracy", "loss")}
        for entry, values in {**results, "average": average}.items():
            for name, value in values.items():
                self.log(f"test/{entry}/{name}", value, add_dataloader_idx=False, sync_dist=False)
        for metric in (*self.test_accuracy.values(), *self.test_loss.values(), *self.test_extra.values()):
            metric.reset()


# ---- methods named in a config (a wrapper's ``base:``) ------------------------------------------
def method_classes() -> list[type[MergeMethod]]:
    """Each ``MergeMethod`` subclass defined in a module of ``mergelit.methods``, by module name, then
    definition order."""
    import importlib
    import pkgutil
    from pathlib import Path

    package = __name__.rsplit(".", 1)[0]
    classes: list[type[MergeMethod]] = []
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for value in vars(module).values():
            defined_here = isinstance(value, type) and value.__module__ == module.__name__  # base is skipped
            if defined_here and issubclass(value, MergeMethod) and value not in classes:
                classes.append(value)
    return classes


def method_class(class_path: str) -> type[MergeMethod]:
    """The method class a config names (``mergelit.methods.TiesMerging``, its module path, or ``TiesMerging``),
    looked up among mergelit's methods: nothing is imported from the path."""
    for cls in method_classes():
        if class_path in (cls.__name__, f"mergelit.methods.{cls.__name__}", f"{cls.__module__}.{cls.__name__}"):
            return cls
    names = ", ".join(sorted(cls.__name__ for cls in method_classes()))
    raise KeyMissing(f"{class_path!r} is not a mergelit method; the methods are {names}.")


def wrapped_method(pool: ModelPool, base: Any, wrapper: str) -> MergeMethod:
    """The method ``wrapper`` wraps, built on ``pool`` from ``base``: a config ``{class_path, init_args}`` or (as
    the CLI parses it) a callable pool -> method. Refuses a method with no one merged body per key."""
    from collections.abc import Mapping

    if isinstance(base, Mapping):
        unknown = sorted(set(base) - {"class_path", "init_args"})
        if unknown or "class_path" not in base:
            raise MergelitError(f"{wrapper}: base must be a method config {{class_path: ..., init_args: {{...}}}}, got {dict(base)!r}.")
        try:
            cls = method_class(base["class_path"])
        except KeyMissing as error:
            raise MergelitError(f"{wrapper}: base class_path {error}") from None
        init_args = dict(base.get("init_args") or {})
        if "pool" in init_args:
            raise MergelitError(f"{wrapper}: the base's pool is the wrapper's; remove base.init_args.pool.")
        try:
            method = cls(pool, **init_args)
        except TypeError as error:
            raise MergelitError(f"{wrapper}: base {cls.__name__} does not take init_args {init_args!r} ({error}).") from None
    elif callable(base) and not isinstance(base, MergeMethod):
        method = base(pool)
    else:
        raise MergelitError(f"{wrapper}: base must be a method config {{class_path: ..., init_args: {{...}}}}, got {base!r}.")
    cls = type(method)
    if not cls.exportable or cls.merge_tensor is MergeMethod.merge_tensor:
        reason = "it merges no weights" if not cls.exportable else "it has one body per task"
        raise MergelitError(f"{wrapper} cannot wrap {cls.display_name}: {reason}; give a method that merges one body.")
    if cls.__name__ in ("Pretrained", "Individual"):
        raise MergelitError(f"{wrapper} cannot wrap {cls.display_name}: it merges no task vectors; give a merge method.")
    return method


class WrapperMethod(MergeMethod):
    """A method that changes another's merge, given as ``base:`` (SVC, Subspace Boosting): the base's
    ``prepare`` and ``prepare_merge`` run its; a subclass calls ``save_hyperparameters(ignore=["pool", "base"])``
    and then ``self.hparams["base"] = method_config(self.base)``."""

    def __init__(self, pool: ModelPool, base: Any, wrapper: str):
        super().__init__(pool)
        self.base = wrapped_method(pool, base, wrapper)
        self.data = self.base.data  # what the base reads (statistics, adaptation)

    def prepare(self, trainer: L.Trainer, datamodule: L.LightningDataModule | None) -> None:
        self.base.prepare(trainer, datamodule)

    def prepare_merge(self) -> None:
        self.base.prepare_merge()


def method_config(method: MergeMethod) -> dict[str, Any]:
    """``{class_path, init_args}`` of a built method, all its arguments spelled out (for the report)."""
    return {"class_path": f"mergelit.methods.{type(method).__name__}", "init_args": dict(method.hparams)}

"""ModelPool: the pretrained GPT-2 and one fine-tuned GPT-2 classifier per GLUE task.

Names map to paths (hub ids or local folders, both through ``from_pretrained``). Nothing
is loaded until asked for, so parsing a config or ``--help`` never touches weights. Bodies
are ``GPT2Model`` state dicts; heads are the ``score`` weights of each
``GPT2ForSequenceClassification``. Weights come from safetensors only; no remote code.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from mergelit import costs

from mergelit.errors import BadCheckpoint, DuplicateName, FileMissing, KeyMissing
from mergelit.glue import load_tokenizer
from mergelit.state_dict import tensors_fingerprint
from mergelit.tasks import GLUE_TASKS, PAD_TOKEN_ID, ordered_tasks


def tokenizer_path(pretrained: str, tokenizer: Optional[str] = None) -> str:
    """The tokenizer a pool (or a fine-tuning run) uses: ``tokenizer`` if given, else ``pretrained``'s."""
    return tokenizer or pretrained


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


def _looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a folder rather than a hub id (``owner/name`` or ``name``)."""
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path:
        return True
    first = path.split("/", 1)[0]
    return "/" in path and os.path.isdir(first)


def check_checkpoint_folder(path: str, name: str = "checkpoint") -> None:
    """Fail, naming ``name`` (``fine-tuned model 'sst2'``) and ``path``, unless ``path`` is a usable checkpoint.

    A missing local folder (absolute or relative) is named as such, not reported as a network
    error; a hub id while ``HF_HUB_OFFLINE=1`` is only accepted if the hub cache has it (checked by
    the loader). Pickle-only folders (``pytorch_model.bin``, ``*.pt``) are refused: mergelit never
    unpickles. Every ``*.safetensors`` header is read (a truncated or corrupt file fails here).
    """
    expanded = os.path.expanduser(path)
    if os.path.isfile(expanded):
        raise FileMissing(f"The {name} path {path!r} is a file; give the checkpoint's folder (config.json + *.safetensors).")
    if not os.path.isdir(expanded):
        if _looks_local(path):
            raise FileMissing(f"The {name} folder {path!r} does not exist (relative paths are read from {os.getcwd()}).")
        return  # a hub id: the loader reports it (see _from_pretrained)
    safetensors_files = sorted(glob.glob(os.path.join(expanded, "*.safetensors")))
    if not safetensors_files:
        pickles = sorted(os.path.basename(f) for f in glob.glob(os.path.join(expanded, "*.bin")) + glob.glob(os.path.join(expanded, "*.pt")) + glob.glob(os.path.join(expanded, "*.pth")))
        found = f" (it has only pickle weights: {', '.join(pickles)}, which mergelit never unpickles)" if pickles else ""
        raise FileMissing(
            f"The {name} folder {path!r} has no *.safetensors file{found}; mergelit loads safetensors only. "
            f"Convert it once where you trust the file: `AutoModelForSequenceClassification.from_pretrained(folder)"
            f".save_pretrained(folder, safe_serialization=True)`."
        )
    # A sharded checkpoint spreads the body over several files: look for it in all of them together.
    keys = [key for file in safetensors_files for key in _check_safetensors(file, name)]
    if not any(key.endswith("h.0.attn.c_attn.weight") for key in keys):
        shown = safetensors_files[0] if len(safetensors_files) == 1 else path
        raise BadCheckpoint(
            f"The {name} file {shown!r} holds no GPT-2 body (no 'h.0.attn.c_attn.weight' among its "
            f"{len(keys)} tensors, e.g. {', '.join(keys[:3]) or 'none'}); point at a GPT-2 checkpoint."
        )


def _check_safetensors(file: str, name: str) -> list[str]:
    """The tensor names of a safetensors file, after reading its header (a damaged file fails, named)."""
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as handle:
            keys = list(handle.keys())
            dtypes = {handle.get_slice(key).get_dtype() for key in keys}
    except Exception as error:  # SafetensorError (truncated, corrupt header) has no narrower base
        raise BadCheckpoint(
            f"The {name} file {file!r} is not a readable safetensors file ({error}); re-download or re-export it."
        ) from None
    low = sorted(d for d in dtypes if d in ("F16", "BF16"))
    if low and file not in _CAST_WARNED:
        _CAST_WARNED.add(file)
        warnings.warn(f"The {name} in {file!r} is stored in {'/'.join(low)}; mergelit casts it to float32.", stacklevel=3)
    return keys


_CAST_WARNED: set[str] = set()


def _from_pretrained(cls, path: str, name: str):
    """``cls.from_pretrained(path)`` in fp32 from safetensors, with short errors naming ``name`` and ``path``."""
    try:
        if not hasattr(cls, "base_model_prefix"):  # a config class (AutoConfig): no weights
            return cls.from_pretrained(path)
        model, info = cls.from_pretrained(path, use_safetensors=True, dtype=torch.float32, output_loading_info=True)
    except OSError as error:
        if os.path.isdir(os.path.expanduser(path)):
            raise BadCheckpoint(f"The {name} in {path!r} cannot be loaded: {error}") from None
        raise unreachable(name, path, error) from None
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing:
        raise BadCheckpoint(
            f"The {name} in {path!r} lacks {len(missing)} tensor(s) of a {cls.__name__} (e.g. {missing[0]!r}); "
            f"they would be random. Point at a complete checkpoint."
        )
    return model


def _check_label_names(task: str, path: str, labels: list) -> None:
    """A head named with another task's labels (two checkpoints swapped) is refused; generic
    ``LABEL_i`` names pass; other names that differ from the task table's only warn."""
    if not all(isinstance(label, str) for label in labels) or all(label.upper().startswith("LABEL_") for label in labels):
        return
    names = tuple(label.lower() for label in labels)
    expected = GLUE_TASKS[task].label_names
    if names == expected:
        return
    others = [other for other, info in GLUE_TASKS.items() if info.label_names == names]
    if others:
        raise BadCheckpoint(
            f"The {task!r} head in {path!r} has the label names of {'/'.join(others)} ({list(labels)}), not {task}'s "
            f"{list(expected)}: are two tasks' checkpoints swapped? Point `pool.finetuned.{task}` at a {task} classifier."
        )
    warnings.warn(f"The {task!r} head in {path!r} names its labels {list(labels)}; GLUE {task} calls them {list(expected)}.", stacklevel=3)


def check_finite(state: dict[str, Tensor], name: str) -> None:
    """Refuse a state dict holding NaN or inf, naming ``name`` and the first such tensor."""
    for key, tensor in state.items():
        # A sum is finite only if every entry is (NaN and inf propagate): one reduction, ~30x faster
        # than isfinite().all() on the CPU; only a sum that overflowed needs the element-wise test.
        if tensor.is_floating_point() and not (
            bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())
        ):
            bad = int((~torch.isfinite(tensor)).sum())
            raise BadCheckpoint(f"The {name} has {bad} NaN/inf value(s) in tensor {key!r}; mergelit refuses non-finite weights.")


class ModelPool:
    """The models to merge, read one tensor at a time.

    Args:
        pretrained: the pretrained GPT-2 (θ0): hub id (``gpt2``) or folder. A
            ``GPT2LMHeadModel`` or a bare ``GPT2Model`` checkpoint.
        finetuned: task -> hub id or folder of a ``GPT2ForSequenceClassification``
            fine-tuned on that task (``tanganke/gpt2_cola``, ...).
        tokenizer: tokenizer path or hub id; defaults to ``pretrained``.

    Every model is read from its safetensors file(s), memory-mapped, one tensor at a time
    (``pretrained_tensor``, ``finetuned_tensor``, ``finetuned_tensors``): a hub id is first
    resolved to its downloaded folder, so local folders and hub ids take the same path. Nothing
    is held but the heads and configs, so a merge that streams keys keeps its memory flat in the
    number of models. Reading is the ``load`` phase of ``mergelit.costs``.
    """

    def __init__(self, pretrained: str, finetuned: dict[str, str], tokenizer: str | None = None):
        self.tasks = ordered_tasks(list(finetuned))
        self.pretrained_path = pretrained
        self.finetuned_paths = {task: finetuned[task] for task in self.tasks}
        self.tokenizer_path = tokenizer_path(pretrained, tokenizer)
        self._config = None
        self._heads: dict[str, tuple[Tensor, Any]] = {}  # task -> (head, config), checked
        self._checkpoints: dict[str, _Checkpoint] = {}  # path -> its safetensors files
        self._body_shapes: dict[str, torch.Size] | None = None
        self._finite_checked: set[tuple] = set()
        self._fingerprints: dict[str, str] = {}
        self._keep_reused = False
        self._weights_checked = False
        self._reused: dict[Any, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"ModelPool(pretrained={self.pretrained_path!r}, tasks={self.tasks})"

    # ---- checkpoints ------------------------------------------------------------------------
    def _checkpoint(self, path: str, name: str) -> _Checkpoint:
        """The checkpoint at ``path`` (a folder, or a hub id resolved to its downloaded folder), checked once."""
        if path not in self._checkpoints:
            folder = _resolve(path, name)
            check_checkpoint_folder(folder, name)
            self._checkpoints[path] = _Checkpoint(folder)
        return self._checkpoints[path]

    def _pretrained_checkpoint(self) -> _Checkpoint:
        return self._checkpoint(self.pretrained_path, _PRETRAINED)

    def _finetuned_checkpoint(self, task: str) -> _Checkpoint:
        self._check_task(task)
        return self._checkpoint(self.finetuned_paths[task], f"fine-tuned model for {task!r} (pool.finetuned.{task})")

    def body_config(self):
        """The pretrained GPT-2 config with the spec's pad token (used to build bodies), checked
        against the pretrained checkpoint's own tensors."""
        if self._config is None:
            from transformers import AutoConfig

            checkpoint = self._pretrained_checkpoint()  # named errors first
            config = _from_pretrained(AutoConfig, checkpoint.folder, _PRETRAINED)
            if config.model_type != "gpt2":
                raise BadCheckpoint(f"{self.pretrained_path!r} is a {config.model_type!r} model; mergelit merges GPT-2.")
            if config.pad_token_id is None:
                config.pad_token_id = PAD_TOKEN_ID
            self._config = config
            prefix = _BODY_PREFIX if checkpoint.has(_BODY_PREFIX + "wte.weight") else ""
            try:
                _check_tensor_names(checkpoint, self.body_shapes(), prefix, _PRETRAINED_EXTRA, _PRETRAINED, self.pretrained_path)
            except BadCheckpoint:
                self._config = None
                raise
        return self._config

    def body_shapes(self) -> dict[str, torch.Size]:
        """Body key -> shape, in ``GPT2Model.state_dict()`` order (from the config: nothing loaded)."""
        if self._body_shapes is None:
            from transformers import GPT2Model

            with torch.device("meta"):
                model = GPT2Model(self.body_config())
            self._body_shapes = {key: value.shape for key, value in model.state_dict().items()}
        return self._body_shapes

    def keys(self) -> list[str]:
        """The body's tensor names (``wte.weight``, ``h.0.attn.c_attn.weight``, ...), in state-dict order."""
        return list(self.body_shapes())

    # ---- heads and checks -------------------------------------------------------------------
    def _check_task(self, task: str) -> None:
        if task not in self.finetuned_paths:
            raise KeyMissing(f"Task {task!r} is not in the pool; its tasks are {', '.join(self.tasks)}.")

    def _head_and_config(self, task: str) -> tuple[Tensor, Any]:
        """``task``'s head and config, with its labels and body shapes checked (from the headers)."""
        if task not in self._heads:
            from transformers import AutoConfig

            checkpoint = self._finetuned_checkpoint(task)
            path = self.finetuned_paths[task]
            config = _from_pretrained(AutoConfig, checkpoint.folder, f"fine-tuned model for {task!r} (pool.finetuned.{task})")
            if not checkpoint.has("score.weight"):
                raise BadCheckpoint(
                    f"The fine-tuned model for {task!r} in {path!r} has no classification head ('score.weight'); "
                    f"point `pool.finetuned.{task}` at a GPT2ForSequenceClassification checkpoint."
                )
            head = checkpoint.tensor("score.weight")
            expected = GLUE_TASKS[task].num_labels
            if config.num_labels != expected or head.shape[0] != expected:
                raise BadCheckpoint(
                    f"The {task!r} head in {path!r} has {head.shape[0]} labels; "
                    f"GLUE {task} has {expected}. Point `pool.finetuned.{task}` at a {task} classifier."
                )
            labels = [config.id2label.get(i, config.id2label.get(str(i))) for i in range(expected)]
            _check_label_names(task, path, labels)
            check_finite({"score.weight": head}, f"fine-tuned model for {task!r} ({path})")
            name = f"fine-tuned model for {task!r} (pool.finetuned.{task})"
            _check_architecture(self.body_config(), config, name, path)
            _check_tensor_names(checkpoint, self.body_shapes(), _BODY_PREFIX, _FINETUNED_EXTRA, name, path)
            if config.pad_token_id is None:
                config.pad_token_id = PAD_TOKEN_ID
            self._heads[task] = (head, config)
        return self._heads[task]

    def head(self, task: str) -> Tensor:
        """``task``'s classification head weight, shape [num_labels, n_embd] (no bias)."""
        return self._head_and_config(task)[0]

    def task_config(self, task: str):
        """The config of ``task``'s fine-tuned classifier (labels, pad token id)."""
        return self._head_and_config(task)[1]

    def check(self) -> None:
        """Check every model's labels and shapes from the checkpoint headers (raises on the first problem)."""
        self._pretrained_checkpoint()
        for task in self.tasks:
            self._head_and_config(task)

    def check_weights(self) -> None:
        """Read every weight of the pool once, tensor by tensor, so that a NaN/inf anywhere fails now
        (naming the model and tensor), not after statistics or in a report of NaN losses. Once per pool."""
        if self._weights_checked:
            return
        for key in self.keys():
            self.pretrained_tensor(key)
            for task in self.tasks:
                self.finetuned_tensor(task, key)
        self._weights_checked = True

    # ---- tensor by tensor -----------------------------------------------------------------
    def _check_key(self, key: str) -> None:
        if key not in self.body_shapes():
            raise KeyMissing(f"{key!r} is not a GPT2Model body tensor; the body's tensors are pool.keys().")

    def _finite(self, tensor: Tensor, key: str, name: str, path: str) -> Tensor:
        # Each tensor is checked for NaN/inf on its first read only.
        if (path, key) not in self._finite_checked:
            check_finite({key: tensor}, f"{name} {path!r}")
            self._finite_checked.add((path, key))
        return tensor

    def pretrained_tensor(self, key: str) -> Tensor:
        """θ0[key], read alone from the memory-mapped safetensors (fp32, a new tensor each call)."""
        self._check_key(key)
        checkpoint = self._pretrained_checkpoint()
        # A GPT2LMHeadModel checkpoint stores `transformer.<key>`; a bare GPT2Model stores `<key>`.
        name = _BODY_PREFIX + key if checkpoint.has(_BODY_PREFIX + key) else key
        if not checkpoint.has(name):
            raise BadCheckpoint(f"The pretrained checkpoint {self.pretrained_path!r} has no tensor {key!r}.")
        return self._finite(checkpoint.tensor(name), key, _PRETRAINED, self.pretrained_path)

    def finetuned_tensor(self, task: str, key: str) -> Tensor:
        """θ_task[key], read alone from the memory-mapped safetensors (fp32, a new tensor each call)."""
        self._check_key(key)
        self._head_and_config(task)  # labels and shapes checked once
        path = self.finetuned_paths[task]
        tensor = self._finetuned_checkpoint(task).tensor(_BODY_PREFIX + key)
        return self._finite(tensor, key, f"fine-tuned model for {task!r}", path)

    def finetuned_tensors(self, key: str) -> "TaskTensors":
        """θi[key] for every task, in task order, each read when indexed (``TaskTensors``)."""
        self._check_key(key)
        return TaskTensors(self, key)

    def pretrained_body(self) -> dict[str, Tensor]:
        """θ0 as a whole state dict (read now, not kept): for callers that need every tensor at once."""
        return {key: self.pretrained_tensor(key) for key in self.keys()}

    def finetuned_body(self, task: str) -> dict[str, Tensor]:
        """θ_task as a whole state dict (read now, not kept)."""
        return {key: self.finetuned_tensor(task, key) for key in self.keys()}

    def finetuned_bodies(self) -> dict[str, dict[str, Tensor]]:
        """Every fine-tuned body, in task order (n whole bodies: for oracles and small pools)."""
        return {task: self.finetuned_body(task) for task in self.tasks}

    # ---- parts a sweep reuses ---------------------------------------------------------------
    def keep_reused(self, keep: bool = True) -> None:
        """Keep what methods compute through ``reused`` across merges of this pool (a sweep's points)."""
        self._keep_reused = keep
        if not keep:
            self._reused.clear()

    def reused(self, group: Any, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, or the value kept for ``(group, key)`` by an earlier merge of this pool.

        Only while ``keep_reused`` is on (a sweep): a plain run keeps nothing. Two groups are kept,
        the most recently used (a wrapper's parts and its base method's), so a sweep over several
        methods holds one method's parts, not all of them.
        """
        if not self._keep_reused:
            return compute()
        if group not in self._reused:
            self._reused[group] = {}
            while len(self._reused) > 2:
                del self._reused[next(iter(self._reused))]  # the least recently used group
        parts = self._reused.pop(group)
        self._reused[group] = parts  # now the most recent
        if key not in parts:
            parts[key] = compute()
        return parts[key]

    # ---- content ------------------------------------------------------------------------------
    def load_tokenizer(self):
        return load_tokenizer(self.tokenizer_path)

    def fingerprint(self, task: str) -> str:
        """A hash of ``task``'s fine-tuned weights (body and head) and its read-out pad id.

        The content, not the path: copying the same weights elsewhere gives the same hash, and
        replacing a checkpoint at the same path changes it. Computed once per task, tensor by tensor.
        """
        if task not in self._fingerprints:
            import hashlib

            digest = hashlib.sha256()
            for key in self.keys():
                tensors_fingerprint({key: self.finetuned_tensor(task, key)}, digest)
            digest = tensors_fingerprint({"score.weight": self.head(task)}, digest)
            self._fingerprints[task] = f"{digest}|pad={self.task_config(task).pad_token_id}"
        return self._fingerprints[task]

    def pretrained_fingerprint(self) -> str:
        """A hash of θ0's weights (tensor by tensor), computed once."""
        if "<pretrained>" not in self._fingerprints:
            import hashlib

            digest = hashlib.sha256()
            for key in self.keys():
                tensors_fingerprint({key: self.pretrained_tensor(key)}, digest)
            self._fingerprints["<pretrained>"] = digest.hexdigest()
        return self._fingerprints["<pretrained>"]


class TaskTensors(Sequence):
    """θ1[key] … θn[key] of a pool, in task order, each read from its checkpoint when indexed.

    What ``MergeMethod.merge_tensor`` receives: iterating reads one fine-tuned tensor at a time, so
    a method that needs one pass holds one θi, and a second pass reads them again (the same bits).
    ``tasks`` names them.
    """

    def __init__(self, pool: ModelPool, key: str):
        self.pool, self.key, self.tasks = pool, key, list(pool.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> Tensor:
        if isinstance(index, slice):
            raise TypeError("TaskTensors are read one at a time (a slice would hold them all).")
        return self.pool.finetuned_tensor(self.tasks[index], self.key)


_PRETRAINED = "pretrained model (pool.pretrained)"
_BODY_PREFIX = "transformer."  # GPT2ForSequenceClassification / GPT2LMHeadModel keys of the body


def _resolve(path: str, name: str) -> str:
    """A local checkpoint folder for ``path``: the folder itself, or a hub id's downloaded snapshot
    (config, safetensors and tokenizer files only; from the local cache when offline)."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded) or os.path.isfile(expanded) or _looks_local(path):
        return expanded
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as error:  # huggingface_hub's errors (offline, not found, network) share no narrower base
        raise unreachable(name, path, error) from None


def unreachable(name: str, path: str, error: Exception) -> FileMissing:
    """The error for a model that is neither a local folder nor on the hub (offline or not found)."""
    if _hub_offline():
        return FileMissing(
            f"The {name} {path!r} is not a local folder, and the hub is offline (HF_HUB_OFFLINE=1) with no cached "
            f"copy; download it first, or point at a local folder."
        )
    return FileMissing(f"The {name} {path!r} is neither a local folder nor a reachable hub model ({str(error).splitlines()[0]}).")


ARCHITECTURE_FIELDS = (
    "model_type", "n_layer", "n_embd", "n_head", "n_inner", "n_positions", "vocab_size", "activation_function",
    "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
    "add_cross_attention", "is_encoder_decoder",
)
"""Every ``GPT2Config`` field that changes what a body computes: a fine-tuned model must agree with
the pretrained one on all of them (labels, ids, dropout and the LM/summary heads may differ)."""

# Tensors a checkpoint may hold beside the body: GPT-2's old causal-mask buffers, the LM head, the classifier.
_BUFFERS = (".attn.bias", ".attn.masked_bias")
_PRETRAINED_EXTRA = ("lm_head.weight",)
_FINETUNED_EXTRA = ("score.weight",)


def _architecture_value(config, field: str):
    # GPT-2's n_inner None means 4 * n_embd: the same MLP as an explicit 4 * n_embd.
    value = getattr(config, field, None)
    if field == "n_inner" and value is None and isinstance(getattr(config, "n_embd", None), int):
        return 4 * config.n_embd
    return value


def _check_architecture(reference, config, name: str, path: str) -> None:
    """Refuse ``config`` if it differs from the pretrained ``reference`` in any architecture field."""
    for field in ARCHITECTURE_FIELDS:
        mine, theirs = _architecture_value(config, field), _architecture_value(reference, field)
        if mine != theirs:
            raise BadCheckpoint(
                f"The {name} in {path!r} is another architecture than the pretrained model: its config has "
                f"{field} {mine!r}, the pretrained model's {theirs!r}. Every model of a pool must share one architecture."
            )


def _check_tensor_names(checkpoint: "_Checkpoint", shapes: dict[str, torch.Size], prefix: str, extra: tuple[str, ...], name: str, path: str) -> None:
    """The checkpoint holds exactly the body ``shapes`` (under ``prefix``) plus the allowed ``extra``
    tensors and old attention-mask buffers: a tensor missing, of another shape, or unexpected is refused."""
    for key, shape in shapes.items():
        if not checkpoint.has(prefix + key):
            raise BadCheckpoint(
                f"The {name} in {path!r} has no tensor {prefix + key!r}, which a GPT-2 body of its config has; "
                f"every model of a pool must share one architecture."
            )
        if checkpoint.shape(prefix + key) != shape:
            raise BadCheckpoint(
                f"Tensor {key!r} of the {name} in {path!r} has shape {tuple(checkpoint.shape(prefix + key))}, expected "
                f"{tuple(shape)} (from the pretrained model's config); every model of a pool must share one architecture."
            )
    expected = {prefix + key for key in shapes} | set(extra)
    for tensor_name in checkpoint.names():
        if tensor_name not in expected and not tensor_name.endswith(_BUFFERS):
            raise BadCheckpoint(
                f"The {name} in {path!r} holds a tensor {tensor_name!r} that a GPT-2 body of the pretrained model's "
                f"config does not have; it would be silently ignored. Every model of a pool must share one architecture."
            )


def _sharded_files(folder: str, index: str) -> dict[str, str]:
    """Tensor name -> shard file, from a sharded checkpoint's ``model.safetensors.index.json``: a
    ``weight_map`` mapping each name to a ``*.safetensors`` file of the folder; anything else (not
    JSON, no ``weight_map``, a shard missing or outside the folder) is refused naming the index."""
    import json

    try:
        with open(index) as file:
            weight_map = json.load(file)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise TypeError("its weight_map is not a mapping of tensor names to shard files")
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = f"no {error.args[0]!r} entry" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
        raise BadCheckpoint(
            f"The sharded checkpoint index {index!r} is damaged ({problem}); it must map every tensor to its shard "
            f"(weight_map). Re-download or re-export the checkpoint."
        ) from None
    root = os.path.realpath(folder)
    files = {}
    for name, shard in weight_map.items():
        path = os.path.join(folder, shard)
        if os.path.commonpath([root, os.path.realpath(path)]) != root or not shard.endswith(".safetensors"):
            raise BadCheckpoint(f"The sharded checkpoint index {index!r} maps {name!r} to {shard!r}, which is not a "
                                f"safetensors file of the checkpoint's folder.")
        if not os.path.isfile(path):
            raise BadCheckpoint(f"The sharded checkpoint index {index!r} maps {name!r} to the shard {shard!r}, which is "
                                f"missing from {folder!r}; re-download the checkpoint.")
        files[name] = path
    return files


class _Checkpoint:
    """The safetensors file(s) of one checkpoint folder, read one tensor at a time.

    A sharded checkpoint (``model.safetensors.index.json``) maps each name to its shard. Each read
    opens the file memory-mapped, copies the one tensor out and closes it, so no mapping (and no
    page of the file) stays resident: reading a whole body tensor by tensor holds one tensor.
    """

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            files = _sharded_files(folder, index)
        else:
            single = os.path.join(folder, "model.safetensors")
            paths = [single] if os.path.exists(single) else sorted(glob.glob(os.path.join(folder, "*.safetensors")))
            files = {}
            for path in paths:
                with safe_open(path, framework="pt") as handle:
                    files.update({name: path for name in handle.keys()})
        self.files = files
        self._shapes: dict[str, torch.Size] = {}
        for path in sorted(set(files.values())):
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    self._shapes[name] = torch.Size(handle.get_slice(name).get_shape())

    def has(self, name: str) -> bool:
        return name in self._shapes

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> torch.Size:
        return self._shapes[name]

    def tensor(self, name: str) -> Tensor:
        from safetensors import safe_open

        with costs.timed("load"), safe_open(self.files[name], framework="pt") as handle:
            tensor = handle.get_tensor(name)
            # get_tensor's tensor may still point into the file's memory map: copy it out, so that
            # nothing keeps the mapping (a file replaced during a run cannot fault a merge).
            # from_pretrained(dtype=float32) casts stored fp16/bf16 to fp32 the same way.
            return tensor.to(torch.float32) if tensor.dtype != torch.float32 else tensor.clone()


# ---- FusionBench's pool files --------------------------------------------------------------
FUSIONBENCH_PRETRAINED = "_pretrained_"
"""FusionBench's model name of the pretrained model in a pool file."""


def is_fusionbench_pool(config: Any) -> bool:
    """Whether ``config`` is a FusionBench model pool (``models:`` list or mapping) rather than
    mergelit's ``{pretrained, finetuned, tokenizer}``."""
    return isinstance(config, dict) and "models" in config and "pretrained" not in config and "finetuned" not in config


def _model_path(name: str, spec: Any) -> str:
    # FusionBench writes a model as a bare path, {name, path}, or {_target_, pretrained_model_name_or_path}.
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict):
        for key in ("path", "pretrained_model_name_or_path"):
            if isinstance(spec.get(key), str):
                return spec[key]
    raise ValueError(f"FusionBench pool model {name!r}: {spec!r} gives no path (expected `path:` or a string).")


def fusionbench_pool_args(config: dict[str, Any]) -> dict[str, Any]:
    """``ModelPool`` arguments from a FusionBench pool file's content::

        type: HF_GPT2ForSequenceClassification        # or _target_: ...; not needed by mergelit
        models:
          - {name: _pretrained_, path: gpt2}
          - {name: cola, path: tanganke/gpt2_cola}   # ... one per task

    (or ``models: {_pretrained_: gpt2, cola: tanganke/gpt2_cola, ...}``). Paths are kept as written,
    as FusionBench passes them to ``from_pretrained``: hub ids as they are, relative folders from the
    current directory. A ``tokenizer:`` (a path, or a mapping with one) is kept; other keys are
    FusionBench's own (``_target_``, ``_recursive_``, ``type``, dataset settings) and ignored.
    """
    models = config.get("models")
    if isinstance(models, dict):
        entries = list(models.items())
    elif isinstance(models, list):
        entries = []
        for model in models:
            if not isinstance(model, dict) or "name" not in model:
                raise ValueError(f"FusionBench pool `models:` entry {model!r} has no `name:`.")
            entries.append((model["name"], model))
    else:
        raise ValueError(f"A FusionBench pool's `models:` is a list of {{name, path}} or a mapping, not {models!r}.")
    names = [str(name) for name, _ in entries]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DuplicateName(f"The FusionBench pool names the model {twice[0]!r} twice; keep one model per name.")
    paths = {str(name): _model_path(str(name), spec) for name, spec in entries}
    if FUSIONBENCH_PRETRAINED not in paths:
        raise ValueError(f"The FusionBench pool names no `{FUSIONBENCH_PRETRAINED}` model (the pretrained GPT-2).")
    pretrained = paths.pop(FUSIONBENCH_PRETRAINED)
    # FusionBench names task models after the task, sometimes with a prefix (gpt2_cola): keep GLUE names.
    finetuned, named = {}, {}
    for name, path in paths.items():
        task = name if name in GLUE_TASKS else name.rsplit("_", 1)[-1]
        if task not in GLUE_TASKS:
            raise ValueError(f"FusionBench pool model {name!r} is no GLUE task; the tasks are {', '.join(GLUE_TASKS)}.")
        if task in named:
            raise DuplicateName(
                f"The FusionBench pool names task {task!r} twice ({named[task]!r} and {name!r}); keep one model per task."
            )
        finetuned[task], named[task] = path, name
    args: dict[str, Any] = {"pretrained": pretrained, "finetuned": {t: finetuned[t] for t in ordered_tasks(list(finetuned))}}
    tokenizer = config.get("tokenizer")
    if isinstance(tokenizer, dict):
        tokenizer = tokenizer.get("pretrained_model_name_or_path") or tokenizer.get("path")
    if isinstance(tokenizer, str):
        args["tokenizer"] = tokenizer
    return args


def from_fusionbench(config: dict[str, Any] | str | os.PathLike) -> ModelPool:
    """A ``ModelPool`` from a FusionBench pool file (path) or its parsed content."""
    if not isinstance(config, dict):
        from mergelit.configfile import load_yaml

        config = load_yaml(config, "FusionBench pool file")  # a task named twice in a mapping is refused
    return ModelPool(**fusionbench_pool_args(config))

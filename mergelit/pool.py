"""ModelPool: the pretrained GPT-2 and one fine-tuned GPT-2 classifier per GLUE task.

Hub ids or local folders; nothing is loaded until asked for (``--help`` never touches weights).
Weights come from safetensors only, never a pickle; no remote code.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from torch import Tensor

from mergelit import costs
from mergelit.errors import BadCheckpoint, DuplicateName, FileMissing, KeyMissing
from mergelit.glue import load_tokenizer
from mergelit.state_dict import tensors_fingerprint
from mergelit.tasks import GLUE_TASKS, PAD_TOKEN_ID, ordered_tasks

_PRETRAINED = "pretrained model (pool.pretrained)"
_BODY_PREFIX = "transformer."  # GPT2ForSequenceClassification / GPT2LMHeadModel keys of the body
# Tensors a checkpoint may hold beside the body: GPT-2's old causal-mask buffers, the LM head, the classifier.
_BUFFERS = (".attn.bias", ".attn.masked_bias")
_PRETRAINED_EXTRA = ("lm_head.weight",)
_FINETUNED_EXTRA = ("score.weight",)
_CAST_WARNED: set[str] = set()
# Every GPT2Config field that changes what a body computes: a fine-tuned model must agree with the
# pretrained one on all of them (labels, ids, dropout and the LM/summary heads may differ).
ARCHITECTURE_FIELDS = (
    "model_type", "n_layer", "n_embd", "n_head", "n_inner", "n_positions", "vocab_size", "activation_function",
    "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
    "add_cross_attention", "is_encoder_decoder",
)


def tokenizer_path(pretrained: str, tokenizer: Optional[str] = None) -> str:
    """The tokenizer a pool (or a fine-tuning run) uses: ``tokenizer`` if given, else ``pretrained``'s."""
    return tokenizer or pretrained


def _finetuned_name(task: str) -> str:
    return f"fine-tuned model for {task!r} (pool.finetuned.{task})"


# ---- finding and checking a checkpoint ---------------------------------------------------------
def _looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a folder rather than a hub id (``owner/name`` or ``name``)."""
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path:
        return True
    return "/" in path and os.path.isdir(path.split("/", 1)[0])


def _resolve(path: str, name: str) -> str:
    """A local folder for ``path``: itself, or a hub id's snapshot (config, safetensors, tokenizer files)."""
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
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False"):
        return FileMissing(f"The {name} {path!r} is not a local folder, and the hub is offline (HF_HUB_OFFLINE=1) "
                           f"with no cached copy; download it first, or point at a local folder.")
    return FileMissing(f"The {name} {path!r} is neither a local folder nor a reachable hub model "
                       f"({str(error).splitlines()[0]}).")


def check_checkpoint_folder(path: str, name: str = "checkpoint") -> None:
    """Fail, naming ``name`` (``fine-tuned model 'sst2'``) and ``path``, unless ``path`` is a usable
    checkpoint folder: it exists (a hub id is left to the loader), has safetensors (never a pickle)
    whose headers read, and holds a GPT-2 body."""
    expanded = os.path.expanduser(path)
    if os.path.isfile(expanded):
        raise FileMissing(f"The {name} path {path!r} is a file; give the checkpoint's folder "
                          f"(config.json + *.safetensors).")
    if not os.path.isdir(expanded):
        if _looks_local(path):
            raise FileMissing(f"The {name} folder {path!r} does not exist "
                              f"(relative paths are read from {os.getcwd()}).")
        return  # a hub id: the loader reports it
    files = sorted(glob.glob(os.path.join(expanded, "*.safetensors")))
    if not files:
        pickles = sorted(os.path.basename(f) for ext in ("bin", "pt", "pth")
                         for f in glob.glob(os.path.join(expanded, f"*.{ext}")))
        found = f" (it has only pickle weights: {', '.join(pickles)}, which mergelit never unpickles)"
        found = found if pickles else ""
        raise FileMissing(
            f"The {name} folder {path!r} has no *.safetensors file{found}; mergelit loads safetensors only. "
            f"Convert it once where you trust the file: `AutoModelForSequenceClassification.from_pretrained(folder)"
            f".save_pretrained(folder, safe_serialization=True)`."
        )
    # A sharded checkpoint spreads the body over several files: look for it in all of them together.
    keys = [key for file in files for key in _check_safetensors(file, name)]
    if not any(key.endswith("h.0.attn.c_attn.weight") for key in keys):
        shown = files[0] if len(files) == 1 else path
        raise BadCheckpoint(f"The {name} file {shown!r} holds no GPT-2 body (no 'h.0.attn.c_attn.weight' among its "
                            f"{len(keys)} tensors, e.g. {', '.join(keys[:3]) or 'none'}); point at a GPT-2 checkpoint.")


def _check_safetensors(file: str, name: str) -> list[str]:
    """The tensor names of a safetensors file, after reading its header (a damaged file fails, named)."""
    try:
        with safe_open(file, "pt") as handle:
            keys = list(handle.keys())
            dtypes = {handle.get_slice(key).get_dtype() for key in keys}
    except Exception as error:  # SafetensorError (truncated, corrupt header) has no narrower base
        raise BadCheckpoint(f"The {name} file {file!r} is not a readable safetensors file ({error}); "
                            f"re-download or re-export it.") from None
    low = sorted(d for d in dtypes if d in ("F16", "BF16"))
    if low and file not in _CAST_WARNED:
        _CAST_WARNED.add(file)
        warnings.warn(f"The {name} in {file!r} is stored in {'/'.join(low)}; mergelit casts it to float32.",
                      stacklevel=3)
    return keys


def _load_config(folder: str, name: str):
    """The config of a checked checkpoint folder, with the spec's pad id when it has none."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(folder)
    except OSError as error:
        raise BadCheckpoint(f"The {name} in {folder!r} cannot be loaded: {error}") from None
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = PAD_TOKEN_ID
    return config


def _check_label_names(task: str, path: str, labels: list) -> None:
    """A head named with another task's labels (two checkpoints swapped) is refused; generic
    ``LABEL_i`` names pass; other names that differ from the task table's only warn."""
    generic = all(isinstance(label, str) and label.upper().startswith("LABEL_") for label in labels)
    if not all(isinstance(label, str) for label in labels) or generic:
        return
    names = tuple(label.lower() for label in labels)
    expected = GLUE_TASKS[task].label_names
    if names == expected:
        return
    others = [other for other, info in GLUE_TASKS.items() if info.label_names == names]
    if others:
        raise BadCheckpoint(f"The {task!r} head in {path!r} has the label names of {'/'.join(others)} "
                            f"({list(labels)}), not {task}'s {list(expected)}: are two tasks' checkpoints swapped? "
                            f"Point `pool.finetuned.{task}` at a {task} classifier.")
    warnings.warn(f"The {task!r} head in {path!r} names its labels {list(labels)}; GLUE {task} calls them "
                  f"{list(expected)}.", stacklevel=3)


def _check_architecture(reference, config, name: str, path: str) -> None:
    """Refuse ``config`` if it differs from the pretrained ``reference`` in any architecture field."""
    for field in ARCHITECTURE_FIELDS:
        mine, theirs = _architecture_value(config, field), _architecture_value(reference, field)
        if mine != theirs:
            raise BadCheckpoint(f"The {name} in {path!r} is another architecture than the pretrained model: its config "
                                f"has {field} {mine!r}, the pretrained model's {theirs!r}. Every model of a pool must "
                                f"share one architecture.")


def _architecture_value(config, field: str):
    value = getattr(config, field, None)
    if field == "n_inner" and value is None and isinstance(getattr(config, "n_embd", None), int):
        return 4 * config.n_embd  # GPT-2's n_inner None: the same MLP as an explicit 4 * n_embd
    return value


def _check_tensor_names(checkpoint: _Checkpoint, shapes: dict[str, torch.Size], prefix: str, extra: tuple[str, ...],
                        name: str, path: str) -> None:
    """The checkpoint holds exactly the body ``shapes`` (under ``prefix``), the allowed ``extra`` tensors
    and old attention-mask buffers: a tensor missing, of another shape, or unexpected is refused."""
    same = "every model of a pool must share one architecture"
    for key, shape in shapes.items():
        if not checkpoint.has(prefix + key):
            raise BadCheckpoint(f"The {name} in {path!r} has no tensor {prefix + key!r}, which a GPT-2 body of its "
                                f"config has; {same}.")
        if checkpoint.shape(prefix + key) != shape:
            raise BadCheckpoint(f"Tensor {key!r} of the {name} in {path!r} has shape "
                                f"{tuple(checkpoint.shape(prefix + key))}, expected {tuple(shape)} (from the "
                                f"pretrained model's config); {same}.")
    expected = {prefix + key for key in shapes} | set(extra)
    for tensor_name in checkpoint.names():
        if tensor_name not in expected and not tensor_name.endswith(_BUFFERS):
            raise BadCheckpoint(f"The {name} in {path!r} holds a tensor {tensor_name!r} that a GPT-2 body of the "
                                f"pretrained model's config does not have; it would be silently ignored. Every model "
                                f"of a pool must share one architecture.")


def check_finite(state: dict[str, Tensor], name: str) -> None:
    """Refuse a state dict holding NaN or inf, naming ``name`` and the first such tensor."""
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        # A finite sum means finite entries: ~30x faster than isfinite().all(); only an overflow needs both.
        if not (bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())):
            bad = int((~torch.isfinite(tensor)).sum())
            raise BadCheckpoint(f"The {name} has {bad} NaN/inf value(s) in tensor {key!r}; mergelit refuses "
                                f"non-finite weights.")


# ---- reading a checkpoint ---------------------------------------------------------------------
def _sharded_files(folder: str, index: str) -> dict[str, str]:
    """Tensor name -> shard file, from a sharded checkpoint's index (its ``weight_map``), checked."""
    try:
        with open(index) as file:
            weight_map = json.load(file)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise TypeError("its weight_map is not a mapping of tensor names to shard files")
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = f"no {error.args[0]!r} entry" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
        raise BadCheckpoint(f"The sharded checkpoint index {index!r} is damaged ({problem}); it must map every tensor "
                            f"to its shard (weight_map). Re-download or re-export the checkpoint.") from None
    root = os.path.realpath(folder)
    files = {}
    for name, shard in weight_map.items():
        path = os.path.join(folder, shard)
        if os.path.commonpath([root, os.path.realpath(path)]) != root or not shard.endswith(".safetensors"):
            raise BadCheckpoint(f"The sharded checkpoint index {index!r} maps {name!r} to {shard!r}, which is not a "
                                f"safetensors file of the checkpoint's folder.")
        if not os.path.isfile(path):
            raise BadCheckpoint(f"The sharded checkpoint index {index!r} maps {name!r} to the shard {shard!r}, "
                                f"which is missing from {folder!r}; re-download the checkpoint.")
        files[name] = path
    return files


class _Checkpoint:
    """The safetensors file(s) of one checkpoint folder (sharded or not), read one tensor at a time:
    each read maps the file, copies the tensor out and closes it, so no page of the file stays resident."""

    def __init__(self, folder: str):
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
        with costs.timed("load"), safe_open(self.files[name], framework="pt") as handle:
            tensor = handle.get_tensor(name)
            # Copied out of the file's mapping (a file replaced during a run cannot fault a merge);
            # stored fp16/bf16 is cast as from_pretrained(dtype=float32) does.
            return tensor.to(torch.float32) if tensor.dtype != torch.float32 else tensor.clone()


# ---- the pool -----------------------------------------------------------------------------------
class ModelPool:
    """The models to merge, read one tensor at a time from their safetensors (memory-mapped): only
    heads and configs are held, so a merge that streams keys keeps its memory flat in the number of
    models. Reading is the ``load`` phase of ``mergelit.costs``.

    Args:
        pretrained: the pretrained GPT-2 (θ0): hub id (``gpt2``) or folder. A
            ``GPT2LMHeadModel`` or a bare ``GPT2Model`` checkpoint.
        finetuned: task -> hub id or folder of a ``GPT2ForSequenceClassification``
            fine-tuned on that task (``tanganke/gpt2_cola``, ...).
        tokenizer: tokenizer path or hub id; defaults to ``pretrained``.
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

    # ---- checkpoints and checks -------------------------------------------------------------
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
        return self._checkpoint(self.finetuned_paths[task], _finetuned_name(task))

    def body_config(self):
        """The pretrained GPT-2 config with the spec's pad token, checked against its checkpoint's tensors."""
        if self._config is None:
            checkpoint = self._pretrained_checkpoint()  # named errors first
            config = _load_config(checkpoint.folder, _PRETRAINED)
            if config.model_type != "gpt2":
                raise BadCheckpoint(f"{self.pretrained_path!r} is a {config.model_type!r} model; "
                                    f"mergelit merges GPT-2.")
            self._config = config
            prefix = _BODY_PREFIX if checkpoint.has(_BODY_PREFIX + "wte.weight") else ""
            try:
                _check_tensor_names(checkpoint, self.body_shapes(), prefix, _PRETRAINED_EXTRA, _PRETRAINED,
                                    self.pretrained_path)
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

    def _check_task(self, task: str) -> None:
        if task not in self.finetuned_paths:
            raise KeyMissing(f"Task {task!r} is not in the pool; its tasks are {', '.join(self.tasks)}.")

    def _head_and_config(self, task: str) -> tuple[Tensor, Any]:
        """``task``'s head and config, with its labels and body shapes checked (from the headers)."""
        if task not in self._heads:
            checkpoint = self._finetuned_checkpoint(task)
            path = self.finetuned_paths[task]
            name = _finetuned_name(task)
            config = _load_config(checkpoint.folder, name)
            if not checkpoint.has("score.weight"):
                raise BadCheckpoint(f"The fine-tuned model for {task!r} in {path!r} has no classification head "
                                    f"('score.weight'); point `pool.finetuned.{task}` at a "
                                    f"GPT2ForSequenceClassification checkpoint.")
            head = checkpoint.tensor("score.weight")
            expected = GLUE_TASKS[task].num_labels
            if config.num_labels != expected or head.shape[0] != expected:
                raise BadCheckpoint(f"The {task!r} head in {path!r} has {head.shape[0]} labels; GLUE {task} has "
                                    f"{expected}. Point `pool.finetuned.{task}` at a {task} classifier.")
            labels = [config.id2label.get(i, config.id2label.get(str(i))) for i in range(expected)]
            _check_label_names(task, path, labels)
            check_finite({"score.weight": head}, f"fine-tuned model for {task!r} ({path})")
            _check_architecture(self.body_config(), config, name, path)
            _check_tensor_names(checkpoint, self.body_shapes(), _BODY_PREFIX, _FINETUNED_EXTRA, name, path)
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
        """Read every weight once, so that a NaN/inf fails now, not after statistics (once per pool)."""
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
        """``tensor``, checked for NaN/inf on its first read only."""
        if (path, key) not in self._finite_checked:
            check_finite({key: tensor}, f"{name} {path!r}")
            self._finite_checked.add((path, key))
        return tensor

    def pretrained_tensor(self, key: str) -> Tensor:
        """θ0[key], read alone (fp32, a new tensor each call)."""
        self._check_key(key)
        checkpoint = self._pretrained_checkpoint()
        # A GPT2LMHeadModel checkpoint stores `transformer.<key>`; a bare GPT2Model stores `<key>`
        # (body_config checked that every key is there).
        name = _BODY_PREFIX + key if checkpoint.has(_BODY_PREFIX + key) else key
        return self._finite(checkpoint.tensor(name), key, _PRETRAINED, self.pretrained_path)

    def finetuned_tensor(self, task: str, key: str) -> Tensor:
        """θ_task[key], read alone (fp32, a new tensor each call)."""
        self._check_key(key)
        self._head_and_config(task)  # labels and shapes checked once
        tensor = self._finetuned_checkpoint(task).tensor(_BODY_PREFIX + key)
        return self._finite(tensor, key, f"fine-tuned model for {task!r}", self.finetuned_paths[task])

    def finetuned_tensors(self, key: str) -> TaskTensors:
        """θi[key] for every task, in task order, each read when indexed (``TaskTensors``)."""
        self._check_key(key)
        return TaskTensors(self, key)

    def pretrained_body(self) -> dict[str, Tensor]:
        """θ0 as a whole state dict (read now, not kept)."""
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
        """``compute()``, or the value kept for ``(group, key)`` by an earlier merge while ``keep_reused``
        is on. The two most recently used groups are kept (a wrapper's parts and its base method's)."""
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

    def _weights_digest(self, read: Callable[[str], Tensor], extra: dict[str, Tensor]) -> str:
        digest = hashlib.sha256()
        for key in self.keys():  # tensor by tensor
            tensors_fingerprint({key: read(key)}, digest)
        return tensors_fingerprint(extra, digest)

    def fingerprint(self, task: str) -> str:
        """A hash of ``task``'s fine-tuned weights (body and head) and its read-out pad id, computed once:
        the content, not the path (the same weights elsewhere hash the same)."""
        if task not in self._fingerprints:
            read = functools.partial(self.finetuned_tensor, task)
            digest = self._weights_digest(read, {"score.weight": self.head(task)})
            self._fingerprints[task] = f"{digest}|pad={self.task_config(task).pad_token_id}"
        return self._fingerprints[task]

    def pretrained_fingerprint(self) -> str:
        """A hash of θ0's weights, computed once."""
        if "<pretrained>" not in self._fingerprints:
            self._fingerprints["<pretrained>"] = self._weights_digest(self.pretrained_tensor, {})
        return self._fingerprints["<pretrained>"]


class TaskTensors(Sequence):
    """θ1[key] … θn[key] of a pool, in task order (``tasks``), each read from its checkpoint when
    indexed: what ``MergeMethod.merge_tensor`` receives (one pass holds one θi)."""

    def __init__(self, pool: ModelPool, key: str):
        self.pool, self.key, self.tasks = pool, key, list(pool.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> Tensor:
        if isinstance(index, slice):
            raise TypeError("TaskTensors are read one at a time (a slice would hold them all).")
        return self.pool.finetuned_tensor(self.tasks[index], self.key)


# ---- FusionBench's pool files --------------------------------------------------------------
FUSIONBENCH_PRETRAINED = "_pretrained_"  # FusionBench's name of the pretrained model in a pool file


def is_fusionbench_pool(config: Any) -> bool:
    """Whether ``config`` is a FusionBench model pool (``models:``), not mergelit's ``{pretrained, finetuned}``."""
    return isinstance(config, dict) and "models" in config and "pretrained" not in config and "finetuned" not in config


def _model_path(name: str, spec: Any) -> str:
    # FusionBench writes a model as a bare path, {name, path}, or {_target_, pretrained_model_name_or_path}.
    if isinstance(spec, str):
        return spec
    for key in ("path", "pretrained_model_name_or_path"):
        if isinstance(spec, dict) and isinstance(spec.get(key), str):
            return spec[key]
    raise ValueError(f"FusionBench pool model {name!r}: {spec!r} gives no path (expected `path:` or a string).")


def fusionbench_pool_args(config: dict[str, Any]) -> dict[str, Any]:
    """``ModelPool`` arguments from a FusionBench pool file's content: ``models:`` as a list of
    ``{name, path}`` (``_pretrained_`` and one per task) or a mapping name -> path, and an optional
    ``tokenizer:``; paths kept as written, FusionBench's other keys (``_target_``, ``type``) ignored."""
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
            raise DuplicateName(f"The FusionBench pool names task {task!r} twice ({named[task]!r} and {name!r}); "
                                f"keep one model per task.")
        finetuned[task], named[task] = path, name
    args: dict[str, Any] = {"pretrained": pretrained,
                            "finetuned": {t: finetuned[t] for t in ordered_tasks(list(finetuned))}}
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

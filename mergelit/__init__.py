"""mergelit: model merging for GPT-2 GLUE classifiers, as PyTorch Lightning modules.

    import mergelit

    pool = mergelit.ModelPool(pretrained="gpt2", finetuned={t: f"tanganke/gpt2_{t}" for t in mergelit.TASKS})
    data = mergelit.GLUEDataModule(tasks=pool.tasks, tokenizer=pool.tokenizer_path)
    ties = mergelit.method(pool, "ties_merging", scaling_factor=0.6)
    report = mergelit.evaluate(ties, data)
    mergelit.export_merged(ties, "merged/ties", report)

Importing ``mergelit`` is light: torch, Lightning and transformers load on first use of a name.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "ModelPool": "mergelit.pool",
    "GLUEDataModule": "mergelit.glue",
    "MergeMethod": "mergelit.methods",
    "method_classes": "mergelit.methods",
    **dict.fromkeys(
        ("method", "method_names", "prepare", "merge", "classifiers", "evaluate", "export_merged"), "mergelit.api"
    ),
    "TASKS": "mergelit.tasks",
    "MergelitError": "mergelit.errors",
}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mergelit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

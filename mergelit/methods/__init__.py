"""Merge methods: one file each. Every ``MergeMethod`` subclass defined in a module of this package is
found by ``method_classes()`` (tests, the demo and ``compare`` use it) and reachable as
``mergelit.methods.<ClassName>`` (``class_path: mergelit.methods.TiesMerging``): there is no list to keep.
"""

from __future__ import annotations

from mergelit.methods.base import MergeMethod, method_classes


def __getattr__(name: str) -> type[MergeMethod]:
    # `mergelit.methods.TiesMerging` (a config's class_path) without importing every method up front.
    for cls in method_classes():
        if cls.__name__ == name:
            globals()[name] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no method {name!r}")


__all__ = ["MergeMethod", "method_classes"]

"""Merge methods: one file each, a ``MergeMethod`` subclass picked by ``class_path`` in a config.

There is no list to keep: every ``MergeMethod`` subclass defined in a module of this package is
a method, found by ``method_classes()`` and reachable as ``mergelit.methods.<ClassName>``
(``class_path: mergelit.methods.TiesMerging``). Tests, the demo and ``compare`` of every method
use ``method_classes()``, so a new method file is picked up everywhere by itself.
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

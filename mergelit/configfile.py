"""Reading the user's YAML files: every mistake named with the file (and line), and a repeated key refused
(YAML would keep the last value: ``finetuned: {sst2: a, sst2: b}`` would silently run on one of them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mergelit.errors import DuplicateName, FileMissing, MergelitError


def load_yaml(path: str | os.PathLike, what: str = "Config file") -> Any:
    """The content of the YAML file ``path``, with short errors naming it (missing, a folder, invalid, repeated keys)."""
    import yaml  # on first use: `mergelit --help` stays fast

    path = Path(path)
    source = f"{what} {str(path)!r}"
    if path.is_dir():
        raise FileMissing(f"{source} is a folder; give a YAML file.")
    if not path.is_file():
        raise FileMissing(f"{source} does not exist.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise MergelitError(f"{source} cannot be read: {error}.") from None

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateName(
                    f"{source}: key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); YAML would keep only the last one."
                )
            seen[key] = key_node.start_mark.line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise MergelitError(f"{source} is not valid YAML{line}: {problem}.") from None


def yaml_file(value: str) -> Any:
    """``load_yaml(value)`` when ``value`` names a file, else None (a command-line value may be inline YAML)."""
    return load_yaml(value) if os.path.isfile(value) else None

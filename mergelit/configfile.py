"""Reading the user's YAML files: every mistake named with the file (and line), duplicate keys refused.

YAML itself lets a mapping repeat a key and keeps the last value, so a config listing a task twice
(``finetuned: {sst2: a, sst2: b}``) would silently run on one of them. ``load_yaml`` refuses any
repeated key of any mapping, naming the key, the line and the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mergelit.errors import DuplicateName, FileMissing, MergelitError


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateName(
                    f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    f"YAML would keep only the last one"
                )
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping_plain(node, deep=deep)

    UniqueKeyLoader.construct_mapping_plain = yaml.SafeLoader.construct_mapping
    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse ``text`` (from ``source``) refusing repeated keys and naming the line of a syntax error."""
    import yaml

    try:
        return yaml.load(text, Loader=_unique_key_loader())
    except DuplicateName as error:
        raise DuplicateName(f"{source}: {error}.") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise MergelitError(f"{source} is not valid YAML{line}: {problem}.") from None


def load_yaml(path: str | os.PathLike, what: str = "Config file") -> Any:
    """The content of the YAML file ``path``, with short errors naming it (missing, a folder, invalid, repeated keys)."""
    path = Path(path)
    if path.is_dir():
        raise FileMissing(f"{what} {str(path)!r} is a folder; give a YAML file.")
    if not path.is_file():
        raise FileMissing(f"{what} {str(path)!r} does not exist.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise MergelitError(f"{what} {str(path)!r} cannot be read: {error}.") from None
    return parse_yaml(text, f"{what} {str(path)!r}")

"""What mergelit keeps between runs (statistics, tokenized data, sweep points): one rule.

A file is named by a hash of everything it depends on (so a changed input gives another name),
written atomically, and read back only if its recorded key and checksum match; otherwise it is
reported once (``<what> cache file <path> is not trusted (<reason>); recomputing it.``) and ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_warn
from safetensors import safe_open
from safetensors.torch import save

from mergelit.errors import NotWritable
from mergelit.state_dict import tensors_fingerprint

FORMAT = 2  # bump when what a cache file holds changes for the same fields: older files are then not found


def content_key(fields: dict[str, Any]) -> str:
    """A short hash of ``fields`` (canonical JSON, keys sorted) and the cache format."""
    text = json.dumps({"format": FORMAT, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def atomic_write_bytes(path: str | os.PathLike, data: bytes, elsewhere: str = "another cache folder") -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half; a failure
    is ``NotWritable`` advising to free space or choose ``elsewhere``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if not isinstance(error, OSError):
            raise
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise NotWritable(f"Cannot write {str(path)!r}: {reason}. Free space or choose {elsewhere}.") from None
    return path


class Cache:
    """Content-addressed files of one kind under ``folder/kind``.

    Args:
        folder: the cache's root folder (shared by every kind).
        kind: a subfolder and the file-name prefix (``fisher``, ``regmean``, ``tokenized``).
        what: how messages name these files (``Fisher statistics``).
    """

    def __init__(self, folder: str | os.PathLike, kind: str, what: str):
        self.folder = Path(folder) / kind
        self.kind = kind
        self.what = what

    def key(self, fields: dict[str, Any]) -> str:
        return content_key({"kind": self.kind, **fields})

    def path(self, key: str, suffix: str = ".safetensors", prefix: str = "") -> Path:
        return self.folder / f"{prefix}{key}{suffix}"

    def distrust(self, path: Path, reason: str) -> None:
        """The one message for a file that fails the trust check."""
        rank_zero_warn(f"{self.what} cache file {path} is not trusted ({reason}); recomputing it.")

    def _trusted(self, path: Path, key: str, written_for: Any, checksum: Any, actual: str) -> bool:
        if written_for != key:
            self.distrust(path, f"it was written for key {written_for!r}")
        elif checksum != actual:
            self.distrust(path, "its content does not match its checksum")
        return written_for == key and checksum == actual

    # ---- tensors (safetensors; fields and a checksum in the header) ----------------------------
    def write_tensors(self, key: str, tensors: dict, metadata: Optional[dict[str, str]] = None,
                      prefix: str = "") -> Path:
        """Store ``tensors`` (and string ``metadata``) under ``key``, atomically, with a checksum."""
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        header = {**(metadata or {}), "key": key, "checksum": tensors_fingerprint(tensors)}
        return atomic_write_bytes(self.path(key, prefix=prefix), save(tensors, metadata=header))

    def read_tensors(self, key: str, prefix: str = "") -> Optional[tuple[dict, dict[str, str]]]:
        """``(tensors, metadata)`` stored under ``key``, or None if absent or not trusted (warned)."""
        path = self.path(key, prefix=prefix)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = dict(file.metadata() or {})
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except Exception as error:  # safetensors raises several types for a damaged file
            self.distrust(path, f"unreadable: {type(error).__name__}: {error}")
            return None
        trusted = self._trusted(path, key, metadata.get("key"), metadata.get("checksum"), tensors_fingerprint(tensors))
        return (tensors, metadata) if trusted else None

    # ---- JSON ---------------------------------------------------------------------------------
    def write_json(self, key: str, payload: Any, prefix: str = "") -> Path:
        """Store ``payload`` (JSON) under ``key``, atomically, with a checksum."""
        body = json.dumps(payload, sort_keys=True, default=str)
        record = {"key": key, "checksum": hashlib.sha256(body.encode()).hexdigest(), "payload": payload}
        text = json.dumps(record, indent=1, default=str) + "\n"
        return atomic_write_bytes(self.path(key, ".json", prefix), text.encode())

    def read_json(self, key: str, prefix: str = "") -> Any:
        """The payload stored under ``key``, or None if absent or not trusted (warned)."""
        path = self.path(key, ".json", prefix)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            payload = record["payload"]
            body = json.dumps(payload, sort_keys=True, default=str)
        except (OSError, ValueError, KeyError, TypeError) as error:
            self.distrust(path, f"unreadable: {type(error).__name__}: {error}")
            return None
        checksum = hashlib.sha256(body.encode()).hexdigest()
        return payload if self._trusted(path, key, record.get("key"), record.get("checksum"), checksum) else None

"""Content hashes of files and model folders: the keys of cached answers and parameters."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from .cache import cache_dir, register_section, touch
from .errors import CheckpointError
from .fs import atomic_write

register_section("hashes")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of one file's bytes, as hex, read in 4 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def content_hash(path: str | os.PathLike, patterns: Sequence[str] = ("*.safetensors", "*.json")) -> str:
    """sha256 over the weight and config files of a folder (names and contents), as hex.

    Remembered per machine by (file name, size, mtime), so a large model is hashed once.
    """
    root = Path(path).resolve()
    if not root.is_dir():
        raise CheckpointError(f"{path}: no such model folder")
    files = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    key = hashlib.sha256(json.dumps([str(root), stamp]).encode()).hexdigest()
    memo = cache_dir() / "hashes" / key
    if memo.is_file():
        touch(memo)
        return memo.read_text().strip()
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    digest = h.hexdigest()
    atomic_write(memo, digest)
    return digest

"""The per-machine cache: where it is, its sections, and pruning it.

Each section is registered by the module that fills it (`register_section`): `endpoints`
(LoRA adapters merged once into full checkpoints: the large entries, one folder each),
`responses` (benchmark answers per model digest), `irt` (fitted item parameters) and `hashes`
(content-hash memos). Every entry is recomputed when it is missing, so pruning loses time,
never results. Readers touch an entry when they use it (`touch`), so an entry's age is the
time since its last use and pruning by size removes the least recently used first. Entries used
within `keep_recent` seconds are never removed, so a job that is starting keeps what it reads.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

SECTIONS: dict[str, bool] = {}  # name -> one entry per folder (else one per file)


def register_section(name: str, folder: bool = False) -> None:
    """Declares a section of the cache (its owner calls this at import)."""
    SECTIONS[name] = folder


def cache_dir() -> Path:
    """evomerge's per-machine cache: $EVOMERGE_CACHE or ~/.cache/evomerge."""
    return Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge")


@dataclass(frozen=True)
class Entry:
    section: str
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch (mtime, refreshed on use)


def touch(path: str | os.PathLike) -> None:
    """Marks a cache entry as used now (best effort: a read-only cache is still read)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def entries(root: str | os.PathLike | None = None) -> list[Entry]:
    """Every entry of the cache at `root` (default: `cache_dir()`), oldest use first."""
    root = Path(root) if root is not None else cache_dir()
    out = []
    for section, per_folder in SECTIONS.items():
        folder = root / section
        if not folder.is_dir():
            continue
        if per_folder:
            items = [(p, _folder_bytes(p)) for p in folder.iterdir() if p.is_dir()]
        else:
            items = [(p, p.stat().st_size) for p in folder.rglob("*") if p.is_file()]
        out += [Entry(section, p, size, p.stat().st_mtime) for p, size in items]
    return sorted(out, key=lambda e: e.last_used)


def select(found: list[Entry], *, older_than: float | None = None, max_bytes: int | None = None,
           keep_recent: float = 3600.0, now: float | None = None) -> list[Entry]:
    """The entries to remove: those unused for more than `older_than` seconds, then the least
    recently used until the rest fit in `max_bytes`; never one used in the last `keep_recent` s."""
    now = time.time() if now is None else now
    found = sorted(found, key=lambda e: e.last_used)
    removable = [e for e in found if now - e.last_used >= keep_recent]
    chosen = [e for e in removable if older_than is not None and now - e.last_used > older_than]
    if max_bytes is not None:
        taken = {e.path for e in chosen}
        total = sum(e.bytes for e in found) - sum(e.bytes for e in chosen)
        for e in removable:
            if total <= max_bytes:
                break
            if e.path not in taken:
                chosen.append(e)
                total -= e.bytes
    return chosen


def remove(chosen: list[Entry]) -> int:
    """Deletes the entries; returns the bytes freed (an entry already gone counts nothing)."""
    freed = 0
    for e in chosen:
        try:
            if e.path.is_dir():
                shutil.rmtree(e.path)
            else:
                e.path.unlink()
            freed += e.bytes
        except FileNotFoundError:
            pass
    return freed

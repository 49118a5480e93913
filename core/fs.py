"""Files that readers never see half-written, and folders with the usual permissions."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes a file through a temporary file in the same folder, fsync, then a rename:
    readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the result is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_umask() -> int:
    mask = os.umask(0o022)  # read once at import: os.umask is process-wide, not per thread
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def publish_permissions(folder: str | os.PathLike) -> None:
    """Gives a folder made by `tempfile.mkdtemp` (mode 0700) the mode a plain mkdir would have."""
    os.chmod(folder, 0o777 & ~_UMASK)

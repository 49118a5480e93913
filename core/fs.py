"""Files that readers never see half-written, and folders with the usual permissions."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (numpy, matplotlib,
    tarfile); when the block ends without an error the file is synced and renamed onto `path`,
    else removed: readers see the old file or the whole new one, never a part. `suffix` keeps
    an extension a writer insists on (np.savez appends .npz otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the result is an ordinary file
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes `data` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def _read_umask() -> int:
    mask = os.umask(0o022)  # read once at import: os.umask is process-wide, not per thread
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def publish_permissions(folder: str | os.PathLike) -> None:
    """Gives a folder made by `tempfile.mkdtemp` (mode 0700) the mode a plain mkdir would have."""
    os.chmod(folder, 0o777 & ~_UMASK)

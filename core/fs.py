"""Files that readers never see half-written, and folders with the usual permissions."""
from __future__ import annotations

import contextlib
import os
import shutil
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


def replace_folder(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Renames the finished folder `tmp` onto `out`, with the permissions a plain mkdir gives; an
    existing `out` is moved aside first and removed after, so `out` is always a whole folder."""
    tmp, out = Path(tmp), Path(out)
    publish_permissions(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `out` to fill; when the block ends without an error it replaces
    `out` (`replace_folder`), else it is removed: `out` is never seen half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""One writer per output folder: an advisory lock beside a folder that a long job fills in steps.

An evolve run appends candidates and replaces its checkpoint every generation; ATM keeps its
iterates in a state folder beside its output. Two processes given the same folder would
interleave those writes (a resume and a fresh run, or two resumes), so each takes an exclusive
`flock` on `.<name>.lock` beside the folder first, and a second one is refused at once with a
clear error instead of waiting. The lock is the kernel's: it goes with the process, so a
SIGKILLed run leaves nothing to clean up, and the next run takes it. The file is removed on
release; a holder checks after locking that the path still names the file it locked, so a
process that raced with a removal retries on the new file.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator


class FolderBusy(ValueError):
    """Another process holds the folder's lock."""


def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike, what: str = "this folder") -> Iterator[Path]:
    """Holds the lock of `folder` for the block; raises FolderBusy when another process has it.
    `what` names the job in the lock file, for the error a second process gets."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid, _, theirs = _read(path).partition(" ")
            raise FolderBusy(f"{Path(folder)}: another process{f' (pid {pid})' if pid else ''} is writing "
                             f"{theirs or 'it'} (lock {path}); wait for it to finish or stop it first") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by the previous holder after we opened it: lock the new file
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {what}".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""

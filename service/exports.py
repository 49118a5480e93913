"""Checkpoint tars built in the background, for `GET /v1/jobs/{id}/candidates/{cid}/checkpoint`.

Building a candidate's HF folder can take minutes (an evolve candidate is merged again), longer
than a client should hold a request open: the route answers 202 + Retry-After while a thread
builds the tar (`service.jobs.build_checkpoint_tar`), and serves the file once it exists.
"""
from __future__ import annotations

import threading

from .config import Settings
from .jobs import build_checkpoint_tar, one_line
from .store import Job


class Exports:
    """Builds checkpoint tars in background threads: one build per (job, candidate) at a time."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._building: set[tuple[str, int]] = set()
        self._errors: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    def start(self, job: Job, cid: int) -> str | None:
        """Starts (or keeps) a build; returns the error of a failed previous build, once."""
        key = (job.id, cid)
        with self._lock:
            if key in self._errors:
                return self._errors.pop(key)
            if key in self._building:
                return None
            self._building.add(key)

        def build():
            try:
                build_checkpoint_tar(self.settings, job, cid)
            except Exception as e:
                with self._lock:
                    self._errors[key] = one_line(e)
            finally:
                with self._lock:
                    self._building.discard(key)

        threading.Thread(target=build, name=f"export-{job.id}-{cid}", daemon=True).start()
        return None

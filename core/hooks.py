"""How long work (a merge, ATM, an evolve job, a zoo build) reports and is stopped.

Every entry point takes one `Hooks`: `progress(event)` receives JSON-able dict events (each has
a `type`: `stage`, `progress`, ...), `should_stop()` is asked between steps; when it answers
true the work raises `Stopped`, leaving on disk what a later call resumes from (where the entry
point supports resuming).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class Stopped(Exception):
    """The work stopped because `should_stop()` said so."""


@dataclass(frozen=True)
class Hooks:
    progress: Callable[[dict], None] | None = None
    should_stop: Callable[[], bool] | None = None

    def emit(self, event: dict) -> None:
        if self.progress is not None:
            self.progress(event)

    def stopping(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())

    def check(self) -> None:
        """Raises `Stopped` when asked to stop."""
        if self.stopping():
            raise Stopped()


NO_HOOKS = Hooks()

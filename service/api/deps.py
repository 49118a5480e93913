"""FastAPI dependencies: what routes need besides their parameters, and the checks that come with it.

`create_app` keeps one of each shared object on `app.state` (settings, store, rate limiter,
export builder); routes ask for them with the `Annotated` aliases below (`SettingsDep`, ...).

Who is calling: when tokens are configured every route but /healthz needs
`Authorization: Bearer TOKEN` (GET requests may carry it in the `evomerge_token` cookie
instead, which the page sets when opened with `?token=...`, since a browser cannot add headers
to a link). A job or an uploaded benchmark is visible only to the user who submitted it, or to
an admin; with auth off everyone sees everything. Job submissions are rate limited per user
(per client address when auth is off).
"""
from __future__ import annotations

import hmac
import threading
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings, User
from service.errors import ApiError
from service.exports import Exports
from service.store import Job, Store

COOKIE = "evomerge_token"


class RateLimiter:
    """At most `per_minute` accepted submissions per key in any sliding 60-second window. A
    submission `take`s a slot (429 past the limit) and gives it back when it is refused, so that
    only accepted ones count, concurrent ones included."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._hits: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        now = time.monotonic()
        with self._lock:
            hits = self._hits[key]
            while hits and now - hits[0] > 60:
                hits.popleft()
            if len(hits) >= self.per_minute:
                retry = int(60 - (now - hits[0])) + 1
                raise ApiError(429, f"too many submissions: at most {self.per_minute} a minute",
                               headers={"Retry-After": str(retry)})
            hits.append(now)
            return now

    def give_back(self, key: str, slot: float) -> None:
        with self._lock:
            try:
                self._hits[key].remove(slot)
            except ValueError:  # already out of the window
                pass


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_exports(request: Request) -> Exports:
    return request.app.state.exports


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
ExportsDep = Annotated[Exports, Depends(get_exports)]


def known_user(settings: Settings, token: str) -> User:
    """The user of `token`; 401 for a token nobody has."""
    found = None
    for known, user in settings.tokens.items():  # compare every token in constant time
        if hmac.compare_digest(known.encode(), token.encode()):
            found = user
    if found is None:
        raise ApiError(401, "authorization: unknown token", headers={"WWW-Authenticate": "Bearer"})
    return found


def current_user(request: Request, settings: SettingsDep) -> User | None:
    """The caller (None when auth is off); 401 without a known token."""
    if not settings.auth:
        return None
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else None
    if token is None and request.method in ("GET", "HEAD"):
        token = request.cookies.get(COOKIE) or None
    if not token:
        raise ApiError(401, "authorization: a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
    return known_user(settings, token)


UserDep = Annotated[User | None, Depends(current_user)]


def owner_of(user: User | None) -> str | None:
    """What a job or benchmark row records as its owner."""
    return user.name if user else None


def sees_all(user: User | None) -> bool:
    return user is None or user.admin


def may_see(user: User | None, owner: str | None) -> bool:
    """Whether `user` may see a row owned by `owner`."""
    return sees_all(user) or owner == user.name


def visible_job(job_id: str, user: UserDep, store: StoreDep) -> Job:
    """The job of the path's `job_id`; 404 when there is none or the caller may not see it."""
    job = store.get_job(job_id)
    if job is None or not may_see(user, job.owner):
        raise ApiError(404, f"no job {job_id}")
    return job


VisibleJob = Annotated[Job, Depends(visible_job)]


def uploaded_benchmark(store: Store, user: User | None, name: str) -> Path | None:
    """The file of the benchmark uploaded as `name`, when the caller may use it."""
    row = store.get_benchmark(name)
    return Path(row.path) if row is not None and may_see(user, row.owner) else None


def rate_key(request: Request, user: User | None) -> str:
    """Whom a submission counts against: the user, or the client's address when auth is off."""
    return owner_of(user) or (request.client.host if request.client else "-")

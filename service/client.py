"""A small Python client for the REST API (httpx); the `evomerge` service commands use it.

    c = Client("http://127.0.0.1:8000", token="...")      # or $EVOMERGE_URL / $EVOMERGE_TOKEN
    job = c.submit("spec.yaml")                             # a path, a dict or a spec object
    for event in c.events(job["id"]): print(event)          # server-sent progress, until the end
    c.download(job["id"], 0, "merged/")                     # the HF folder (or a .tar path)

Every non-2xx answer raises `ApiError` with the server's one-line message.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(ValueError):
    """The server refused a request, or could not be reached; the message is one line."""

    def __init__(self, message: str, status: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status, self.field = status, field


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0):
        self.url = (url or os.environ.get("EVOMERGE_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("EVOMERGE_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        except (httpx.InvalidURL, ValueError) as e:
            raise ApiError(f"--url {self.url}: not a usable address ({e})") from None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ApiError(f"cannot reach {self.url}: {e}") from None
        _raise_for(r)
        return r

    # -- jobs ---------------------------------------------------------------------------------
    def submit(self, spec: dict | str | os.PathLike | Any) -> dict:
        """Submits a job spec (a dict, a pydantic spec, or a YAML/JSON file path); returns the job."""
        if isinstance(spec, (str, os.PathLike)):
            spec = load_spec_file(spec)
        elif hasattr(spec, "model_dump"):
            spec = spec.model_dump(mode="json")
        return self._request("POST", "/v1/jobs", json=spec).json()

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{_id(job_id)}").json()

    def jobs(self, status: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        params = {"limit": limit, "offset": offset} | ({"status": status} if status else {})
        return self._request("GET", "/v1/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict:
        return self._request("DELETE", f"/v1/jobs/{_id(job_id)}").json()

    def front(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{_id(job_id)}/front").json()

    def candidates(self, job_id: str) -> dict:
        """Every candidate scored (the front's marked on_front), in the front's shape."""
        return self._request("GET", f"/v1/jobs/{_id(job_id)}/candidates").json()

    def events(self, job_id: str, last_event_id: int | None = None) -> Iterator[dict]:
        """The job's events as dicts (with `id`), from the start or after `last_event_id`, until it ends.

        A dropped connection is resumed from the last event seen."""
        last = last_event_id
        while True:
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            try:
                with self.http.stream("GET", f"/v1/jobs/{_id(job_id)}/events", headers=headers,
                                      timeout=httpx.Timeout(self.http.timeout.connect, read=None)) as r:
                    if r.status_code >= 400:
                        r.read()
                        _raise_for(r)
                    for ev_id, data in _sse(r.iter_lines()):
                        if ev_id is not None:
                            last = ev_id
                        yield data | ({"id": ev_id} if ev_id is not None else {})
                        if data.get("type") == "end":
                            return
            except (httpx.RemoteProtocolError, httpx.ReadError) as e:
                if last is None:
                    raise ApiError(f"event stream from {self.url} broke: {e}") from None
                time.sleep(1)
            except httpx.HTTPError as e:
                raise ApiError(f"cannot reach {self.url}: {e}") from None

    def wait(self, job_id: str, on_event: Callable[[dict], None] | None = None) -> dict:
        """Follows the events until the job ends; returns the final job."""
        for ev in self.events(job_id):
            if on_event:
                on_event(ev)
        return self.job(job_id)

    def download(self, job_id: str, cid: int, dest: str | os.PathLike, *, extract: bool | None = None,
                 timeout: float = 3600) -> Path:
        """Saves candidate `cid` as a tar (dest ends in .tar) or as an extracted HF folder at `dest`.

        Waits while the server builds the tar (202 + Retry-After)."""
        dest = Path(dest)
        extract = not dest.name.endswith(".tar") if extract is None else extract
        if dest.exists():
            raise ApiError(f"{dest}: already exists")
        url, deadline = f"/v1/jobs/{_id(job_id)}/candidates/{cid}/checkpoint", time.monotonic() + timeout
        while True:
            try:
                with self.http.stream("GET", url, timeout=httpx.Timeout(self.http.timeout.connect, read=600)) as r:
                    if r.status_code == 202:
                        wait = float(r.headers.get("retry-after", "2"))
                    else:
                        if r.status_code >= 400:
                            r.read()
                            _raise_for(r)
                        return _save(r, dest, extract)
            except httpx.HTTPError as e:
                raise ApiError(f"download from {self.url} failed: {e}") from None
            if time.monotonic() + wait > deadline:
                raise ApiError(f"the checkpoint of job {job_id} candidate {cid} was not ready within {timeout:.0f} s")
            time.sleep(wait)

    # -- benchmarks ---------------------------------------------------------------------------
    def upload_benchmark(self, name: str, items: str | os.PathLike | bytes) -> dict:
        """Uploads JSONL (a file path, or the bytes themselves) under `name`."""
        data = items if isinstance(items, bytes) else Path(items).read_bytes()
        return self._request("POST", "/v1/benchmarks", params={"name": name}, content=data,
                             headers={"Content-Type": "application/x-ndjson"}).json()

    def benchmarks(self) -> list[dict]:
        return self._request("GET", "/v1/benchmarks").json()["benchmarks"]

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()


def _id(job_id: str) -> str:
    """A job id as one path segment ('../healthz' must not become another route)."""
    return quote(str(job_id), safe="")


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        body = r.json()
        detail, field = body.get("detail", r.reason_phrase), body.get("field")
    except ValueError:  # not our API (another server at that address): its first line only
        first = (r.text.strip().splitlines() or [""])[0][:200]
        detail, field = f"{r.reason_phrase}; is this an evomerge server? ({first})" if first else r.reason_phrase, None
    raise ApiError(f"{detail} (HTTP {r.status_code})", r.status_code, field)


def _sse(lines: Iterator[str]) -> Iterator[tuple[int | None, dict]]:
    """Parses server-sent events into (id, data as JSON)."""
    ev_id, data = None, []
    for line in lines:
        if line == "":
            if data:
                yield ev_id, json.loads("\n".join(data))
            ev_id, data = None, []
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "data":
                data.append(value)
            elif key == "id" and value.isdigit():
                ev_id = int(value)


def _save(r: httpx.Response, dest: Path, extract: bool) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        tar_path = Path(tmp) / "checkpoint.tar"
        with open(tar_path, "wb") as f:
            for chunk in r.iter_bytes(1 << 20):
                f.write(chunk)
        if not extract:
            os.replace(tar_path, dest)
            return dest
        with tarfile.open(tar_path) as tf:
            tf.extractall(Path(tmp) / "x", filter="data")
        (top,) = list((Path(tmp) / "x").iterdir())
        shutil.move(str(top), dest)
    return dest


def load_spec_file(path: str | os.PathLike) -> dict:
    """A YAML (or JSON) spec file as a dict; ApiError with a one-line reason otherwise."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise ApiError(f"{path}: a folder, not a spec file")
    if not p.is_file():
        raise ApiError(f"{path}: no such spec file")
    try:
        data = yaml.safe_load(p.read_text())
    except UnicodeDecodeError:
        raise ApiError(f"{path}: not a text file (a spec is YAML or JSON)") from None
    except yaml.YAMLError as e:
        raise ApiError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ApiError(f"{path}: a spec is a mapping of fields (kind, base, models, method, ...)")
    from core.validation import field_path, non_finite

    bad = non_finite(data)  # JSON has no NaN or infinities
    if bad is not None:
        raise ApiError(f"{path}: {field_path(bad)}: must be a finite number (not NaN or infinity)", field=field_path(bad))
    return _dates_as_text(data)


def _dates_as_text(value: Any) -> Any:
    """YAML reads 2024-05-01 as a date; in a spec it is meant as text (a name, say)."""
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _dates_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_dates_as_text(v) for v in value]
    return value


"""Service settings: where the database, artifacts and models live, who may call, and limits.

Everything comes from one `Settings` object so the API, the workers and the tests agree.
`Settings.from_env()` reads the `EVOMERGE_*` variables below; the CLI overrides fields
with its flags.

    EVOMERGE_DB            SQLAlchemy URL (default sqlite:///<artifacts>/evomerge.db)
    EVOMERGE_ARTIFACTS     folder for job outputs and uploaded benchmarks (default ./artifacts)
    EVOMERGE_MODEL_ROOTS   folders model paths must lie in, separated by ':' (default: the CWD)
    EVOMERGE_DEVICES       devices served by workers, comma-separated (default: not checked)
    EVOMERGE_TOKENS        comma-separated `NAME:TOKEN` or `NAME:TOKEN:admin` (a bare TOKEN is
                           a user of its own); unset means no authentication
    EVOMERGE_TOKEN_FILE    the same, one entry a line (# comments allowed)
    EVOMERGE_RATE_LIMIT    job submissions per token per minute (default 30)
    EVOMERGE_GPU_MEMORY    GPU memory of the workers, e.g. 24GB: evolve jobs are planned against it
                           (`evolve.plan`) and refused (400) when they would not fit
    EVOMERGE_HOST_MEMORY   the same for the workers' host memory, e.g. 32GB; with neither set the
                           API does not plan (it may not be the machine that runs the job)
    EVOMERGE_RAY_ADDRESS   a Ray cluster (auto, HOST:PORT or ray://HOST:PORT): `serve` starts
                           EVOMERGE_RAY_JOBS (default 4) dispatchers instead of one worker per
                           device, each running one job at a time as a Ray task
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False


def parse_tokens(text: str) -> dict[str, User]:
    """`"alice:s3cret, root:t0ken:admin"` -> {token: User}. Entries split on commas or lines."""
    users: dict[str, User] = {}
    for raw in text.replace("\n", ",").split(","):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) == 1:
            token, name, admin = parts[0], "user-" + hashlib.sha256(parts[0].encode()).hexdigest()[:8], False
        elif len(parts) in (2, 3) and (len(parts) == 2 or parts[2] == "admin"):
            name, token, admin = parts[0], parts[1], len(parts) == 3
        else:
            raise ValueError(f"token entry {entry.split(':')[0]}:...: use NAME:TOKEN or NAME:TOKEN:admin")
        if not token or not name:
            raise ValueError("token entries need a non-empty name and token")
        users[token] = User(name, admin)
    return users


def _split(value: str | None, sep: str) -> list[str]:
    return [p for p in (value or "").split(sep) if p.strip()]


@dataclass(frozen=True)
class Settings:
    db_url: str = ""
    artifacts: Path = Path("artifacts")
    model_roots: tuple[Path, ...] = ()
    devices: tuple[str, ...] = ()  # empty: any device a spec names is accepted
    tokens: dict[str, User] = field(default_factory=dict)  # empty: authentication off
    max_body_bytes: int = 1 << 20  # job specs
    max_benchmark_bytes: int = 32 << 20  # benchmark uploads
    max_irt_bytes: int = 64 << 20  # item parameter uploads: a response matrix (CSV) or parameters (JSON)
    rate_limit_per_minute: int = 30
    heartbeat_seconds: float = 2.0  # also how soon a running job notices a cancel
    stale_seconds: float = 30.0  # a running job without a heartbeat this long is resumed elsewhere
    max_attempts: int = 3  # a job whose worker died this often is failed, not retried again
    poll_seconds: float = 1.0  # idle worker / SSE polling interval
    gpu_memory: int | str | None = None  # bytes or a size ("24GB"): the workers' GPU, for the memory plan
    host_memory: int | str | None = None  # the workers' host memory; neither set: the API does not plan
    ray_address: str | None = None  # workers dispatch their jobs to this Ray cluster (service/ray_dispatch.py)
    ray_jobs: int = 4  # with ray_address: jobs running at once (dispatcher processes `serve` starts)

    def __post_init__(self):
        object.__setattr__(self, "artifacts", Path(self.artifacts))
        object.__setattr__(self, "model_roots", tuple(Path(p) for p in (self.model_roots or (Path.cwd(),))))
        object.__setattr__(self, "devices", tuple(self.devices))
        from core.errors import CheckpointError
        from merging.checkpoint import parse_size

        for name in ("gpu_memory", "host_memory"):
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, parse_size(value))
                except CheckpointError:
                    raise ValueError(f"{name}: {value!r} is not a size such as 24GB or 32GiB") from None
        if self.ray_jobs < 1:
            raise ValueError(f"ray_jobs: at least 1 job at a time, got {self.ray_jobs}")
        art = self.artifacts.resolve()
        for root in self.model_roots:  # paths in the artifacts folder are never inputs (service.schemas)
            if root.resolve().is_relative_to(art):
                raise ValueError(f"model root {root} lies in the artifacts folder {self.artifacts}: "
                                 "no model under it could be used; keep models outside the artifacts")

    @property
    def database_url(self) -> str:
        """`db_url`, or an SQLite file in the artifacts folder when none is set."""
        return self.db_url or f"sqlite:///{self.artifacts.absolute() / 'evomerge.db'}"

    @property
    def auth(self) -> bool:
        return bool(self.tokens)

    def job_dir(self, job_id: str) -> Path:
        """Where a job's outputs live: model/ (merge), search/ (evolve), exports/ (download tars)."""
        return self.artifacts / "jobs" / job_id

    @property
    def benchmark_dir(self) -> Path:
        return self.artifacts / "benchmarks"

    def with_(self, **changes) -> "Settings":
        """A copy with the non-None `changes` applied (CLI flags override the environment)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        tokens = parse_tokens(env.get("EVOMERGE_TOKENS", ""))
        if env.get("EVOMERGE_TOKEN_FILE"):
            tokens.update(parse_tokens(Path(env["EVOMERGE_TOKEN_FILE"]).read_text()))
        return cls(
            db_url=env.get("EVOMERGE_DB", ""),
            artifacts=Path(env.get("EVOMERGE_ARTIFACTS", "artifacts")),
            model_roots=tuple(Path(p) for p in _split(env.get("EVOMERGE_MODEL_ROOTS"), os.pathsep)),
            devices=tuple(d.strip() for d in _split(env.get("EVOMERGE_DEVICES"), ",")),
            tokens=tokens,
            rate_limit_per_minute=int(env.get("EVOMERGE_RATE_LIMIT", "30")),
            gpu_memory=env.get("EVOMERGE_GPU_MEMORY") or None,
            host_memory=env.get("EVOMERGE_HOST_MEMORY") or None,
            ray_address=env.get("EVOMERGE_RAY_ADDRESS") or None,
            ray_jobs=int(env.get("EVOMERGE_RAY_JOBS", "4")),
        )

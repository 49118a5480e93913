"""The job store: jobs, their progress events, result candidates and uploaded benchmarks.

SQLAlchemy 2 over SQLite by default (one file; WAL so the API reads while a worker
writes, and a busy timeout instead of "database is locked" errors), or any SQLAlchemy URL
(Postgres) when API and workers run on several machines. The schema is created on start.

Every state change that two processes might race on is a conditional UPDATE whose
rowcount says who won: claiming a queued job, finishing it (only by the worker that holds
it), cancelling, and requeueing a job whose worker stopped heartbeating.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Iterable

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict] = mapped_column(JSON)
    device: Mapped[str] = mapped_column(String(32))  # as the spec asks: auto, cpu, cuda, cuda:N
    worker: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far; >1 means resumed
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict | None] = mapped_column(JSON)  # the latest progress event
    evaluations: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict | None] = mapped_column(JSON)  # knee, hypervolume, objectives
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    ts: Mapped[float] = mapped_column(Float)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict] = mapped_column(JSON)


class CandidateRow(Base):
    __tablename__ = "candidates"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    cid: Mapped[int] = mapped_column(Integer, primary_key=True)
    on_front: Mapped[bool] = mapped_column(Boolean, default=True)
    params: Mapped[Any] = mapped_column(JSON)
    objectives: Mapped[dict] = mapped_column(JSON)
    true_objectives: Mapped[dict | None] = mapped_column(JSON)
    sd: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # each estimate's sd, where reported


class BenchmarkRow(Base):
    __tablename__ = "benchmarks"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    items: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def _add_missing_columns(engine) -> None:
    """Brings a database made by an older evomerge up to the tables above: columns added since
    (nullable ones only, e.g. candidates.sd) are added with ALTER TABLE; nothing is dropped."""
    from sqlalchemy import inspect, text

    have = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in have.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present and column.nullable:
                    kind = column.type.compile(dialect=engine.dialect)
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def _create_schema(engine, tries: int = 5) -> None:
    """Creates the missing tables and columns. Processes started together on a new database race
    to create each table: the loser's CREATE fails (SQLite: "table already exists", PostgreSQL: a
    unique violation in pg_type), and another look finds the table the winner made."""
    from sqlalchemy.exc import DBAPIError

    for attempt in range(tries):
        try:
            Base.metadata.create_all(engine)
            _add_missing_columns(engine)
            return
        except DBAPIError:
            if attempt == tries - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


class Store:
    """All database access; each method is one short transaction."""

    def __init__(self, url: str):
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                from pathlib import Path
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        _create_schema(self.engine)
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # -- jobs ---------------------------------------------------------------------------------
    def add_job(self, kind: str, spec: dict, device: str, owner: str | None) -> Job:
        job = Job(id=new_id(), owner=owner, kind=kind, status="queued", spec=spec, device=device, attempts=0,
                  cancel_requested=False, evaluations=0, created_at=time.time())
        with self.session.begin() as s:
            s.add(job)
            s.flush()  # the event's foreign key needs the job row first
            s.add(Event(job_id=job.id, ts=job.created_at, type="status", data={"type": "status", "status": "queued"}))
        return job

    def get_job(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def list_jobs(self, owner: str | None = None, status: str | None = None, limit: int = 50,
                  offset: int = 0) -> tuple[list[Job], int]:
        """Newest first; `owner=None` lists everyone's. Returns (page, total)."""
        q = select(Job)
        if owner is not None:
            q = q.where(Job.owner == owner)
        if status is not None:
            q = q.where(Job.status == status)
        with self.session() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = s.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
        return list(rows), int(total or 0)

    def cancel(self, job_id: str) -> str:
        """Cancels a queued job at once; asks the worker to stop a running one. Returns the new status."""
        now = time.time()
        with self.session.begin() as s:
            r = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                          .values(status="cancelled", cancel_requested=True, finished_at=now))
            if r.rowcount == 1:
                s.add(Event(job_id=job_id, ts=now, type="status", data={"type": "status", "status": "cancelled"}))
                return "cancelled"
            s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))
            return s.get(Job, job_id).status

    def claim(self, worker: str, device: str) -> Job | None:
        """Takes the oldest queued job this device may run; None when there is none.

        A worker on `cuda:1` serves specs asking for auto, cuda or cuda:1, a Ray dispatcher
        (`ray`) every spec; the conditional UPDATE makes sure exactly one worker wins each job."""
        kinds = {"auto", device, device.split(":")[0]}
        if device == "cuda":
            kinds.add("cuda:0")
        while True:
            with self.session() as s:
                query = select(Job.id).where(Job.status == "queued")
                if device != "ray":
                    query = query.where(Job.device.in_(kinds))
                job_id = s.scalar(query.order_by(Job.created_at, Job.id).limit(1))
            if job_id is None:
                return None
            now = time.time()
            with self.session.begin() as s:
                r = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                              .values(status="running", worker=worker, attempts=Job.attempts + 1,
                                      started_at=now, heartbeat_at=now, error=None))
                if r.rowcount == 1:
                    s.add(Event(job_id=job_id, ts=now, type="status",
                                data={"type": "status", "status": "running", "worker": worker}))
            if r.rowcount == 1:
                return self.get_job(job_id)

    def heartbeat(self, job_id: str, worker: str) -> tuple[bool, bool]:
        """Refreshes the lease. Returns (still ours, cancel requested)."""
        with self.session.begin() as s:
            r = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                          .values(heartbeat_at=time.time()))
            cancel = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
        return r.rowcount == 1, bool(cancel)

    def finish(self, job_id: str, worker: str, status: str, error: str | None = None,
               result: dict | None = None) -> bool:
        """Ends a job this worker holds (`status` in TERMINAL) or puts it back in the queue."""
        now = time.time()
        values: dict[str, Any] = {"status": status, "error": error}
        if status == "queued":
            values.update(worker=None, heartbeat_at=None)
        else:
            values.update(finished_at=now)
        if result is not None:
            values["result"] = result
        with self.session.begin() as s:
            r = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                          .values(**values))
            if r.rowcount == 1:
                data = {"type": "status", "status": status}
                if error:
                    data["error"] = error
                s.add(Event(job_id=job_id, ts=now, type="status", data=data))
        return r.rowcount == 1

    def requeue_stale(self, stale_seconds: float, max_attempts: int) -> list[str]:
        """Jobs whose worker stopped heartbeating go back to the queue (or fail after too many tries)."""
        cutoff = time.time() - stale_seconds
        with self.session() as s:
            stale = s.execute(select(Job.id, Job.attempts, Job.worker, Job.cancel_requested)
                              .where(Job.status == "running", Job.heartbeat_at < cutoff)).all()
        moved = []
        for job_id, attempts, worker, cancel in stale:
            now = time.time()
            if cancel:
                status, error = "cancelled", None
            elif attempts >= max_attempts:
                status, error = "failed", f"the worker died {attempts} times while running this job; not retried"
            else:
                status, error = "queued", None
            values: dict[str, Any] = {"status": status, "error": error, "worker": None}
            if status != "queued":
                values["finished_at"] = now
            with self.session.begin() as s:
                r = s.execute(update(Job).where(Job.id == job_id, Job.status == "running", Job.worker == worker,
                                                Job.heartbeat_at < cutoff).values(**values))
                if r.rowcount == 1:
                    data = {"type": "status", "status": status, "reason": f"worker {worker} stopped heartbeating"}
                    if error:
                        data["error"] = error
                    s.add(Event(job_id=job_id, ts=now, type="status", data=data))
                    moved.append(job_id)
        return moved

    # -- events -------------------------------------------------------------------------------
    def add_event(self, job_id: str, data: dict) -> None:
        """Appends a worker event; a progress event also becomes the job's current progress."""
        now = time.time()
        with self.session.begin() as s:
            s.add(Event(job_id=job_id, ts=now, type=str(data.get("type", "event")), data=data))
            if data.get("type") == "progress":
                values: dict[str, Any] = {"progress": data}
                if isinstance(data.get("evaluations"), int):
                    values["evaluations"] = data["evaluations"]
                s.execute(update(Job).where(Job.id == job_id).values(**values))

    def events_after(self, job_id: str, after: int = 0, limit: int = 500) -> list[Event]:
        with self.session() as s:
            return list(s.scalars(select(Event).where(Event.job_id == job_id, Event.id > after)
                                  .order_by(Event.id).limit(limit)).all())

    # -- candidates ---------------------------------------------------------------------------
    def set_candidates(self, job_id: str, candidates: Iterable[dict]) -> None:
        with self.session.begin() as s:
            s.execute(delete(CandidateRow).where(CandidateRow.job_id == job_id))
            for c in candidates:
                s.add(CandidateRow(job_id=job_id, cid=int(c["id"]), on_front=bool(c.get("on_front", True)),
                                   params=c.get("params"), objectives=c.get("objectives") or {},
                                   true_objectives=c.get("true_objectives"), sd=c.get("sd")))

    def candidates(self, job_id: str) -> list[CandidateRow]:
        with self.session() as s:
            return list(s.scalars(select(CandidateRow).where(CandidateRow.job_id == job_id)
                                  .order_by(CandidateRow.cid)).all())

    def candidate(self, job_id: str, cid: int) -> CandidateRow | None:
        with self.session() as s:
            return s.get(CandidateRow, (job_id, cid))

    # -- benchmarks ---------------------------------------------------------------------------
    def put_benchmark(self, row: BenchmarkRow) -> None:
        with self.session.begin() as s:
            s.merge(row)

    def get_benchmark(self, name: str) -> BenchmarkRow | None:
        with self.session() as s:
            return s.get(BenchmarkRow, name)

    def list_benchmarks(self) -> list[BenchmarkRow]:
        with self.session() as s:
            return list(s.scalars(select(BenchmarkRow).order_by(BenchmarkRow.name)).all())

    # -- metrics (owner None: every job) -------------------------------------------------------
    def counts_by_status(self, owner: str | None = None) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(_owned(select(Job.status, func.count()), owner).group_by(Job.status)).all()
        out = {k: 0 for k in STATES}
        out.update({k: int(v) for k, v in rows})
        return out

    def total_evaluations(self, owner: str | None = None) -> int:
        with self.session() as s:
            return int(s.scalar(_owned(select(func.coalesce(func.sum(Job.evaluations), 0)), owner)) or 0)

    def running_progress(self, owner: str | None = None) -> list[tuple[str, dict]]:
        """(job id, latest progress event) of every running job that has reported progress."""
        with self.session() as s:
            rows = s.execute(_owned(select(Job.id, Job.progress), owner)
                             .where(Job.status == "running", Job.progress.is_not(None))).all()
        return [(job_id, progress) for job_id, progress in rows if isinstance(progress, dict)]

    def durations(self, owner: str | None = None) -> list[tuple[str, float]]:
        """(kind, seconds from start to end) of every finished job that ran."""
        with self.session() as s:
            rows = s.execute(_owned(select(Job.kind, Job.finished_at - Job.started_at), owner)
                             .where(Job.finished_at.is_not(None), Job.started_at.is_not(None))).all()
        return [(k, float(d)) for k, d in rows if d is not None]


def _owned(query, owner: str | None):
    return query if owner is None else query.where(Job.owner == owner)

"""The worker: a process per device that claims queued jobs and runs them one at a time.

A worker loops: claim the oldest job its device may run (an atomic conditional UPDATE in
the store), run it with a heartbeat thread holding the lease, store the outcome, repeat.
While a job runs, `should_stop()` turns true when the user cancels it, when the worker is
asked to shut down (SIGTERM/SIGINT: the job goes back to the queue), or when the lease is
lost; merges check it between tensors, searches between evaluations.

A worker that dies (SIGKILL, OOM, power) stops heartbeating; every worker puts such stale jobs
back in the queue before it claims a job (at most every stale_seconds / 2) and whenever it is
idle. A resumed evolve job continues from its last generation checkpoint (`resume=True`), a
merge simply runs again (an ATM merge resumes from its last finished iteration, kept beside
job_dir/model). A job that
raises ends `failed` with a one-line message and the worker carries on with the next one.

Run it with `evomerge worker --device cuda:0` or `python -m service.worker --device cpu`.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from core.hooks import Hooks, Stopped

from .config import Settings
from .jobs import jsonable, one_line, run_evolve, run_merge
from .store import Job, Store

log = logging.getLogger("evomerge.worker")


class Lease(threading.Thread):
    """Heartbeats a running job and notices cancellation or a lost lease."""

    def __init__(self, store: Store, job_id: str, worker: str, interval: float):
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.store, self.job_id, self.worker, self.interval = store, job_id, worker, interval
        self.cancelled, self.lost, self._done = threading.Event(), threading.Event(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                ours, cancel = self.store.heartbeat(self.job_id, self.worker)
            except Exception as e:  # a busy or unreachable database: try again next beat
                log.warning("heartbeat for %s failed: %s", self.job_id, one_line(e))
                continue
            if cancel:
                self.cancelled.set()
            if not ours:
                self.lost.set()

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


class Worker:
    """Serves one device; `serve_forever()` until SIGTERM/SIGINT (or its parent process exits)."""

    def __init__(self, settings: Settings, device: str, store: Store | None = None, parent_pid: int | None = None):
        """`device`: cpu, cuda or cuda:N; with `settings.ray_address` the worker claims jobs of any
        device and runs them on that Ray cluster (service/ray_dispatch.py)."""
        self.settings, self.ray_address = settings, settings.ray_address
        self.device = "ray" if self.ray_address else device
        self.store = store or Store(settings.database_url)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{self.device}"
        self.parent_pid = parent_pid
        self.stopping = threading.Event()

    def serve_forever(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        if self.ray_address:
            from evolve.execution import connect

            connect(self.ray_address, "--ray-address")
        log.info("worker %s serving %s", self.id, self.settings.database_url)
        checked = -math.inf
        while not self.stopping.is_set():
            if self.parent_pid and os.getppid() != self.parent_pid:
                log.info("parent process exited; stopping")
                break
            if time.monotonic() - checked >= self.settings.stale_seconds / 2:  # a busy queue too: lost jobs first
                self.requeue_stale()
                checked = time.monotonic()
            try:
                job = self.store.claim(self.id, self.device)
            except Exception as e:  # the database is busy or away: wait and retry
                log.warning("claim failed: %s", one_line(e))
                job = None
            if job is None:
                self.requeue_stale()
                checked = time.monotonic()
                self.stopping.wait(self.settings.poll_seconds)
                continue
            self.execute(job)
        log.info("worker %s stopped", self.id)

    def requeue_stale(self) -> None:
        try:
            for job_id in self.store.requeue_stale(self.settings.stale_seconds, self.settings.max_attempts):
                log.info("job %s lost its worker; back in the queue", job_id)
        except Exception as e:
            log.warning("stale-job check failed: %s", one_line(e))

    def execute(self, job: Job) -> str:
        """Runs a claimed job to its end and records the outcome; returns the final status."""
        log.info("running job %s (%s, attempt %d)", job.id, job.kind, job.attempts)
        lease = Lease(self.store, job.id, self.id, self.settings.heartbeat_seconds)
        lease.start()

        def should_stop() -> bool:
            return lease.cancelled.is_set() or lease.lost.is_set() or self.stopping.is_set()

        def emit(data: dict) -> None:
            try:
                self.store.add_event(job.id, jsonable(data))
            except Exception as e:  # progress is best effort; the job goes on
                log.warning("event for %s not stored: %s", job.id, one_line(e))

        error, stopped = None, False
        try:
            from .schemas import parse_spec

            spec = parse_spec(job.spec)
            job_dir = self.settings.job_dir(job.id)
            job_dir.mkdir(parents=True, exist_ok=True)
            hooks = Hooks(emit, should_stop)
            if self.ray_address:  # the work runs on the cluster; the lease, queue and outcome stay here
                from .ray_dispatch import run_on_ray

                candidates, summary, complete = run_on_ray(self.settings, job, spec, should_stop, job.attempts > 1)
                stopped = not complete
            elif job.kind in ("merge", "mergekit"):
                spec = spec.model_copy(update={"device": self.device})  # claim() matched them
                candidates, summary = run_merge(spec, job_dir, hooks)
            else:  # a search returns early when asked to stop
                spec = spec.model_copy(update={"device": self.device})
                candidates, summary, complete = run_evolve(spec, job_dir, hooks, resume=job.attempts > 1)
                stopped = not complete
            self.store.set_candidates(job.id, candidates)
        except Stopped:
            stopped, summary = True, None
        except Exception as e:
            error, summary = one_line(e), None
            log.exception("job %s failed", job.id)
        finally:
            lease.stop()
            _free_device_memory()
        if lease.lost.is_set():
            log.info("job %s was taken over by another worker", job.id)
            return "lost"
        try:
            if error is not None:
                status = "failed"
            elif stopped:
                cancel = lease.cancelled.is_set() or self.store.heartbeat(job.id, self.id)[1]
                status = "cancelled" if cancel else "queued"  # shut down mid-job: another start resumes it
            else:
                status = "succeeded"
            self.store.finish(job.id, self.id, status, error=error, result=summary)
        except Exception as e:  # the store is away: the stale-heartbeat check will requeue the job
            log.error("outcome of job %s not recorded: %s", job.id, one_line(e))
            return "unrecorded"
        log.info("job %s %s", job.id, status)
        return status


def _free_device_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_worker(db_url: str | None = None, artifacts: str | os.PathLike | None = None, device: str = "cpu",
               settings: Settings | None = None, parent_pid: int | None = None, ray_address: str | None = None) -> None:
    """Runs a worker in this process until SIGTERM/SIGINT; what `evomerge worker` calls."""
    settings = (settings or Settings.from_env()).with_(db_url=db_url, artifacts=Path(artifacts) if artifacts else None,
                                                       ray_address=ray_address)
    Worker(settings, device, parent_pid=parent_pid).serve_forever()


def worker_command(settings: Settings, device: str, parent_pid: int | None = None) -> list[str]:
    """The command line that starts a worker process with these settings (used by `serve`)."""
    cmd = [sys.executable, "-m", "service.worker", "--db", settings.database_url,
           "--artifacts", str(settings.artifacts.absolute()), "--device", device,
           "--heartbeat", str(settings.heartbeat_seconds), "--stale", str(settings.stale_seconds),
           "--poll", str(settings.poll_seconds)]
    if parent_pid:
        cmd += ["--parent-pid", str(parent_pid)]
    if settings.ray_address:
        cmd += ["--ray-address", settings.ray_address]
    return cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.worker", description="Runs evomerge jobs on one device.")
    ap.add_argument("--db", help="SQLAlchemy URL of the job store (default: $EVOMERGE_DB)")
    ap.add_argument("--artifacts", help="artifacts folder (default: $EVOMERGE_ARTIFACTS)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--heartbeat", type=float, help="seconds between heartbeats")
    ap.add_argument("--stale", type=float, help="seconds without heartbeat after which a job is resumed elsewhere")
    ap.add_argument("--poll", type=float, help="seconds between queue polls when idle")
    ap.add_argument("--parent-pid", type=int, help="exit when this process is no longer the parent")
    ap.add_argument("--ray-address", help="run the jobs on this Ray cluster (default: $EVOMERGE_RAY_ADDRESS)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env().with_(db_url=args.db, artifacts=Path(args.artifacts) if args.artifacts else None,
                                         heartbeat_seconds=args.heartbeat, stale_seconds=args.stale,
                                         poll_seconds=args.poll, ray_address=args.ray_address)
    Worker(settings, args.device, parent_pid=args.parent_pid).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

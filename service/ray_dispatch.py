"""A claimed job run as a Ray task (`evomerge serve --ray-address ADDR`), so that a cluster runs
several jobs at once, each where its resources are.

The worker process keeps everything the queue's semantics rest on: it claims the job, holds the
lease with its heartbeat, notices cancellation or shutdown, and records the outcome. Only the
work moves: `run_job` executes on a cluster node with the job's resources (`job_resources`: a
GPU for a job whose device is cuda, or auto on a cluster with GPUs; none for the driver of an
evolve job whose evaluators are themselves Ray actors; the memory plan's host bytes), writes its
outputs to the shared artifacts folder and its events to the store directly. The worker asks it
to stop through a `StopFlag` actor; the task stops where a local job would (between tensors or
candidates) and returns. A worker that dies takes its tasks with it (Ray ends the tasks of a
dead driver), and the stale-heartbeat check requeues the job as on one machine.

Every node needs evomerge with the ray extra, the artifacts folder and the model roots at the
same paths, and a database it can reach (PostgreSQL for several machines; SQLite only when the
cluster is this one machine).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

POLL_SECONDS = 0.5


class StopFlag:
    """A Ray actor the worker sets when its job should stop (cancel, shutdown, lease lost)."""

    def __init__(self):
        self.stop = False

    def set(self) -> None:
        self.stop = True

    def is_set(self) -> bool:
        return self.stop


def job_resources(spec) -> dict[str, Any]:
    """Ray resources of the task that runs `spec` (see the module docstring)."""
    from evolve.execution import wants_gpu

    evolve = getattr(spec, "kind", "merge") == "evolve"
    remote_evaluators = evolve and spec.execution.backend == "ray"
    # a driver whose evaluators are actors only fits IRT and asks the search between their tasks
    out: dict[str, Any] = {"num_cpus": 0 if remote_evaluators else 1,
                           "num_gpus": 1 if wants_gpu(spec.device) and not remote_evaluators else 0}
    if evolve and not remote_evaluators:
        from evolve.plan import plan_job

        plan = plan_job(spec, gpu_memory=math.inf, host_memory=math.inf, device="cuda" if out["num_gpus"] else "cpu")
        out["memory"] = plan.totals["host"]
    return out


def run_job(kind: str, spec_data: dict, job_dir: str, resume: bool, db_url: str, job_id: str, flag, gpus: int):
    """The Ray task: the job's work as the worker would do it, events straight to the store."""
    from core.hooks import Hooks

    from .jobs import jsonable, run_evolve, run_merge
    from .schemas import parse_spec
    from .store import Store

    spec = parse_spec(spec_data)
    if not (kind == "evolve" and spec.execution.backend == "ray"):
        spec = spec.model_copy(update={"device": "cuda" if gpus else "cpu"})
    store = Store(db_url)
    last = {"t": 0.0, "stop": False}

    def should_stop() -> bool:
        import ray

        if not last["stop"] and time.monotonic() - last["t"] >= POLL_SECONDS:
            last["t"], last["stop"] = time.monotonic(), ray.get(flag.is_set.remote())
        return last["stop"]

    hooks = Hooks(lambda data: store.add_event(job_id, jsonable(data)), should_stop)
    try:
        if kind in ("merge", "mergekit"):
            candidates, summary = run_merge(spec, Path(job_dir), hooks)
            return candidates, summary, True
        return run_evolve(spec, Path(job_dir), hooks, resume=resume)
    finally:
        store.close()


def run_on_ray(settings, job, spec, should_stop: Callable[[], bool], resume: bool):
    """Runs `job` as a Ray task and waits for it, raising its own error (as the local run would).
    Returns (candidates, summary, complete)."""
    import ray

    resources = job_resources(spec)
    flag = ray.remote(StopFlag).options(num_cpus=0).remote()
    task = ray.remote(run_job).options(max_retries=0, **resources)
    ref = task.remote(job.kind, job.spec, str(settings.job_dir(job.id).absolute()), resume,
                      settings.database_url, job.id, flag, resources["num_gpus"])
    try:
        asked = False
        while not ray.wait([ref], timeout=POLL_SECONDS)[0]:
            if should_stop() and not asked:
                flag.set.remote()
                asked = True
        from ray.exceptions import RayTaskError

        try:
            return ray.get(ref)
        except RayTaskError as e:
            raise e.as_instanceof_cause() from None
    finally:
        ray.kill(flag)

"""Where a job's evaluations run: in this process (`local`) or on Ray actors (`ray`).

An evolve job's evaluations are independent tasks: an endpoint's full answers, a probe's, a
candidate's estimated objectives, a front member's true ones. Each needs the job's resident
merge (`evolve.evaluator.Evaluator`: base, task-vector store and model, loaded once per process).
`LocalPool` runs the tasks one after another on one evaluator in this process; `RayPool` holds N
evaluators as Ray actors (Moritz et al. 2018, "Ray: A Distributed Framework for Emerging AI
Applications"), each with its own resident merge, its GPUs and its host-memory reservation from
the job's memory plan, and hands every idle actor the next task. Both yield `(index, result)` as
tasks finish; the caller puts results back in task order, so a run is the same for any number
of evaluators.

An actor that dies (its process killed, its node lost) is replaced by a new one, set up as the
first was, and its task retried once; a task that kills a second actor fails the job with the
actor's error. An exception raised by the task itself (a bad input) or by an actor's constructor
(a memory plan that does not fit its node) fails the job at once, as it would locally.
"""
from __future__ import annotations

import importlib.util
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

RAY_MISSING = "execution.backend: ray is not installed here (pip install 'evomerge[ray]')"


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


@dataclass
class EvaluatorStats:
    """What one evaluator did: tasks and their seconds by kind (the driver's clock, dispatch to
    result), and how often it was replaced."""

    tasks: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    replaced: int = 0

    def add(self, method: str, seconds: float) -> None:
        self.tasks[method] = self.tasks.get(method, 0) + 1
        self.seconds[method] = self.seconds.get(method, 0.0) + seconds

    def to_json(self, i: int) -> dict[str, Any]:
        n, busy = self.tasks.get("estimate", 0), self.seconds.get("estimate", 0.0)
        return {"evaluator": i, "tasks": dict(self.tasks), "candidates": n,
                "busy_seconds": round(sum(self.seconds.values()), 3), "candidate_seconds": round(busy, 3),
                "candidates_per_minute": round(60 * n / busy, 3) if busy and n else None, "replaced": self.replaced}


class LocalPool:
    """Every task in this process, one after another, on one evaluator object."""

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.stats = [EvaluatorStats()]

    def __len__(self) -> int:
        return 1

    def broadcast(self, method: str, *args) -> None:
        getattr(self.evaluator, method)(*args)

    def imap(self, method: str, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        for i, args in enumerate(tasks):
            t0 = time.perf_counter()
            result = getattr(self.evaluator, method)(*args)
            self.stats[0].add(method, time.perf_counter() - t0)
            yield i, result

    def describe(self) -> list[dict[str, Any]]:
        return [s.to_json(i) for i, s in enumerate(self.stats)]

    def close(self) -> None:
        pass


class RayPool:
    """N actors of `actor_class(*args)`, created with `options` (num_cpus, num_gpus, memory).
    `broadcast` calls a method on every actor and remembers it, so that a replacement actor is
    brought to the same state before it takes a task."""

    def __init__(self, actor_class, args: tuple, n: int, options: dict[str, Any]):
        import ray

        self.ray, self.tag = ray, uuid.uuid4().hex[:8]
        self.remote_class = ray.remote(actor_class)
        self.options, self.args, self.setup_calls = dict(options, max_restarts=0), args, []
        self.stats = [EvaluatorStats() for _ in range(n)]
        self.actors = [self._start(slot) for slot in range(n)]

    def _start(self, slot: int):
        """A new actor for `slot`, named evomerge-TAG-SLOT-GENERATION (what `ray list actors` shows)."""
        name = f"evomerge-{self.tag}-{slot}-{self.stats[slot].replaced}"
        return self.remote_class.options(name=name, **self.options).remote(*self.args)

    def __len__(self) -> int:
        return len(self.actors)

    def broadcast(self, method: str, *args) -> None:
        refs = [self.ray.put(a) for a in args]  # one copy in the object store for every actor
        self.setup_calls.append((method, refs))
        self._get([getattr(a, method).remote(*refs) for a in self.actors])

    def _get(self, refs):
        from ray.exceptions import RayTaskError

        try:
            return self.ray.get(refs)
        except RayTaskError as e:  # the task's own error, as the job reports it locally
            raise e.as_instanceof_cause() from None

    def _replace(self, slot: int) -> None:
        self.ray.kill(self.actors[slot], no_restart=True)
        self.stats[slot].replaced += 1
        actor = self._start(slot)
        self._get([getattr(actor, m).remote(*refs) for m, refs in self.setup_calls])
        self.actors[slot] = actor

    def imap(self, method: str, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        pending = deque(enumerate(tasks))
        idle = deque(range(len(self.actors)))
        running: dict[Any, tuple[int, int, tuple, float]] = {}
        failures: dict[int, int] = {}
        while pending or running:
            while pending and idle:
                slot, (i, args) = idle.popleft(), pending.popleft()
                running[getattr(self.actors[slot], method).remote(*args)] = (slot, i, args, time.perf_counter())
            [ref], _ = self.ray.wait(list(running), num_returns=1)
            slot, i, args, t0 = running.pop(ref)
            try:
                result = self._get(ref)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                if getattr(e, "actor_init_failed", False):  # its constructor raised: another try raises again
                    raise ValueError(f"evaluator {slot} could not start: {_last_line(str(e))}") from None
                failures[i] = failures.get(i, 0) + 1
                if failures[i] > 1:
                    raise RuntimeError(f"evaluator {slot} died twice on the same {method} task: "
                                       f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                                       ) from None
                self._replace(slot)
                pending.appendleft((i, args))
                idle.append(slot)
                continue
            self.stats[slot].add(method, time.perf_counter() - t0)
            idle.append(slot)
            yield i, result

    def describe(self) -> list[dict[str, Any]]:
        return [s.to_json(i) for i, s in enumerate(self.stats)]

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []


def _last_line(text: str) -> str:
    """The exception line of a remote traceback, without its `module.Type: ` prefix."""
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    last = lines[-1] if lines else text
    return re.sub(r"^[\w.]+(?:Error|Exception): ", "", last)


def connect(address: str, field: str = "execution.address") -> None:
    """Joins the Ray cluster at `address` (auto: the one this machine runs or RAY_ADDRESS names;
    local: a new one on this machine; ray://HOST:PORT or HOST:PORT) unless this process already
    is in one (a test's `ray.init`, or a service job running as a Ray task); `field` names the
    setting in the error when there is no cluster there."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 logging_level="warning", log_to_driver=False)
    except ConnectionError as e:
        raise ValueError(f"{field}: no Ray cluster at {address} ({str(e).splitlines()[0]})") from None


def wants_gpu(device: str) -> bool:
    """Whether work on `device` takes a GPU of the cluster: cuda, or auto where the cluster has GPUs."""
    import ray

    return device.startswith("cuda") or (device == "auto" and bool(ray.cluster_resources().get("GPU")))


def open_pool(execution, actor_class, args: tuple, *, host_bytes: int, local: Callable[[], Any]):
    """The evaluators an `execution` spec asks for: `local()` in this process, or Ray actors of
    `actor_class(*args)`, each reserving its GPUs, CPUs and `host_bytes` of memory."""
    if execution.backend == "local":
        return LocalPool(local())
    if not ray_available():
        raise ValueError(RAY_MISSING)
    import ray

    connect(execution.address)
    gpus, cpus, n = execution.gpus_per_evaluator, execution.cpus_per_evaluator, execution.evaluators
    have = ray.cluster_resources()
    for name, need, what in (("GPU", gpus, "gpus_per_evaluator"), ("CPU", cpus, "cpus_per_evaluator")):
        if need and have.get(name, 0) < need:
            raise ValueError(f"execution.{what}: an evaluator needs {need:g} {name}s; the Ray cluster has "
                             f"{have.get(name, 0):g}")
    if host_bytes and have.get("memory", 0) < host_bytes:
        raise ValueError(f"execution.evaluators: an evaluator holds {host_bytes / 1e9:.1f} GB of host memory (the job's "
                         f"memory plan); the Ray cluster offers {have.get('memory', 0) / 1e9:.1f} GB")
    options = {"num_cpus": cpus, "num_gpus": gpus}
    if host_bytes:
        options["memory"] = int(host_bytes)
    return RayPool(actor_class, args, n, options)

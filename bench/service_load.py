#!/usr/bin/env python3
"""API responsiveness under polling load, with and without a job running (issue 6).

The claim under test: the service stays responsive while a job runs, because the job's
work happens in the worker process, not in the API's event loop. Two phases of the same
load are run against one real service in one run:

* idle (the baseline peer): no job running; the worker process polls the queue and
  finds nothing;
* load: an evolve job is running in the worker (CPU-bound: merging candidates and
  generating answers on the benchmarks).

What it does
------------
1. Reuses the tiny zoo (``zoo.build.build_zoo``; cached in ``.cache/zoo-tiny-seed0``, built
   on the CPU in minutes otherwise).
2. Starts the real service in a subprocess on a free loopback port:
   ``python -m service.cli serve --port P --artifacts DIR --model-root ZOO --devices cpu``
   (the API under uvicorn plus one CPU worker process), in a temporary folder.
3. Submits a small merge job (TIES over two zoo fine-tunes; about a second) and waits for
   it to succeed, so that the idle phase has a job to poll and a list that is not empty.
4. Idle phase: ``--clients`` concurrent clients (asyncio tasks sharing one
   ``httpx.AsyncClient`` with one keep-alive connection per client) each send, one at a
   time and back to back, ``GET /v1/jobs/{id}`` and ``GET /v1/jobs?limit=20`` alternately
   for ``--seconds``. Each client is bounded in time (no request starts after the phase's
   deadline), in count (``--max-requests`` per client) and per request (``--timeout``).
5. Submits an evolve job (TIES over two fine-tunes, NSGA-II, ``--population`` x
   ``--generations``, sized to outlast the phase) and waits until a worker runs it.
6. Load phase: the same load for ``--seconds``, polling the running job.
7. Cancels the job, stops the service (SIGTERM; the worker stops with it) and removes the
   temporary folder (``--keep`` keeps it, with ``service.log``).

What is measured
----------------
* latency: client-side wall time of each request (``time.perf_counter`` around
  ``await client.get``), i.e. connection wait + server time + reading the body; errors
  and timeouts are included with the time they took, so a stalled server cannot hide.
* requests/s: completed requests of a route over the phase's wall time (from the first
  request to the last client's last response).
* p50 / p99 / max: nearest-rank percentiles of those latencies, per route and for both
  routes together.
* errors: transport errors, timeouts and non-2xx answers.
* ratio: p99 under load / p99 idle, per route. Near 1 means the running job does not slow
  the API; the event loop is never blocked by the job.

Caveats: the load generator, the API server and the worker share this machine's CPU
cores (and, on a shared machine, with other processes), so the load phase also measures
CPU contention from the job, not only event-loop blocking. The job's state over the load
window is printed (status and evaluations before and after, and when it ended if it ended
early), so a job that finished before the window closed is visible; the window is then
reported as shortened.

Run it (about 2.5 minutes with the defaults):

    .venv/bin/python bench/service_load.py                      # 50 clients, 60 s per phase
    .venv/bin/python bench/service_load.py --seconds 20 --clients 10 --json bench/out/service_load.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROUTE_STATUS = "GET /v1/jobs/{id}"
ROUTE_LIST = "GET /v1/jobs?limit=20"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an ascending list; nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# -- the load ---------------------------------------------------------------------------------

async def one_client(http, job_id: str, deadline: float, max_requests: int, first: int,
                     samples: dict[str, list[float]], errors: dict[str, dict[str, int]]) -> None:
    routes = [(ROUTE_STATUS, f"/v1/jobs/{job_id}", None), (ROUTE_LIST, "/v1/jobs", {"limit": 20})]
    for i in range(max_requests):
        if time.perf_counter() >= deadline:
            return
        name, path, params = routes[(first + i) % 2]
        t0 = time.perf_counter()
        kind = None
        try:
            r = await http.get(path, params=params)
            await r.aread()
            if r.status_code >= 300:
                kind = f"HTTP {r.status_code}"
        except Exception as e:  # httpx.TimeoutException, ConnectError, ...
            kind = type(e).__name__
        samples[name].append(time.perf_counter() - t0)
        if kind:
            errors[name][kind] = errors[name].get(kind, 0) + 1


async def run_load(url: str, job_id: str, clients: int, seconds: float, max_requests: int,
                   timeout: float) -> dict:
    import httpx

    samples: dict[str, list[float]] = {ROUTE_STATUS: [], ROUTE_LIST: []}
    errors: dict[str, dict[str, int]] = {ROUTE_STATUS: {}, ROUTE_LIST: {}}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*(one_client(http, job_id, deadline, max_requests, c % 2, samples, errors)
                               for c in range(clients)))
        elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "samples": samples, "errors": errors}


def summarize(raw: dict) -> dict:
    rows = {}
    every: list[float] = []
    for name in (ROUTE_STATUS, ROUTE_LIST):
        lat = sorted(raw["samples"][name])
        every += lat
        rows[name] = _row(lat, sum(raw["errors"][name].values()), raw["elapsed"])
    rows["both routes"] = _row(sorted(every), sum(r["errors"] for r in rows.values()), raw["elapsed"])
    return {"elapsed_s": raw["elapsed"], "routes": rows,
            "error_kinds": {k: v for k, v in raw["errors"].items() if v}}


def _row(lat: list[float], n_errors: int, elapsed: float) -> dict:
    return {"requests": len(lat), "rps": len(lat) / elapsed if elapsed > 0 else math.nan,
            "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
            "max_ms": (lat[-1] * 1e3) if lat else math.nan, "errors": n_errors}


def print_table(phases: dict[str, dict]) -> None:
    head = f"{'phase':<6} {'route':<22} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7}"
    print(head)
    print("-" * len(head))
    for phase, s in phases.items():
        for name, r in s["routes"].items():
            print(f"{phase:<6} {name:<22} {r['requests']:>9} {r['rps']:>8.1f} {r['p50_ms']:>8.1f} "
                  f"{r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} {r['errors']:>7}")
        for name, kinds in s["error_kinds"].items():
            print(f"{'':<6} errors on {name}: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))


# -- the service --------------------------------------------------------------------------------

def start_service(port: int, work: Path, zoo: Path) -> subprocess.Popen:
    log = open(work / "service.log", "w")
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--artifacts", str(work / "artifacts"),
           "--model-root", str(zoo), "--devices", "cpu"]
    # its own session, so that the worker it spawns can be stopped with it if SIGTERM is not enough
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_service(proc: subprocess.Popen, grace: float = 40.0) -> None:
    if proc.poll() is None:
        proc.terminate()  # uvicorn exits, then serve() stops its worker (SIGTERM, SIGKILL after 15 s)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # anything of that session still alive (the worker, if the server died first)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(10)


def wait_healthy(client, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.health()
            return
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start; see {log}") from None
            time.sleep(0.3)


def wait_status(client, job_id: str, wanted: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.job(job_id)
        if job["status"] in wanted:
            return job
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
        time.sleep(0.2)


def specs(zoo: Path, manifest: dict, population: int, generations: int) -> tuple[dict, dict]:
    from service.demo import demo_spec

    tasks = list(manifest["benchmarks"])[:2]
    models = [{"name": t, "path": str(zoo / manifest["models"][t]["path"])} for t in tasks]
    merge = {"kind": "merge", "base": str(zoo / manifest["models"]["base"]["path"]), "models": models,
             "method": "ties", "params": {"density": 0.5}, "device": "cpu"}
    return merge, demo_spec(zoo, manifest, tasks, population, generations)


def last_stage(db: Path, job_id: str) -> str | None:
    """The job's latest `stage` event, read from the service's SQLite file (read-only)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT data FROM events WHERE job_id = ? AND type = 'stage' ORDER BY id DESC LIMIT 1",
                              (job_id,)).fetchone()
        finally:
            con.close()
        return json.loads(row[0]).get("stage") if row else None
    except Exception:
        return None


def job_state(job: dict, stage: str | None) -> str:
    p = job.get("progress") or {}
    where = f", generation {p['generation']}/{p['generations']}" if "generation" in p else ""
    return f"{job['status']}, stage {stage or '-'}, {job['evaluations']} evaluations{where}"


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of one process so far (from /proc); nan when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def child_pids(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def phase(url: str, job_id: str, args, api_pid: int, worker_pids: list[int]) -> dict:
    """One measured phase, plus the CPU time the API and the worker(s) used meanwhile."""
    c0 = cpu_seconds(api_pid), sum(cpu_seconds(p) for p in worker_pids)
    s = summarize(asyncio.run(run_load(url, job_id, args.clients, args.seconds, args.max_requests, args.timeout)))
    c1 = cpu_seconds(api_pid), sum(cpu_seconds(p) for p in worker_pids)
    s["cpu_s"] = {"api": c1[0] - c0[0], "worker": c1[1] - c0[1]}
    return s


# -- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each phase (idle, load)")
    ap.add_argument("--clients", type=int, default=50, help="concurrent polling clients")
    ap.add_argument("--max-requests", type=int, default=100_000, help="per client and phase")
    ap.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of unrecorded load before the idle phase")
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo-tiny-seed0")
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=500, help="enough to outlast --seconds; cancelled after")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (service.log, artifacts)")
    args = ap.parse_args(argv)

    from service.client import Client
    from zoo.build import build_zoo

    zoo = args.zoo.resolve()
    manifest = build_zoo(zoo, "tiny", 0, log=lambda m: print(f"[zoo] {m}", flush=True))
    merge_spec, evolve_spec = specs(zoo, manifest, args.population, args.generations)

    work = Path(tempfile.mkdtemp(prefix="service-load-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_service(port, work, zoo)
    client = Client(url, timeout=30)
    db = work / "artifacts" / "evomerge.db"
    evolve_id = None
    try:
        wait_healthy(client, proc, work / "service.log")
        print(f"service up at {url} (pid {proc.pid}, log {work / 'service.log'})", flush=True)

        merge_job = client.submit(merge_spec)
        wait_status(client, merge_job["id"], {"succeeded"}, 120)
        print(f"merge job {merge_job['id']} succeeded; the worker is idle", flush=True)

        if args.warmup > 0:
            asyncio.run(run_load(url, merge_job["id"], args.clients, args.warmup, args.max_requests, args.timeout))
        workers = child_pids(proc.pid)
        print(f"idle phase: {args.clients} clients for {args.seconds:g} s, no job running", flush=True)
        idle = phase(url, merge_job["id"], args, proc.pid, workers)

        job = client.submit(evolve_spec)
        evolve_id = job["id"]
        before = wait_status(client, evolve_id, {"running"}, 120)
        time.sleep(2.0)  # past the worker's spec parsing and imports, into the search
        before = client.job(evolve_id)
        stage0 = last_stage(db, evolve_id)
        print(f"load phase: {args.clients} clients for {args.seconds:g} s while evolve job {evolve_id} runs "
              f"({job_state(before, stage0)})", flush=True)
        w0 = time.time()
        load = phase(url, evolve_id, args, proc.pid, workers)
        w1 = time.time()
        after = client.job(evolve_id)
        stage1 = last_stage(db, evolve_id)
        running_s = (min(after["finished_at"], w1) - w0) if after.get("finished_at") else (w1 - w0)
        print(f"job after the load phase: {job_state(after, stage1)}", flush=True)
        if after["status"] != "running":
            print(f"NOTE: the job ended {after['status']} {max(running_s, 0):.1f} s into the "
                  f"{w1 - w0:.1f} s load window; the window with a job running was shortened to that", flush=True)
    finally:
        if evolve_id is not None:
            try:
                client.cancel(evolve_id)
            except Exception as e:
                print(f"cancel failed: {e}", file=sys.stderr)
        client.close()
        stop_service(proc)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{args.clients} clients, {args.seconds:g} s per phase; latency = client-side wall time per request")
    print_table({"idle": idle, "load": load})
    ratios = {name: load["routes"][name]["p99_ms"] / idle["routes"][name]["p99_ms"] for name in idle["routes"]}
    print("p99 under load / p99 idle: " + ", ".join(f"{name} {r:.2f}x" for name, r in ratios.items()))
    print(f"job during the load window: {job_state(before, stage0)} -> {job_state(after, stage1)}; "
          f"running for {max(running_s, 0):.1f} of {w1 - w0:.1f} s")
    print("CPU seconds used during each phase (of " + f"{os.cpu_count()} cores x {args.seconds:g} s): "
          + "; ".join(f"{name}: API {s['cpu_s']['api']:.1f}, worker {s['cpu_s']['worker']:.1f}"
                      for name, s in (("idle", idle), ("load", load))))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "clients": args.clients, "seconds": args.seconds, "idle": idle, "load": load, "p99_ratio": ratios,
            "job": {"before": {k: v for k, v in before.items() if k != "spec"},
                    "after": {k: v for k, v in after.items() if k != "spec"}, "running_s": running_s, "window_s": w1 - w0}},
            indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

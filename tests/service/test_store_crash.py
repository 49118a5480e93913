"""Exactly once under crashes: the job store shared by several API and worker processes, on
SQLite and on a real PostgreSQL server, while workers are SIGKILLed at random moments.

Two `evomerge serve --devices ''` API processes and two `service.worker` processes share one
store. 100 merge jobs are submitted over REST, half to each API; meanwhile a seeded chaos
thread SIGKILLs a worker at a random moment into the job it holds and starts a replacement
(so two workers keep running), and one API process is SIGKILLed and restarted. Every race in
the store is a conditional UPDATE whose rowcount decides; this test checks what that promises:

- all 100 jobs exist and succeeded, each with exactly one terminal status event;
- each job's status log is queued, then (running by W, requeued because W stopped
  heartbeating)*, then running by its final worker and succeeded: every requeue names a worker
  this test killed, after it was killed, and each killed worker lost at most one job. So a job
  never ran on two live workers (the dead one wrote nothing more), and `attempts` is 1 plus
  the number of times its worker was killed while holding it;
- no worker found its job taken over, and no job was logged as finished by two workers;
- each job's output folder holds the merge of its own weights (so no job wrote another's),
  and only jobs that were interrupted left a temporary folder behind.

A second test starts four processes on an empty database at once: each creates the schema,
and the ones that lose the race to create a table must still start.

The PostgreSQL server (Debian's `postgresql`, installed by scripts/test_system.sh) is started
in a temporary folder, as the `postgres` user when the tests run as root (initdb refuses
root), listening on a unix socket only; the test is skipped, naming what is missing, where it
cannot be installed or started.
"""
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from factories import SLOW_WORKER, family, free_port, state_dict, wait_for

from service.client import ApiError, Client
from service.config import Settings
from service.store import TERMINAL, Store
from service.worker import worker_command

pytestmark = pytest.mark.service

JOBS = 100
WORKER_KILLS = 6
SEED = 27
# Workers run as SLOW_WORKER: the merges are tiny, and without a delay per tensor the whole queue
# would drain in a few seconds, before a kill could land mid-job.
TENSOR_SECONDS = 0.025  # a merge of the tiny models' 21 tensors takes about half a second


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return family(tmp_path_factory.mktemp("models"))


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on a unix socket in a temporary folder; its SQLAlchemy URL."""
    initdbs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not initdbs:
        pytest.skip("PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb "
                    "(Debian's postgresql package; scripts/test_system.sh installs it)")
    bindir = initdbs[-1].parent
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser (util-linux) to start PostgreSQL as another user")
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the PostgreSQL server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
    if as_user:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data = root / "data"

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *cmd], check=False, capture_output=True, text=True, timeout=120)

    started = False
    try:
        r = run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "evomerge", "-E", "UTF8", "--no-sync")
        if r.returncode:
            pytest.skip(f"initdb ({bindir}) failed: {r.stderr.strip()[-500:]}")
        opts = (f"-k {root} -c listen_addresses='' -c max_connections=200 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
        r = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
                "-o", opts, "start")
        started = r.returncode == 0
        if not started:
            log = (root / "server.log").read_text()[-500:] if (root / "server.log").exists() else ""
            pytest.skip(f"the PostgreSQL server ({bindir}) did not start: {r.stderr.strip()[-300:]} {log}")
        r = run(str(bindir / "createdb"), "-h", str(root), "-U", "evomerge", "evomerge")
        assert r.returncode == 0, r.stderr
        yield f"postgresql+psycopg://evomerge@/evomerge?host={root}"
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'store.db'}"


class Cluster:
    """The processes of one test: API servers and workers, each logging to its own file."""

    def __init__(self, db_url: str, tmp: Path, models: Path):
        self.settings = Settings(db_url=db_url, artifacts=tmp / "artifacts", model_roots=(models,),
                                 heartbeat_seconds=0.25, stale_seconds=2.5, poll_seconds=0.2)
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.env = os.environ | {"EVOMERGE_CACHE": str(tmp / "cache"), "EVOMERGE_RATE_LIMIT": str(10 * JOBS),
                                 "OMP_NUM_THREADS": "1"}
        self.apis: list[tuple[subprocess.Popen, int]] = []
        self.workers: dict[str, subprocess.Popen] = {}  # by worker id, as the store names them
        self.procs: list[subprocess.Popen] = []
        self.log_files: dict[int, Path] = {}
        self.lock = threading.Lock()

    def _spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        path = self.logs / f"{name}-{len(self.procs)}.log"
        with open(path, "w") as log:
            p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        self.log_files[p.pid] = path
        return p

    def log(self, p: subprocess.Popen) -> str:
        return self.log_files[p.pid].read_text()

    def start_api(self, port: int | None = None) -> int:
        port = port or free_port()
        s = self.settings
        p = self._spawn([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                         "--db", s.database_url, "--artifacts", str(s.artifacts), "--model-root",
                         str(s.model_roots[0]), "--devices", ""], "api")
        self.apis.append((p, port))
        return port

    def wait_api(self, port: int) -> Client:
        p = next(p for p, q in reversed(self.apis) if q == port)
        client = Client(f"http://127.0.0.1:{port}", timeout=30)

        def up() -> bool:
            assert p.poll() is None, f"the API on port {port} exited: {self.log(p)[-2000:]}"
            try:
                return client.health()["status"] == "ok"
            except ApiError:
                return False

        wait_for(up, 60, f"the API on port {port} answering", every=0.2)
        return client

    def start_worker(self) -> str:
        cmd = worker_command(self.settings, "cpu")
        assert cmd[1:3] == ["-m", "service.worker"]
        p = self._spawn([sys.executable, "-c", SLOW_WORKER, str(TENSOR_SECONDS), *cmd[3:]], "worker")
        wid = f"{socket.gethostname()}:{p.pid}:cpu"
        with self.lock:
            self.workers[wid] = p
        return wid

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def weights(i: int) -> list[float]:
    return [round(0.1 + 0.8 * i / JOBS, 3), round(0.9 - 0.5 * i / JOBS, 3)]


def spec(i: int) -> dict:
    return {"kind": "merge", "base": "base", "models": [{"name": "math", "path": "math"}, {"name": "ja", "path": "ja"}],
            "method": "task_arithmetic", "params": {"weights": weights(i)}, "device": "cpu"}


class Chaos(threading.Thread):
    """SIGKILLs a random worker at a random moment into a job it holds, then starts another."""

    def __init__(self, cluster: Cluster, store: Store, rng: random.Random):
        super().__init__(name="chaos", daemon=True)
        self.cluster, self.store, self.rng = cluster, store, rng
        self.done = threading.Event()
        self.kills: dict[str, float] = {}  # worker id -> time just before its SIGKILL
        self.error: BaseException | None = None

    def held_job(self, wid: str):
        jobs, _ = self.store.list_jobs(status="running", limit=500)
        return next((j for j in jobs if j.worker == wid), None)

    def run(self) -> None:
        try:
            while len(self.kills) < WORKER_KILLS and not self.done.wait(self.rng.uniform(0.5, 3.0)):
                with self.cluster.lock:
                    live = sorted(w for w, p in self.cluster.workers.items() if w not in self.kills)
                victim = self.rng.choice(live)
                delay = self.rng.uniform(0.0, 21 * TENSOR_SECONDS)
                deadline = time.monotonic() + 30
                while not self.done.is_set() and time.monotonic() < deadline and self.held_job(victim) is None:
                    time.sleep(0.05)
                if self.done.wait(delay):
                    break
                job = self.held_job(victim)
                if job is not None and job.attempts >= self.cluster.settings.max_attempts - 1:
                    continue  # its last try is left alone, so that every job can succeed
                self.kills[victim] = time.time()
                proc = self.cluster.workers[victim]
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                self.cluster.start_worker()
        except BaseException as e:  # noqa: BLE001  (reported by the test)
            self.error = e


def status_log(store: Store, job_id: str) -> list[dict]:
    return [e.data | {"ts": e.ts} for e in store.events_after(job_id, limit=10_000) if e.type == "status"]


def check_attempts(job, log: list[dict], kills: dict[str, float]) -> list[str]:
    """The workers that lost this job by being killed, after checking its status log's shape."""
    assert log[0]["status"] == "queued", log
    assert [e["status"] for e in log].count("succeeded") == 1 and sum(e["status"] in TERMINAL for e in log) == 1, log
    runs, ends = log[1::2], log[2::2]
    assert len(log) == 2 * job.attempts + 1 and len(runs) == job.attempts, log
    assert all(e["status"] == "running" for e in runs), log
    assert [e["status"] for e in ends] == ["queued"] * (job.attempts - 1) + ["succeeded"], log
    for run, back in zip(runs, ends[:-1]):
        w = run["worker"]
        assert back["reason"] == f"worker {w} stopped heartbeating", log
        assert w in kills, f"job {job.id} was taken from the live worker {w}: {log}"
        assert back["ts"] >= kills[w], f"job {job.id} was requeued before its worker {w} was killed: {log}"
    assert job.worker == runs[-1]["worker"], (job.worker, log)
    return [run["worker"] for run in runs[:-1]]


def test_every_job_ends_exactly_once_while_workers_are_killed(db_url, models, tmp_path):
    cluster = Cluster(db_url, tmp_path, models)
    rng = random.Random(SEED)
    clients: list[Client] = []
    store = chaos = None
    started = time.monotonic()
    try:
        ports = [cluster.start_api(), cluster.start_api()]
        cluster.start_worker()
        cluster.start_worker()
        clients = [cluster.wait_api(port) for port in ports]
        store = Store(db_url)
        chaos = Chaos(cluster, store, rng)
        chaos.start()

        submitted = {}
        for i in range(JOBS):
            job = clients[i % 2].submit(spec(i))
            assert job["status"] == "queued"
            submitted[job["id"]] = i

        # One API dies and comes back on the same port; the other keeps answering meanwhile.
        api, port = cluster.apis[1]
        api.send_signal(signal.SIGKILL)
        api.wait()
        clients[1].close()
        assert clients[0].job(next(iter(submitted)))["id"]
        cluster.start_api(port)
        clients[1] = cluster.wait_api(port)

        def all_ended() -> bool:
            assert chaos.error is None, chaos.error
            counts = store.counts_by_status()
            return sum(counts[s] for s in TERMINAL) == JOBS

        wait_for(all_ended, 180, "all jobs ending", every=0.5)
        chaos.done.set()
        chaos.join(30)
        assert chaos.error is None, chaos.error
        elapsed = time.monotonic() - started

        # The store: every job once, succeeded once, handed over only from killed workers.
        jobs, total = store.list_jobs(limit=500)
        assert total == JOBS and {j.id for j in jobs} == set(submitted)
        assert [j.id for j in jobs if j.status != "succeeded"] == []
        lost_by: dict[str, list[str]] = {}
        requeued_after: list[float] = []  # seconds from a kill to its job's requeue
        for job in jobs:
            log = status_log(store, job.id)
            for w in check_attempts(job, log, chaos.kills):
                lost_by.setdefault(w, []).append(job.id)
            requeued_after += [e["ts"] - chaos.kills[e["reason"].split()[1]] for e in log if "reason" in e]
        assert all(len(ids) == 1 for ids in lost_by.values()), lost_by  # one job at a time per worker
        requeues = sum(len(ids) for ids in lost_by.values())
        assert requeues >= 1, chaos.kills  # the kills did hit running jobs
        assert sum(j.attempts - 1 for j in jobs) == requeues

        # The workers' own accounts: nobody lost a lease it was still using, nobody finished a job twice.
        finished_by: dict[str, list[str]] = {}
        for wid, proc in cluster.workers.items():
            text = cluster.log(proc)
            assert "taken over by another worker" not in text and "not recorded" not in text, text[-2000:]
            for job_id in re.findall(r"job (\w+) succeeded", text):
                finished_by.setdefault(job_id, []).append(wid)
        assert all(len(ws) == 1 for ws in finished_by.values()), finished_by
        assert len(finished_by) >= JOBS - len(chaos.kills)  # a worker may die between its finish and its log line
        for job in jobs:
            if job.id in finished_by:
                assert finished_by[job.id] == [job.worker]

        # The API (both processes, one of them restarted) tells the same.
        for client in clients:
            listed = client.jobs(limit=500)
            assert listed["total"] == JOBS and {j["status"] for j in listed["jobs"]} == {"succeeded"}
        for job_id in list(submitted)[:10]:
            assert clients[1].job(job_id)["attempts"] == store.get_job(job_id).attempts

        # Each output is the merge of its own job's weights; only interrupted jobs left debris.
        base, math, ja = (state_dict(models / m) for m in ("base", "math", "ja"))
        by_id = {j.id: j for j in jobs}
        for job_id, i in submitted.items():
            job_dir = cluster.settings.job_dir(job_id)
            got = state_dict(job_dir / "model")
            assert got.keys() == base.keys()
            a, b = weights(i)
            for name, t in base.items():
                torch.testing.assert_close(got[name], t + a * (math[name] - t) + b * (ja[name] - t))
            (candidate,) = store.candidates(job_id)
            assert candidate.params == {"weights": [a, b]}
            debris = sorted(p.name for p in job_dir.iterdir() if p.name != "model")
            assert not debris or by_id[job_id].attempts > 1, (job_id, debris)

        kills = len(chaos.kills)
        assert kills >= WORKER_KILLS // 2, chaos.kills
        backend = db_url.split(":")[0].split("+")[0]
        print(f"\n{backend}: {JOBS} jobs in {elapsed:.0f} s, {kills} workers killed, {requeues} jobs requeued "
              f"{min(requeued_after):.1f}-{max(requeued_after):.1f} s after the kill, "
              f"attempts {sorted({j.attempts for j in jobs})}")
    finally:
        if chaos is not None:
            chaos.done.set()
            chaos.join(30)
        for c in clients:
            c.close()
        cluster.stop()
        if store is not None:
            store.close()


# A process that opens the store at time argv[2]: prints ok, or the error's first line.
OPEN_STORE = """
import sys, time
from service.store import Store
while time.time() < float(sys.argv[2]):
    pass
try:
    Store(sys.argv[1]).close()
    print("ok")
except Exception as e:
    print(type(e).__name__ + ": " + str(e).splitlines()[0])
"""


def test_processes_opening_an_empty_store_at_once_all_start(db_url):
    """API and worker processes started together on a new database each create the schema; one
    that lost the race to create a table must not fail (this failed about every other try).
    Four fresh interpreters (not forks of this multithreaded process, which can deadlock) open
    the store at the same instant."""
    from service.store import Base

    for _ in range(3):
        store = Store(db_url)
        Base.metadata.drop_all(store.engine)
        store.close()
        at = time.time() + 3.0  # after every interpreter has started and imported the store
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, db_url, str(at)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(4)]
        answers = [p.communicate(timeout=120)[0].strip().splitlines()[-1:] for p in procs]
        assert answers == [["ok"]] * 4, answers

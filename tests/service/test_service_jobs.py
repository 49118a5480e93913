"""Jobs through the whole service: real uvicorn server, real SQLite file, real worker processes.

Covers a merge end to end (submit, follow the events, download the tar, load it with
transformers), `serve` with its own worker, crash and resume (SIGKILL mid-job), cancelling
queued and running jobs, and a job that fails at run time followed by one that succeeds.
Workers that must be caught mid-job are slowed down per tensor by a wrapper script.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from factories import SLOW_WORKER, family, free_port, perturbed, wait_for
from transformers import AutoModelForCausalLM

from merging import merge
from service.client import ApiError, Client
from service.config import Settings
from service.serve import BackgroundServer
from service.store import Store
from service.worker import worker_command

pytestmark = pytest.mark.service

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return family(tmp_path_factory.mktemp("models"))


def merge_spec(**changes) -> dict:
    spec = {"kind": "merge", "base": "base", "models": [{"name": "math", "path": "math"}, {"name": "ja", "path": "ja"}],
            "method": "ties", "params": {"density": 0.5}, "device": "cpu"}
    return spec | changes


class Service:
    """A server thread plus worker processes this test starts (and always stops)."""

    def __init__(self, tmp: Path, models: Path):
        self.settings = Settings(artifacts=tmp / "artifacts", model_roots=(models,), heartbeat_seconds=0.3,
                                 stale_seconds=1.5, poll_seconds=0.2)
        self.server = BackgroundServer(self.settings)
        self.workers: list[subprocess.Popen] = []
        self.store = Store(self.settings.database_url)

    def start_worker(self, delay: float = 0.0) -> subprocess.Popen:
        cmd = worker_command(self.settings, "cpu")
        p = subprocess.Popen([sys.executable, "-c", SLOW_WORKER, str(delay), *cmd[3:]], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.workers.append(p)
        return p

    def stop(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.terminate()
        for p in self.workers:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.store.close()


@pytest.fixture
def service(tmp_path, models, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    svc = Service(tmp_path, models)
    with svc.server as url:
        svc.client = Client(url)
        try:
            yield svc
        finally:
            svc.client.close()
            svc.stop()


def logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.arange(1, 9)[None]).logits


def test_merge_end_to_end(service, models, tmp_path):
    service.start_worker()
    job = service.client.submit(merge_spec())
    assert job["status"] == "queued" and job["spec"]["base"] == str((models / "base").resolve())
    events = list(service.client.events(job["id"]))
    statuses = [e["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"] and events[-1]["type"] == "end"
    assert any(e["type"] == "progress" and e["tensors"] == e["total"] for e in events)

    front = service.client.front(job["id"])
    assert front["candidates"] == [{"id": 0, "params": {"density": 0.5}, "objectives": {}, "true_objectives": None,
                                    "on_front": True, "sd": None}]
    got = service.client.download(job["id"], 0, tmp_path / "merged")
    expected = merge(merge_spec(base=models / "base", models=[{"name": "math", "path": models / "math"},
                                                              {"name": "ja", "path": models / "ja"}]),
                     tmp_path / "local", progress=False)
    torch.testing.assert_close(logits(got), logits(expected))
    tar = service.client.download(job["id"], 0, tmp_path / "merged.tar")  # cached now: served at once
    assert tar.stat().st_size > 0
    final = service.client.job(job["id"])
    assert final["status"] == "succeeded" and final["attempts"] == 1 and final["error"] is None
    metrics = httpx.get(f"{service.client.url}/metrics").text
    assert 'evomerge_jobs{state="succeeded"} 1' in metrics
    assert 'evomerge_job_duration_seconds_count{kind="merge"} 1' in metrics


def test_worker_killed_mid_job_is_resumed(service):
    first = service.start_worker(delay=0.3)
    job = service.client.submit(merge_spec())
    wait_for(lambda: (service.client.job(job["id"])["progress"] or {}).get("tensors", 0) >= 3)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert service.client.job(job["id"])["status"] == "running"  # until its heartbeat goes stale
    service.start_worker()
    events = list(service.client.events(job["id"]))
    assert any(e.get("reason", "").endswith("stopped heartbeating") for e in events)
    final = service.client.job(job["id"])
    assert final["status"] == "succeeded" and final["attempts"] == 2
    assert (service.settings.job_dir(job["id"]) / "model" / "config.json").is_file()


def test_stopped_worker_puts_its_job_back(service):
    first = service.start_worker(delay=0.3)
    job = service.client.submit(merge_spec())
    wait_for(lambda: (service.client.job(job["id"])["progress"] or {}).get("tensors", 0) >= 2)
    first.terminate()  # SIGTERM: stop between tensors, requeue, exit
    assert first.wait(10) == 0
    assert service.client.job(job["id"])["status"] == "queued"
    service.start_worker()
    assert service.client.wait(job["id"])["status"] == "succeeded"
    assert service.client.job(job["id"])["attempts"] == 2


def test_cancel_queued_and_running_jobs(service):
    queued = service.client.submit(merge_spec())
    assert service.client.cancel(queued["id"])["status"] == "cancelled"
    service.start_worker(delay=0.3)
    running = service.client.submit(merge_spec())
    wait_for(lambda: service.client.job(running["id"])["status"] == "running")
    assert service.client.cancel(running["id"])["status"] == "running"  # stops at the next tensor
    events = list(service.client.events(running["id"]))
    assert events[-2]["status"] == "cancelled"
    final = service.client.job(running["id"])
    assert final["status"] == "cancelled" and not (service.settings.job_dir(running["id"]) / "model").exists()
    assert service.client.job(queued["id"])["status"] == "cancelled"  # never ran
    with pytest.raises(ApiError, match="no candidate 0"):
        service.client.download(running["id"], 0, service.settings.artifacts / "x")


def test_failing_job_then_the_worker_serves_the_next(service, models, tmp_path):
    # Valid when submitted; the model's weights are corrupted before the worker gets to it.
    broken = perturbed(models / "base", models / f"broken-{tmp_path.name}", seed=3)
    c = service.client
    bad = c.submit(merge_spec(models=[{"name": "math", "path": "math"}, {"name": "b", "path": broken.name}]))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    good = c.submit(merge_spec())
    service.start_worker()
    assert c.wait(bad["id"])["status"] == "failed"
    error = c.job(bad["id"])["error"]
    assert "not a safetensors file" in error and "\n" not in error
    assert c.wait(good["id"])["status"] == "succeeded"
    assert service.workers[0].poll() is None  # still serving


def test_cli_commands(service, tmp_path, capsys):
    import yaml

    from service.cli.parser import build_parser

    parser = build_parser()

    def run(*argv: str) -> str:
        args = parser.parse_args([*argv, "--url", service.client.url])
        args.func(args)
        return capsys.readouterr().out

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(merge_spec()))
    service.start_worker()
    out = run("submit", str(spec_file), "--wait").splitlines()
    job_id = out[0]
    assert "status: succeeded" in out
    assert run("status", job_id).startswith(f"{job_id}  merge  succeeded")
    assert job_id in run("status")
    folder = run("download", job_id, "0", "--out", str(tmp_path / "m")).strip()
    assert (Path(folder) / "config.json").is_file()
    with pytest.raises(ApiError, match="no job nope"):
        run("status", "nope")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_serve_runs_api_and_a_worker_per_device(models, tmp_path):
    port = free_port()
    art = tmp_path / "artifacts"
    code = f"from service.serve import serve; serve('127.0.0.1', {port}, None, {str(art)!r}, [{str(models)!r}], ['cpu'])"
    env = os.environ | {"EVOMERGE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        with Client(f"http://127.0.0.1:{port}") as c:
            wait_for(lambda: _healthy(c), timeout=60, every=0.2)
            workers = children(proc.pid)
            assert len(workers) == 1
            job = c.submit(merge_spec(method="task_arithmetic", params={"weights": [0.5, 0.5]}))
            assert c.wait(job["id"])["status"] == "succeeded"
            assert json.loads((art / "jobs" / job["id"] / "model" / "config.json").read_text())["hidden_size"] == 32
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in workers:  # serve took its worker down with it
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def _healthy(c: Client) -> bool:
    try:
        return c.health()["status"] == "ok"
    except ApiError:
        return False


def test_an_older_database_gets_the_new_columns(tmp_path):
    """A database made before candidates had an sd column: the store adds it (ALTER TABLE) and
    keeps the rows; candidates written after carry their sd through the API's model."""
    import sqlite3

    from service.api.models import CandidateOut
    from service.store import Store

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as con:  # the candidates table as evomerge 0.1 made it
        con.execute("CREATE TABLE candidates (job_id VARCHAR NOT NULL, cid INTEGER NOT NULL, on_front BOOLEAN, "
                    "params JSON, objectives JSON, true_objectives JSON, PRIMARY KEY (job_id, cid))")
        con.execute("INSERT INTO candidates VALUES ('old', 0, 1, '{}', ?, NULL)", ['{"a": 0.5}'])
    store = Store(f"sqlite:///{db}")
    try:
        (old,) = store.candidates("old")
        assert old.objectives == {"a": 0.5} and old.sd is None
        job = store.add_job("evolve", {}, "cpu", None)
        store.set_candidates(job.id, [{"id": 3, "params": {}, "objectives": {"a": 0.4}, "sd": {"a": 0.02}}])
        assert CandidateOut.of(store.candidate(job.id, 3)).sd == {"a": 0.02}
    finally:
        store.close()
    with sqlite3.connect(db) as con:
        assert "sd" in [row[1] for row in con.execute("PRAGMA table_info(candidates)")]

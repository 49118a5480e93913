"""The service dispatching its jobs to a real local Ray cluster (`serve --ray-address`): a job
runs as a Ray task and its checkpoint downloads, two jobs run at once, a cancel stops a running
task, a job whose evaluators are themselves actors reports their throughput in /metrics, and a
killed dispatcher's job is resumed by another."""
import signal
import time

import httpx
import pytest
import ray
from factories import wait_for
from test_service_evolve import (
    BENCH,
    Workers,
    evolve_spec,
    models,  # noqa: F401 (fixture)
)
from transformers import AutoModelForCausalLM

from service.client import Client
from service.config import Settings
from service.serve import BackgroundServer

pytestmark = pytest.mark.service


@pytest.fixture
def service(tmp_path, models, ray_cluster):  # noqa: F811
    settings = Settings(artifacts=tmp_path / "artifacts", model_roots=(models,), heartbeat_seconds=0.3,
                        stale_seconds=2.0, poll_seconds=0.2, ray_address=ray_cluster)
    workers = Workers(settings)
    with BackgroundServer(settings) as url, Client(url) as client:
        client.upload_benchmark("arith", BENCH.encode())
        try:
            yield client, workers, settings
        finally:
            workers.stop()


def cpus_in_use() -> float:
    """CPUs the cluster's scheduler has handed out (its own record: each job task holds one)."""
    return ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)


def test_jobs_run_as_ray_tasks_two_at_once_and_download(service, tmp_path):
    client, workers, settings = service
    workers.start()
    workers.start()
    jobs = [client.submit(evolve_spec(generations=3)) for _ in range(2)]
    wait_for(lambda: cpus_in_use() == 2, 120, "both jobs holding a CPU of the cluster", every=0.05)
    finals = [client.wait(j["id"]) for j in jobs]
    assert [f["status"] for f in finals] == ["succeeded", "succeeded"], [f["error"] for f in finals]
    assert all(f["worker"].endswith(":ray") for f in finals)
    a, b = finals
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]
    wait_for(lambda: cpus_in_use() == 0, 30, "the tasks to give their CPUs back")
    front = client.front(a["id"])
    folder = client.download(a["id"], front["knee"], tmp_path / "knee")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == 64


def test_cancel_stops_the_ray_task(service):
    client, workers, _ = service
    workers.start()
    job = client.submit(evolve_spec(generations=60))
    wait_for(lambda: (client.job(job["id"])["progress"] or {}).get("generation", 0) >= 1, 120, "a first generation")
    client.cancel(job["id"])
    final = client.wait(job["id"])
    assert final["status"] == "cancelled" and final["progress"]["generation"] < 60
    wait_for(lambda: cpus_in_use() == 0, 30, "the task to end and give its CPU back")


def test_ray_evaluators_show_in_metrics(service):
    client, workers, _ = service
    workers.start()
    spec = evolve_spec(generations=8) | {"execution": {"backend": "ray", "evaluators": 2}}
    job = client.submit(spec)
    seen = []

    def evaluators_reported():
        text = httpx.get(f"{client.url}/metrics").text
        lines = [x for x in text.splitlines() if x.startswith("evomerge_evaluator_candidates{")
                 and f'job="{job["id"]}"' in x]
        seen[:] = lines
        return len(lines) == 2 or client.job(job["id"])["status"] not in ("queued", "running")

    wait_for(evaluators_reported, 180, "per-evaluator metrics", every=0.05)
    assert len(seen) == 2 and all(float(x.rsplit(" ", 1)[1]) > 0 for x in seen), (seen, client.job(job["id"]))
    final = client.wait(job["id"])
    assert final["status"] == "succeeded", final["error"]
    assert len(final["progress"]["evaluators"]) == 2


def test_a_killed_dispatcher_job_resumes_elsewhere(service):
    client, workers, settings = service
    first = workers.start()
    job = client.submit(evolve_spec(generations=6))
    wait_for(lambda: (client.job(job["id"])["progress"] or {}).get("generation", 0) >= 1, 120, "a first generation")
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(0.5)
    workers.start()
    final = client.wait(job["id"])
    assert final["status"] == "succeeded" and final["attempts"] == 2, final["error"]
    generations = [e["generation"] for e in client.events(job["id"]) if e["type"] == "progress"]
    assert generations == sorted(generations) and generations[-1] == 6  # went on, did not start over


def test_ray_backend_without_ray_is_a_4xx_naming_the_field(tmp_path, models, monkeypatch):  # noqa: F811
    import evolve.execution

    monkeypatch.setattr(evolve.execution, "ray_available", lambda: False)
    settings = Settings(artifacts=tmp_path / "artifacts", model_roots=(models,))
    with BackgroundServer(settings) as url, Client(url) as client:
        client.upload_benchmark("arith", BENCH.encode())
        r = httpx.post(f"{url}/v1/jobs", json=evolve_spec() | {"execution": {"backend": "ray", "evaluators": 2}})
    assert 400 <= r.status_code < 500 and r.json()["field"] == "execution.backend", r.text
    assert "ray is not installed" in r.json()["detail"]

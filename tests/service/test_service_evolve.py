"""An evolve job through the service: benchmark upload, search in a worker process, the front,
a candidate's download, and resuming the search after the worker is killed mid-run.

Tiny random Llamas with the zoo's character tokenizer and a 16-item benchmark keep a
two-generation search to a few seconds.
"""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from factories import perturbed, save, tiny_llama
from transformers import AutoModelForCausalLM

from service.client import ApiError, Client
from service.config import Settings, parse_tokens
from service.serve import BackgroundServer
from service.worker import worker_command

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from zoo.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("models")
    save(tiny_llama(vocab=64), root / "base")
    build_tokenizer().save_pretrained(root / "base")
    perturbed(root / "base", root / "a", seed=1, scale=0.05)
    perturbed(root / "base", root / "b", seed=2, scale=0.05)
    return root


BENCH = "".join(json.dumps(x) + "\n" for x in
                [{"id": f"q{i}", "prompt": f"{i}+1=", "answer": str(i + 1), "match": "number"} for i in range(8)]
                + [{"id": f"c{i}", "prompt": f"{i}=", "choices": ["a", "b"], "answer": i % 2} for i in range(8)])


def evolve_spec(generations=2) -> dict:
    objective = {"benchmark": "arith", "estimator": "subset_mean", "subset": {"size": 4, "strategy": "random"}}
    return {"kind": "evolve", "base": "base", "models": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
            "method": "task_arithmetic", "device": "cpu", "final_check": False,
            "objectives": [objective | {"metric": "accuracy"}, objective | {"metric": "mean_output_tokens"}],
            "evaluation": {"max_new_tokens": 3, "irt": {"probes": 0}},
            "search": {"algorithm": "nsga2", "population": 4, "generations": generations}}


class Workers:
    """Worker processes a test starts; all are killed at the end."""

    def __init__(self, settings: Settings):
        self.settings, self.procs = settings, []

    def start(self) -> subprocess.Popen:
        self.procs.append(subprocess.Popen(worker_command(self.settings, "cpu"), stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))
        return self.procs[-1]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def done_job(models, tmp_path_factory):
    """A finished two-generation search, submitted by alice: (client, url, job, events, tmp folder)."""
    tmp = tmp_path_factory.mktemp("evolve")
    old_cache = os.environ.get("EVOMERGE_CACHE")
    os.environ["EVOMERGE_CACHE"] = str(tmp / "cache")
    settings = Settings(artifacts=tmp / "artifacts", model_roots=(models,), poll_seconds=0.2,
                        tokens=parse_tokens("alice:a-token,bob:b-token"))
    workers = Workers(settings)
    with BackgroundServer(settings) as url, Client(url, token="a-token") as client:
        try:
            client.upload_benchmark("arith", BENCH.encode())
            workers.start()
            job = client.submit(evolve_spec())
            events = list(client.events(job["id"]))
            yield client, url, job, events, tmp
        finally:
            workers.stop()
            if old_cache is None:
                os.environ.pop("EVOMERGE_CACHE", None)
            else:
                os.environ["EVOMERGE_CACHE"] = old_cache


def test_evolve_job_end_to_end(done_job):
    client, _, job, events, tmp = done_job
    stages = [e["stage"] for e in events if e["type"] == "stage"]
    assert stages[:1] == ["endpoints"] and "search" in stages
    progress = [e for e in events if e["type"] == "progress"]
    assert [p["generation"] for p in progress] == [1, 2] and progress[-1]["evaluations"] >= 4
    final = client.job(job["id"])
    assert final["status"] == "succeeded", final["error"]
    assert final["evaluations"] == progress[-1]["evaluations"]

    front = client.front(job["id"])
    assert front["objectives"] == ["arith:accuracy", "arith:mean_output_tokens"]
    assert front["candidates"] and front["knee"] in [c["id"] for c in front["candidates"]]
    assert set(front["candidates"][0]["objectives"]) == set(front["objectives"])
    everyone = client.candidates(job["id"])
    assert len(everyone["candidates"]) == final["evaluations"]
    marked = sorted(c["id"] for c in everyone["candidates"] if c["on_front"])
    assert marked == sorted(c["id"] for c in front["candidates"])
    senses = [1 if front["senses"][n] == "max" else -1 for n in front["objectives"]]
    points = {c["id"]: [s * c["objectives"][n] for s, n in zip(senses, front["objectives"])]
              for c in everyone["candidates"]}

    def dominated(p):
        return any(all(a >= b for a, b in zip(q, p)) and q != p for q in points.values())

    assert marked == sorted(i for i, p in points.items() if not dominated(p))  # brute force
    folder = client.download(job["id"], front["knee"], tmp / "knee")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == 64 and not torch.isnan(model.lm_head.weight).any()
    with Client(client.url, token="b-token") as bob, pytest.raises(ApiError, match="no job"):
        bob.front(job["id"])


@pytest.fixture
def service(tmp_path, models, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    settings = Settings(artifacts=tmp_path / "artifacts", model_roots=(models,), heartbeat_seconds=0.3,
                        stale_seconds=1.5, poll_seconds=0.2)
    workers = Workers(settings)
    with BackgroundServer(settings) as url, Client(url) as client:
        client.upload_benchmark("arith", BENCH.encode())
        try:
            yield client, workers.start, settings
        finally:
            workers.stop()


def test_killed_search_resumes_from_its_checkpoint(service):
    client, start_worker, settings = service
    first = start_worker()
    job = client.submit(evolve_spec(generations=4))
    deadline = time.monotonic() + 120
    while (client.job(job["id"])["progress"] or {}).get("generation", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    start_worker()
    assert client.wait(job["id"])["status"] == "succeeded"
    final = client.job(job["id"])
    assert final["attempts"] == 2 and final["progress"]["generation"] == 4
    generations = [e["generation"] for e in client.events(job["id"]) if e["type"] == "progress"]
    assert generations == sorted(generations) and generations[-1] == 4  # went on, did not start over
    lines = (settings.job_dir(job["id"]) / "search" / "candidates.jsonl").read_text().splitlines()
    assert len({json.loads(x)["key"] for x in lines}) == len(lines)  # nothing evaluated twice

"""mergekit configs through the REST API: a `kind: mergekit` job merges as mergekit does, its
refusals name the config's keys, and every job's candidates read back as mergekit YAML."""
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from factories import perturbed, save, state_dict, tiny_llama
from test_service_evolve import Workers

from service.client import Client
from service.config import Settings
from service.serve import BackgroundServer

pytestmark = pytest.mark.service
MERGEKIT = str(Path(sys.executable).with_name("mergekit-yaml"))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk-models")
    save(tiny_llama(layers=4), root / "base")
    perturbed(root / "base", root / "a", seed=1, scale=0.05)
    perturbed(root / "base", root / "b", seed=2, scale=0.05)
    tmp = tmp_path_factory.mktemp("mk-service")
    settings = Settings(artifacts=tmp / "artifacts", model_roots=(root,), poll_seconds=0.2)
    workers = Workers(settings)
    with BackgroundServer(settings) as url, Client(url) as client:
        workers.start()
        try:
            yield client, root, tmp
        finally:
            workers.stop()


CONFIG = {"kind": "mergekit", "merge_method": "ties", "base_model": "base",
          "models": [{"model": "a", "parameters": {"weight": [0.3, 1.0], "density": 0.6}},
                     {"model": "b", "parameters": {"weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.4}],
                                                   "density": [0.9, 0.4]}}],
          "parameters": {"lambda": 0.9}, "dtype": "float32", "device": "cpu"}


def test_a_mergekit_job_merges_as_mergekit_does(service):
    client, root, tmp = service
    job = client.submit(CONFIG)
    assert client.wait(job["id"])["status"] == "succeeded"
    ours = state_dict(client.download(job["id"], 0, tmp / "ours"))
    config = {k: v for k, v in CONFIG.items() if k not in ("kind", "device")}
    config |= {"base_model": str(root / "base"),
               "models": [{**m, "model": str(root / m["model"])} for m in CONFIG["models"]]}
    (tmp / "mk.yml").write_text(yaml.safe_dump(config))
    r = subprocess.run([MERGEKIT, str(tmp / "mk.yml"), str(tmp / "theirs")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = state_dict(tmp / "theirs")
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=2e-6) for k in ours)
    # the job's own config reads back, with the paths the server resolved
    back = yaml.safe_load(httpx.get(f"{client.url}/v1/jobs/{job['id']}/candidates/0/mergekit.yaml").text)
    assert back == config


@pytest.mark.parametrize("change,field", [
    ({"slices": []}, "slices"),
    ({"models": [{"model": "nowhere", "parameters": {"weight": 1}}]}, "models[0].model"),
    ({"parameters": {"lambda": [{"filter": "mlp"}]}}, "parameters.lambda[0]"),
    ({"models": [{"model": "a", "parameters": {"weight": 1, "gamma": 2}}]}, "models[0].parameters.gamma"),
])
def test_refusals_name_the_config_key(service, change, field):
    client = service[0]
    r = httpx.post(f"{client.url}/v1/jobs", json=CONFIG | change)
    assert r.status_code in (400, 422) and r.json()["field"] == field, r.text


def test_a_merge_job_reads_back_as_a_mergekit_config_mergekit_reproduces(service):
    client, root, tmp = service
    spec = {"kind": "merge", "base": "base", "models": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
            "method": "task_arithmetic", "params": {"weights": [0.7, 0.2], "lambda": 1.3}, "device": "cpu"}
    job = client.submit(spec)
    assert client.wait(job["id"])["status"] == "succeeded"
    text = httpx.get(f"{client.url}/v1/jobs/{job['id']}/candidates/0/mergekit.yaml").text
    (tmp / "ta.yml").write_text(text)
    r = subprocess.run([MERGEKIT, str(tmp / "ta.yml"), str(tmp / "ta-theirs")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ours, theirs = state_dict(client.download(job["id"], 0, tmp / "ta-ours")), state_dict(tmp / "ta-theirs")
    assert all(torch.allclose(ours[k], theirs[k], atol=2e-6) for k in ours)
    tsv = client.submit(spec | {"method": "tsv", "params": {}})
    assert client.wait(tsv["id"])["status"] == "succeeded"
    r = httpx.get(f"{client.url}/v1/jobs/{tsv['id']}/candidates/0/mergekit.yaml")
    assert r.status_code == 404 and "no mergekit counterpart" in r.json()["detail"]

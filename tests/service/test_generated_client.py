"""A client generated from the live server's /openapi.json by openapi-python-client (installed by
scripts/setup.sh in .venv/generator: its typer pin conflicts with py-irt's) does a user's whole
round trip with its generated methods and models only: upload a benchmark, submit a merge,
poll it, read the front, download the checkpoint (waiting out the 202s), and read a refusal as
the documented error model. The oracle for the checkpoint is a local merge of the same spec."""
import importlib
import io
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from factories import family
from safetensors.torch import load_file

from merging import merge
from service.config import Settings
from service.serve import BackgroundServer
from service.worker import worker_command

pytestmark = pytest.mark.service
GENERATOR = Path(sys.prefix) / "generator" / "bin" / "openapi-python-client"
CONFIG = """\
content_type_overrides:  # bodies the generator reads as bytes
  application/x-ndjson: application/octet-stream
  application/x-tar: application/octet-stream
  application/yaml: application/octet-stream
  text/csv: application/octet-stream
post_hooks: []
"""
BENCH = b'{"id": "q1", "prompt": "1+1=", "answer": "2", "match": "number"}\n'


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, models folder, the generated package's parent folder), one worker running."""
    tmp = tmp_path_factory.mktemp("generated")
    models = family(tmp / "models")
    settings = Settings(artifacts=tmp / "artifacts", model_roots=(models,), poll_seconds=0.2)
    log = open(tmp / "worker.log", "w")
    worker = subprocess.Popen(worker_command(settings, "cpu"), stdout=log, stderr=subprocess.STDOUT)
    try:
        with BackgroundServer(settings) as url:
            assert GENERATOR.is_file(), f"{GENERATOR} is missing: run scripts/setup.sh"
            (tmp / "config.yaml").write_text(CONFIG)
            out = subprocess.run([str(GENERATOR), "generate", "--url", f"{url}/openapi.json", "--meta", "none",
                                  "--config", str(tmp / "config.yaml")], cwd=tmp, capture_output=True, text=True,
                                 timeout=300)
            assert out.returncode == 0 and "Warning" not in out.stdout + out.stderr, out.stdout + out.stderr
            sys.path.insert(0, str(tmp))
            yield url, models, tmp / "worker.log"
    finally:
        log.close()
        if str(tmp) in sys.path:
            sys.path.remove(str(tmp))
        worker.kill()
        worker.wait()


def test_generated_client_round_trip(served, tmp_path):
    url, models, log = served
    api = importlib.import_module("evomerge_client.api.default")
    m = importlib.import_module("evomerge_client.models")
    types = importlib.import_module("evomerge_client.types")
    from evomerge_client import Client  # the generated package, importable once generated

    client = Client(base_url=url, raise_on_unexpected_status=True, timeout=60)
    importlib.import_module("evomerge_client.api.default.upload_benchmark")
    bench = api.upload_benchmark.sync(client=client, name="arith", body=types.File(payload=io.BytesIO(BENCH)))
    assert isinstance(bench, m.BenchmarkOut) and bench.items == 1 and bench.name == "arith"

    spec = m.MergeSpec.from_dict({"kind": "merge", "base": "base", "method": "ties",
                                  "models": [{"name": "math", "path": "math"}, {"name": "ja", "path": "ja"}],
                                  "params": {"density": 0.5}})
    importlib.import_module("evomerge_client.api.default.submit")
    job = api.submit.sync(client=client, body=spec)
    assert isinstance(job, m.JobOut) and job.status == m.JobOutStatus.QUEUED and job.kind == m.JobOutKind.MERGE

    importlib.import_module("evomerge_client.api.default.get_job")
    deadline = time.monotonic() + 300
    while job.status not in (m.JobOutStatus.SUCCEEDED, m.JobOutStatus.FAILED) and time.monotonic() < deadline:
        time.sleep(0.3)
        job = api.get_job.sync(job.id, client=client)
    assert job.status == m.JobOutStatus.SUCCEEDED, (job.error, log.read_text()[-3000:])

    importlib.import_module("evomerge_client.api.default.front")
    front = api.front.sync(job.id, client=client)
    assert isinstance(front, m.FrontOut) and [c.id for c in front.candidates] == [0]
    assert front.candidates[0].on_front and front.candidates[0].params == {"density": 0.5}

    importlib.import_module("evomerge_client.api.default.checkpoint")
    answer = api.checkpoint.sync(job.id, 0, client=client)
    while isinstance(answer, m.Pending) and time.monotonic() < deadline:
        time.sleep(0.5)
        answer = api.checkpoint.sync(job.id, 0, client=client)
    assert isinstance(answer, types.File), answer
    with tarfile.open(fileobj=answer.payload) as tar:
        tar.extractall(tmp_path / "got", filter="data")
    expected = merge({"base": models / "base", "method": "ties", "params": {"density": 0.5},
                      "models": [{"name": "math", "path": models / "math"}, {"name": "ja", "path": models / "ja"}]},
                     tmp_path / "expected", progress=False)
    got = {k: v for f in sorted((tmp_path / "got").rglob("*.safetensors")) for k, v in load_file(f).items()}
    want = {k: v for f in sorted(expected.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_generated_client_reads_refusals_as_the_error_model(served):
    url, _, _ = served
    m = importlib.import_module("evomerge_client.models")
    api = importlib.import_module("evomerge_client.api.default")
    from evomerge_client import Client

    client = Client(base_url=url, raise_on_unexpected_status=True, timeout=60)
    importlib.import_module("evomerge_client.api.default.submit")
    bad = m.MergeSpec.from_dict({"kind": "merge", "base": "base", "method": "task_arithmetic",
                                 "models": [{"name": "math", "path": "math"}], "params": {"lambda": "Infinity"}})
    refused = api.submit.sync(client=client, body=bad)
    assert isinstance(refused, m.ErrorOut) and refused.field == "params.lambda", refused
    missing = m.MergeSpec.from_dict({"kind": "merge", "base": "base", "method": "linear",
                                     "models": [{"name": "x", "path": "nowhere"}]})
    refused = api.submit.sync(client=client, body=missing)
    assert isinstance(refused, m.ErrorOut) and refused.field == "models[0].path"
    importlib.import_module("evomerge_client.api.default.get_job")
    gone = api.get_job.sync("no-such-job", client=client)
    assert isinstance(gone, m.ErrorOut) and "no job" in gone.detail

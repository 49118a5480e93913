"""The API against its own OpenAPI document, with schemathesis (every check: no server errors,
documented status codes, headers and media types, responses valid against their schemas,
schema-invalid requests refused, schema-valid ones accepted (see schemathesis.toml), 405 with
the right Allow header for undocumented methods, and stateful sequences along the document's
links), run as its command line does against a live server."""
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from factories import perturbed, save, tiny_llama

from service.config import Settings
from service.serve import BackgroundServer

pytestmark = pytest.mark.service
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save(tiny_llama(), root / "base")
    perturbed(root / "base", root / "math", seed=1)
    art = tmp_path_factory.mktemp("artifacts")
    settings = Settings(artifacts=art, model_roots=(root,), max_benchmark_bytes=64 << 10,
                        rate_limit_per_minute=100_000)
    with BackgroundServer(settings) as url:
        yield url


def test_every_schemathesis_check_passes(api, tmp_path):
    st = Path(sys.executable).with_name("st")
    env = {**os.environ, "PYTHONPATH": str(HERE), "SCHEMATHESIS_HOOKS": "st_hooks"}
    run = subprocess.run([str(st), "--config-file", str(HERE / "schemathesis.toml"), "run", f"{api}/openapi.json",
                          "--checks", "all", "--max-examples", "15", "--seed", "1", "--no-color",
                          "--exclude-path-regex", "/events$"],  # a stream lasts as long as its job
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "passed" in out and "failed" not in out.split("Test cases:")[-1], out[-3000:]


def test_events_and_errors_use_their_documented_media_types(api):
    doc = httpx.get(f"{api}/openapi.json").json()
    events = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]
    assert list(events["200"]["content"]) == ["text/event-stream"]
    assert list(events["404"]["content"]) == ["application/json"]
    r = httpx.get(f"{api}/v1/jobs/nope/events")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert set(r.json()) <= set(doc["components"]["schemas"]["ErrorOut"]["properties"])
    tar = doc["paths"]["/v1/jobs/{job_id}/candidates/{cid}/checkpoint"]["get"]["responses"]
    assert list(tar["200"]["content"]) == ["application/x-tar"] and "Retry-After" in tar["202"]["headers"]
    assert "HTTPValidationError" not in str(doc)  # FastAPI's 422 body, which this API never sends

"""Item parameters through the REST API: POST /v1/benchmarks/{name}/irt (a CSV response matrix
is fitted, JSON parameters are imported), GET lists them, and a job's fit_benchmark on the
uploaded benchmark's items uses them. Bad bodies are 4xx naming the field and store nothing.

A real uvicorn server on a free loopback port, as in test_service_api.py."""
import json
import os

import httpx
import numpy as np
import pytest

from data.benchmarks import parse_items
from fitness import params_store
from service.config import Settings, parse_tokens
from service.serve import BackgroundServer

pytestmark = pytest.mark.service

N_ITEMS, N_ROWS = 30, 200
IDS = [f"q{j}" for j in range(N_ITEMS)]
BENCH = "".join(json.dumps({"id": i, "prompt": f"{i}?", "answer": "a"}) + "\n" for i in IDS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    art = tmp_path_factory.mktemp("artifacts")
    settings = Settings(artifacts=art, model_roots=(tmp_path_factory.mktemp("models"),), devices=("cpu",),
                        tokens=parse_tokens("alice:a-token,bob:b-token"), max_irt_bytes=64 << 10,
                        rate_limit_per_minute=1000)
    old = os.environ.get("EVOMERGE_CACHE")
    os.environ["EVOMERGE_CACHE"] = str(art / "cache")
    try:
        with BackgroundServer(settings) as url:
            with httpx.Client(base_url=url, headers={"Authorization": "Bearer a-token"}, timeout=60) as c:
                assert c.post("/v1/benchmarks", params={"name": "lb"}, content=BENCH).status_code == 201
            yield url
    finally:
        if old is None:
            os.environ.pop("EVOMERGE_CACHE", None)
        else:
            os.environ["EVOMERGE_CACHE"] = old


def client(url, token="a-token") -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def matrix_csv(ids=IDS, rows=N_ROWS, seed=0) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, theta = rng.normal(0, 1.2, len(ids)), rng.normal(0, 1, rows)
    y = (rng.random((rows, len(ids))) < 1 / (1 + np.exp(-(theta[:, None] - b)))).astype(int)
    lines = ["model," + ",".join(ids)] + [f"m{i}," + ",".join(map(str, r)) for i, r in enumerate(y)]
    return "\n".join(lines) + "\n", b


def test_csv_is_fitted_json_imported_and_listed(server):
    text, true_b = matrix_csv()
    with client(server) as c:
        r = c.post("/v1/benchmarks/lb/irt", content=text, headers={"Content-Type": "text/csv"})
        assert r.status_code == 201, r.text
        fitted = r.json()
        assert fitted["source"] == "fitted" and fitted["rows"] == N_ROWS and fitted["items"] == N_ITEMS
        assert fitted["benchmark"] == "lb" and fitted["model"] == "2pl"
        bench_hash = fitted["benchmark_hash"]
        params = params_store.latest(bench_hash).params()
        assert params.item_ids == IDS and np.corrcoef(params.b, true_b)[0, 1] > 0.9

        a, d = np.linspace(0.5, 2, N_ITEMS), np.linspace(-2, 2, N_ITEMS)
        body = {"A": [a[::-1].tolist()], "B": d[::-1].tolist(), "item_ids": IDS[::-1], "rows": 915}
        r = c.post("/v1/benchmarks/lb/irt", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["source"] == "imported" and r.json()["rows"] == 915
        stored = params_store.latest(bench_hash)
        np.testing.assert_allclose(stored.params().a[:, 0], a)
        np.testing.assert_allclose(stored.params().b, d)

        listed = c.get("/v1/benchmarks/lb/irt").json()
        assert listed["hash"] == bench_hash and [e["source"] for e in listed["entries"]] == ["fitted", "imported"]
        assert listed["entries"][-1]["id"] == stored.id

    # a job on these items (the uploaded file's) takes the last entry
    from data.benchmarks import from_items
    from fitness.evaluate import Responses
    from fitness.fitness import fit_benchmark
    from fitness.spec import EvaluationSpec, ObjectiveSpec

    bench = from_items("lb", parse_items(BENCH.splitlines()))
    assert bench.hash == bench_hash
    rng = np.random.default_rng(1)
    rows = [Responses(IDS, (rng.random(N_ITEMS) < p).astype(np.uint8), np.ones(N_ITEMS, int), [""] * N_ITEMS)
            for p in (0.3, 0.5, 0.7, 0.4)]
    fit = fit_benchmark(bench, [ObjectiveSpec(benchmark="lb.jsonl")], EvaluationSpec(), rows[:2], rows[2:])
    np.testing.assert_array_equal(fit.item_params.b, stored.params().b)
    assert fit.irt_source.startswith("stored ") and fit.irt_source.endswith(" (imported, fitted on 915 rows)")


BAD = [
    # (case, content type, body, status, field, words): 422 breaks the schema, 400 fits it but not the benchmark
    ("unknown item id", "text/csv", lambda: matrix_csv(IDS[:-1] + ["zz"], rows=5)[0], 400, "item_ids", "'zz'"),
    ("missing item", "text/csv", lambda: matrix_csv(IDS[1:], rows=5)[0], 400, "item_ids", "'q0'"),
    ("not 0/1", "text/csv", lambda: ",".join(IDS) + "\n" + ",".join(["x"] * N_ITEMS) + "\n", 400, "responses", "'x'"),
    ("json ids", "application/json",
     lambda: json.dumps({"A": [[1.0] * N_ITEMS], "B": [0.0] * N_ITEMS, "item_ids": ["zz"] + IDS[1:]}), 400, "item_ids",
     "'zz'"),
    ("json shapes", "application/json",
     lambda: json.dumps({"A": [[1.0] * N_ITEMS], "B": [0.0] * 3, "item_ids": IDS}), 400, "B", "3 difficulties"),
    ("json A shape", "application/json",
     lambda: json.dumps({"A": [[1.0] * 3], "B": [0.0] * N_ITEMS, "item_ids": IDS}), 400, "A", "no axis"),
    ("json infinite", "application/json",  # JSON has no infinities: refused naming the element, as in job specs
     lambda: json.dumps({"A": [[1e999] * N_ITEMS], "B": [0.0] * N_ITEMS, "item_ids": IDS}), 422, "A[0][0]", "finite"),
    ("json malformed", "application/json", lambda: "{", 422, "body", "JSON"),
    ("wrong type", "application/x-yaml", lambda: "a: 1", 415, "content-type", "text/csv"),
    ("oversize", "text/csv", lambda: "q0\n" + "1\n" * (40 << 10), 413, "body", "limit"),
]


@pytest.mark.parametrize("case,media,body,status,field,words", BAD, ids=[b[0] for b in BAD])
def test_bad_uploads_are_refused_naming_the_field(server, case, media, body, status, field, words):
    with client(server) as c:
        before = c.get("/v1/benchmarks/lb/irt").json()["entries"]
        r = c.post("/v1/benchmarks/lb/irt", content=body(), headers={"Content-Type": media})
        assert r.status_code == status, r.text
        assert r.json()["field"] == field and words in r.json()["detail"] and "\n" not in r.json()["detail"]
        assert c.get("/v1/benchmarks/lb/irt").json()["entries"] == before


def test_another_users_benchmark_is_not_found(server):
    with client(server, "b-token") as c:
        r = c.post("/v1/benchmarks/lb/irt", content=matrix_csv(rows=5)[0], headers={"Content-Type": "text/csv"})
        assert r.status_code == 404 and r.json()["field"] == "name"
        assert c.get("/v1/benchmarks/lb/irt").status_code == 404

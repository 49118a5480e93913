"""The REST API without workers: input checks, auth, benchmarks, listing, metrics and the page.

A real uvicorn server on a free loopback port over a real SQLite file. Every bad input
is answered with its status and a message that names the field, and leaves the store as
it was.
"""
import json
import os
from pathlib import Path

import httpx
import pytest
from factories import family, perturbed, save, tiny_llama

from service.config import Settings, parse_tokens
from service.schemas import field_name
from service.serve import BackgroundServer

pytestmark = pytest.mark.service

TOKENS = "alice:a-token,bob:b-token,root:r-token:admin"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = family(tmp_path_factory.mktemp("models"))
    base = root / "base"
    save(tiny_llama(hidden=16), root / "narrow")
    outside = tmp_path_factory.mktemp("outside")
    perturbed(base, outside / "secret", seed=3)
    os.symlink(outside / "secret", root / "escape")
    (root / "bench.jsonl").write_text(json.dumps({"id": "q1", "prompt": "2+2=", "answer": "4"}) + "\n")
    return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """(url, settings) of a server with auth on and small limits."""
    art = tmp_path_factory.mktemp("artifacts")
    settings = Settings(artifacts=art, model_roots=(models,), devices=("cpu",), tokens=parse_tokens(TOKENS),
                        max_body_bytes=16 << 10, max_benchmark_bytes=4 << 10, rate_limit_per_minute=1000)
    old = os.environ.get("EVOMERGE_CACHE")
    os.environ["EVOMERGE_CACHE"] = str(art / "cache")
    with BackgroundServer(settings) as url:
        yield url, settings
    if old is None:
        os.environ.pop("EVOMERGE_CACHE", None)
    else:
        os.environ["EVOMERGE_CACHE"] = old


def client(server, token="a-token") -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server[0], headers=headers, timeout=30)


def spec(**changes) -> dict:
    s = {"kind": "merge", "base": "base", "models": [{"name": "math", "path": "math"}, {"name": "ja", "path": "ja"}],
         "method": "ties", "params": {"density": 0.5}}
    return s | changes


def snapshot(c: httpx.Client) -> tuple:
    admin = client((c.base_url,), "r-token")
    jobs = admin.get("/v1/jobs", params={"limit": 500}).json()
    bench = admin.get("/v1/benchmarks").json()
    return jobs["total"], [j["id"] for j in jobs["jobs"]], bench["benchmarks"]


MODELS = lambda *paths: [{"name": f"m{i}", "path": p} for i, p in enumerate(paths)]  # noqa: E731

BAD_SPECS = [
    # (case, body, status, field, words in the message)
    ("not an object", [1, 2], 422, "spec", "JSON object"),
    ("no kind", {k: v for k, v in spec().items() if k != "kind"}, 422, "kind", "merge"),
    ("unknown kind", spec(kind="train"), 422, "kind", "must be one of"),
    ("base of wrong type", spec(base=3), 422, "base", "string"),
    ("models not a list", spec(models="math"), 422, "models", "array"),
    ("model path of wrong type", spec(models=[{"name": "m", "path": ["x"]}]), 422, "models[0].path", "string"),
    ("unknown field", spec(seed=1), 422, "seed", "Extra inputs"),
    ("unknown method", spec(method="frankenmerge"), 422, "method", "unknown method"),
    ("parameter out of range", spec(params={"density": 7}), 400, "params.density", "density"),
    ("unknown parameter", spec(params={"dnsity": 0.5}), 400, "params.dnsity", "Extra inputs"),
    ("bad device", spec(device="tpu"), 422, "device", "cuda"),
    ("unserved device", spec(device="cuda:3"), 400, "device", "no worker serves"),
    ("path traversal", spec(models=MODELS("math", "../outside/secret")), 400, "models[1].path", "'..'"),
    ("absolute path outside", spec(base="/etc"), 400, "base", "outside the allowed model roots"),
    ("symlink escape", spec(models=MODELS("escape")), 400, "models[0].path", "outside the allowed model roots"),
    ("missing model", spec(models=MODELS("math", "nowhere")), 400, "models[1].path", "no such model folder"),
    ("not a model folder", spec(base="."), 400, "base", "no model.safetensors"),
    ("mismatched model", spec(models=MODELS("math", "narrow")), 400, "models[1].path", "does not match the base"),
    ("NUL in a path", spec(models=MODELS("math", "ja\x00x")), 400, "models[1].path", "NUL"),
    ("empty path", spec(models=MODELS("math", "")), 422, "models[1].path", "must not be empty"),
    ("overlong path", spec(models=MODELS("math", "a" * 300)), 400, "models[1].path", "too long"),
    ("weights of the wrong length", spec(method="task_arithmetic", params={"weights": [1, 2, 3]}), 400,
     "params.weights", "3 values for 2 models"),
    ("negative search seed", spec(kind="evolve", params={}, objectives=[{"benchmark": "bench.jsonl"}],
                                  search={"seed": -1}), 422, "search.seed", "greater than or equal to 0"),
]


@pytest.mark.parametrize("case,body,status,field,words", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_specs_are_refused_naming_the_field(server, case, body, status, field, words):
    c = client(server)
    before = snapshot(c)
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["detail"].startswith(f"{field}: ") and words in r.json()["detail"]
    assert "Traceback" not in r.text and "\n" not in r.json()["detail"]
    assert snapshot(c) == before


def test_bad_bodies(server):
    c = client(server)
    before = snapshot(c)
    r = c.post("/v1/jobs", content=b"{not json")
    assert r.status_code == 422 and r.json()["detail"].startswith("body: not valid JSON")
    r = c.post("/v1/jobs", json=spec(params={"weights": [1.0] * 5000}))
    assert r.status_code == 413 and "limit" in r.json()["detail"] and r.json()["field"] == "body"
    for constant in (b"NaN", b"Infinity", b"-Infinity"):  # Python's json would take them
        body = json.dumps(spec(method="task_arithmetic", params={"weights": [1.0, 0.5]})).encode()
        r = c.post("/v1/jobs", content=body.replace(b"0.5", constant), headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["field"] == "params.weights[1]" and "finite" in r.json()["detail"]
    r = c.post("/v1/jobs", content=b"[" * 5000 + b"]" * 5000)
    assert r.status_code == 422 and r.json()["detail"] == "body: nested too deeply"
    r = c.post("/v1/jobs", content=json.dumps(spec()).encode(), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["field"] == "content-type"
    r = c.post("/v1/jobs", content=json.dumps(spec(kind="train")).encode(), headers={"Content-Type": "text/json"})
    assert r.status_code == 422 and r.json()["field"] == "kind"  # text/json is JSON: read, then judged
    assert snapshot(c) == before


BAD_BENCHMARKS = [
    ("invalid JSON line", "b1", b'{"id": "1", "prompt": "p", "answer": "a"}\n{"id": 2,\n', 400, "line 2", "not valid JSON"),
    ("missing key", "b1", b'{"id": "1", "prompt": "p"}\n', 400, "line 1", "missing 'answer'"),
    ("duplicate id", "b1", b'{"id": 1, "prompt": "p", "answer": "a"}\n{"id": 1, "prompt": "q", "answer": "b"}\n',
     400, "line 2", "duplicate id"),
    ("empty", "b1", b"\n\n", 400, "body", "no items"),
    ("not UTF-8", "b1", b'{"id": "1", "prompt": "\xff", "answer": "a"}\n', 400, "body", "UTF-8"),
    ("oversized", "b1", b'{"id": "1", "prompt": "' + b"x" * 5000 + b'", "answer": "a"}\n', 413, "body", "limit"),
    ("nested too deeply", "b1", b"[" * 1500 + b"]" * 1500, 400, "line 1", "nested too deeply"),
    ("bad name", "../etc", b'{"id": "1", "prompt": "p", "answer": "a"}\n', 422, "name", "letters"),
    ("name with a newline", "abc\n", b'{"id": "1", "prompt": "p", "answer": "a"}\n', 422, "name", "letters"),
]


@pytest.mark.parametrize("case,name,body,status,field,words", BAD_BENCHMARKS, ids=[c[0] for c in BAD_BENCHMARKS])
def test_bad_benchmark_uploads(server, case, name, body, status, field, words):
    c = client(server)
    before = snapshot(c)
    r = c.post("/v1/benchmarks", params={"name": name}, content=body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"] and (field is None or r.json()["field"] == field)
    assert snapshot(c) == before
    assert not list((server[1].benchmark_dir).glob(f"{name}*")) if server[1].benchmark_dir.exists() else True


def test_benchmark_upload_and_evolve_spec_checks(server):
    c = client(server)
    r = r_up = c.post("/v1/benchmarks", params={"name": "arith"},
               content=b'{"id": "q1", "prompt": "1+1=", "answer": "2", "match": "number"}\n'
                       b'{"id": "q2", "prompt": "Pick", "choices": ["a", "b"], "answer": 0}\n')
    assert r.status_code == 201 and r.json()["items"] == 2
    assert [b["name"] for b in c.get("/v1/benchmarks").json()["benchmarks"]] == ["arith"]
    assert client(server, "b-token").get("/v1/benchmarks").json()["benchmarks"] == []  # alice's
    r = client(server, "b-token").post("/v1/benchmarks", params={"name": "arith"}, content=b'{"id":1,"prompt":"","answer":"x"}')
    assert r.status_code == 409 and r.json()["field"] == "name"
    uploaded = r_up.json()

    evolve = spec(kind="evolve", params={}, method="task_arithmetic",
                  objectives=[{"benchmark": "arith", "metric": "accuracy", "estimator": "subset_mean"}],
                  search={"population": 4, "generations": 1})
    before = snapshot(c)
    for objectives, words in [([{"benchmark": "unknown"}], "no benchmark named 'unknown'"),
                              ([{"benchmark": "../bench.jsonl"}], "'..'")]:
        r = client(server, "b-token").post("/v1/jobs", json=evolve | {"objectives": objectives})
        assert r.status_code == 400 and r.json()["field"] == "objectives[0].benchmark" and words in r.json()["detail"]
    r = client(server, "b-token").post("/v1/jobs", json=evolve)  # alice's benchmark is not bob's
    assert r.status_code == 400 and r.json()["field"] == "objectives[0].benchmark"
    assert snapshot(c) == before
    r = c.post("/v1/jobs", json=evolve)
    assert r.status_code == 201, r.text
    job = r.json()
    used = Path(job["spec"]["objectives"][0]["benchmark"])
    assert job["kind"] == "evolve" and used.parent == server[1].benchmark_dir.absolute() and used.name.startswith("arith-")
    assert job["spec"]["objectives"][0]["name"] == "arith:accuracy"
    r = c.post("/v1/jobs", json=evolve | {"objectives": [{"benchmark": "bench.jsonl", "estimator": "subset_mean"}]})
    assert r.status_code == 201, r.text  # a file under the model roots works too
    for j in (job, r.json()):
        assert c.delete(f"/v1/jobs/{j['id']}").json()["status"] == "cancelled"

    # a re-upload is a new file: accepted jobs keep measuring what was checked when they were submitted
    from data.benchmarks import load_benchmark

    assert load_benchmark(used).hash == uploaded["hash"]
    r = c.post("/v1/benchmarks", params={"name": "arith"}, content=b'{"id": "z", "prompt": "3+3=", "answer": "6"}\n')
    assert r.status_code == 201 and r.json()["items"] == 1 and r.json()["hash"] != uploaded["hash"]
    new_hash = r.json()["hash"]
    assert load_benchmark(used).hash == uploaded["hash"]  # the accepted job's file is untouched
    r = c.post("/v1/jobs", json=evolve)  # a new job gets the new content
    assert r.status_code == 201 and load_benchmark(r.json()["spec"]["objectives"][0]["benchmark"]).hash == new_hash
    assert c.delete(f"/v1/jobs/{r.json()['id']}").json()["status"] == "cancelled"


def test_artifacts_are_never_inputs(models, tmp_path):
    """Another job's output or upload under a model root is not reachable by path."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(models, root, symlinks=True)
    art = root / "artifacts"
    shutil.copytree(models / "math", art / "jobs" / "j1" / "model")
    (art / "benchmarks").mkdir()
    shutil.copy(models / "bench.jsonl", art / "benchmarks" / "theirs.jsonl")
    with BackgroundServer(Settings(artifacts=art, model_roots=(root,))) as url:
        r = httpx.post(f"{url}/v1/jobs", json=spec(models=MODELS("math", "artifacts/jobs/j1/model")))
        assert r.status_code == 400 and r.json()["field"] == "models[1].path" and "artifacts" in r.json()["detail"]
        r = httpx.post(f"{url}/v1/jobs", json=spec(kind="evolve", params={}, method="task_arithmetic",
                                                   objectives=[{"benchmark": "artifacts/benchmarks/theirs.jsonl"}]))
        assert r.status_code == 400 and r.json()["field"] == "objectives[0].benchmark"
        r = httpx.post(f"{url}/v1/jobs", json=spec(kind="evolve", params={}, method="task_arithmetic",
                                                   objectives=[{"benchmark": "bench.jsonl"}]))
        assert r.status_code == 201, r.text  # the same files outside the artifacts are fine


def test_auth(server):
    url = server[0]
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"  # open
    for path in ("/v1/jobs", "/v1/benchmarks", "/metrics"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.json()["detail"].startswith("authorization:"), path
        assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(url + "/jobs/x")  # a person reads the page: HTML, telling how to pass the token
    assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
    assert "bearer token is required" in r.text and "?token=" in r.text
    r = httpx.get(url + "/jobs/x", params={"token": "wrong"}, follow_redirects=False)
    assert r.status_code == 401 and "unknown token" in r.text
    assert httpx.get(url + "/favicon.ico").status_code == 204
    r = httpx.post(f"{url}/v1/jobs", json=spec())
    assert r.status_code == 401
    r = client(server, "wrong").get("/v1/jobs")
    assert r.status_code == 401 and "unknown token" in r.json()["detail"]

    alice, bob, root = client(server), client(server, "b-token"), client(server, "r-token")
    job = alice.post("/v1/jobs", json=spec()).json()
    assert job["owner"] == "alice"
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/front", f"/v1/jobs/{job['id']}/events",
                 f"/v1/jobs/{job['id']}/candidates/0/checkpoint"):
        r = bob.get(path)
        assert r.status_code == 404 and r.json()["detail"] == f"no job {job['id']}", path
    r = bob.get(f"/jobs/{job['id']}")
    assert r.status_code == 404 and f"no job {job['id']}" in r.text and 'id="scatter"' not in r.text
    assert bob.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert job["id"] not in [j["id"] for j in bob.get("/v1/jobs").json()["jobs"]]
    assert job["id"] in [j["id"] for j in root.get("/v1/jobs").json()["jobs"]]  # admins see all
    assert root.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    # a cookie (set by the page from ?token=) works for GET only
    r = httpx.get(f"{url}/jobs/{job['id']}", params={"token": "a-token"}, follow_redirects=False)
    assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
    page = httpx.get(f"{url}/jobs/{job['id']}", cookies={"evomerge_token": "a-token"})
    assert page.status_code == 200 and 'id="scatter"' in page.text and job["id"] in page.text
    r = httpx.delete(f"{url}/v1/jobs/{job['id']}", cookies={"evomerge_token": "a-token"})
    assert r.status_code == 401
    assert alice.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert alice.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"  # idempotent


def test_listing_filters_and_pages(server):
    c = client(server, "b-token")
    ids = [c.post("/v1/jobs", json=spec()).json()["id"] for _ in range(3)]
    c.delete(f"/v1/jobs/{ids[0]}")
    page = c.get("/v1/jobs", params={"status": "queued", "limit": 1}).json()
    assert page["total"] == 2 and [j["id"] for j in page["jobs"]] == [ids[2]] and "spec" not in page["jobs"][0]
    assert c.get("/v1/jobs", params={"status": "queued", "limit": 1, "offset": 1}).json()["jobs"][0]["id"] == ids[1]
    assert c.get("/v1/jobs", params={"status": "cancelled"}).json()["jobs"][0]["id"] == ids[0]
    for params, field in [({"status": "sleeping"}, "status"), ({"limit": 0}, "limit"), ({"limit": "x"}, "limit"),
                          ({"offset": -1}, "offset"), ({"offset": 10**22}, "offset")]:
        r = c.get("/v1/jobs", params=params)
        assert r.status_code == 422 and r.json()["field"] == field
    metrics = c.get("/metrics").text
    assert "evomerge_queue_depth" in metrics and 'evomerge_jobs{state="cancelled"}' in metrics
    for i in ids[1:]:
        c.delete(f"/v1/jobs/{i}")
    assert c.get(f"/v1/jobs/{ids[1]}/candidates/0/checkpoint").status_code == 404


def test_submissions_are_rate_limited(models, tmp_path):
    """Only accepted submissions count: refused ones (422, 400) cost nothing, concurrent ones included."""
    from concurrent.futures import ThreadPoolExecutor

    settings = Settings(artifacts=tmp_path, model_roots=(models,), rate_limit_per_minute=3)
    with BackgroundServer(settings) as url:
        refused = [httpx.post(f"{url}/v1/jobs", json=spec(method="nope")).status_code for _ in range(5)]
        refused.append(httpx.post(f"{url}/v1/jobs", json=spec(base="nowhere")).status_code)
        with ThreadPoolExecutor(6) as pool:
            codes = sorted(pool.map(lambda _: httpx.post(f"{url}/v1/jobs", json=spec(), timeout=30).status_code,
                                    range(6)))
        r = httpx.post(f"{url}/v1/jobs", json=spec())
    assert refused == [422] * 5 + [400]
    assert codes == [201] * 3 + [429] * 3 and r.status_code == 429 and int(r.headers["retry-after"]) > 0


STRINGS = [("NaN", "params.weights[0]", {"weights": ["NaN", 1]}), ("inf", "params.weights[0]", {"weights": ["inf", 1]}),
           ("Infinity", "params.lambda", {"lambda": "Infinity"}), ("1e999", "params.lambda", {"lambda": "1e999"}),
           ("0.5", "params.lambda", {"lambda": "0.5"})]


@pytest.mark.parametrize("text,field,params", STRINGS, ids=[s[0] for s in STRINGS])
def test_numbers_sent_as_strings_are_refused_naming_the_field(server, text, field, params):
    c = client(server)
    before = snapshot(c)
    r = c.post("/v1/jobs", json=spec(method="task_arithmetic", params=params))
    assert r.status_code in (400, 422) and r.json()["field"] == field, r.text
    assert f"not the string {text!r}" in r.json()["detail"]
    assert snapshot(c) == before


def test_numbers_beyond_a_float_and_whole_floats(server):
    c = client(server)
    body = json.dumps(spec(method="task_arithmetic", params={"lambda": 7.0}))
    r = c.post("/v1/jobs", content=body.replace("7.0", "1e999"), headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "params.lambda" and "finite" in r.json()["detail"]
    ok = c.post("/v1/jobs", json=spec(kind="evolve", method="ties", params={},
                                      objectives=[{"benchmark": "bench.jsonl", "subset": {"size": 1.0}}]))
    assert ok.status_code == 201, ok.text  # JSON has one number type: 1.0 is the integer 1
    assert ok.json()["spec"]["objectives"][0]["subset"]["size"] == 1
    half = c.post("/v1/jobs", json=spec(kind="evolve", method="ties", params={},
                                        objectives=[{"benchmark": "bench.jsonl", "subset": {"size": 1.5}}]))
    assert half.status_code == 422 and half.json()["field"] == "objectives[0].subset.size"
    c.delete(f"/v1/jobs/{ok.json()['id']}")


def test_metrics_are_the_callers_own(server):
    """Each user's /metrics counts their jobs only (an oracle: the listing each user sees); an admin's all."""
    import re

    counts = {}
    for token in ("a-token", "b-token", "r-token"):
        c = client(server, token)
        c.post("/v1/jobs", json=spec())
        jobs = c.get("/v1/jobs", params={"limit": 500}).json()["jobs"]
        text = c.get("/metrics")
        assert text.headers["content-type"].startswith("text/plain")
        counts[token] = {s: int(n) for s, n in re.findall(r'^evomerge_jobs\{state="(\w+)"\} (\d+)', text.text, re.M)}
        mine = {s: sum(j["status"] == s for j in jobs) for s in counts[token]}
        assert counts[token] == mine
    assert all(counts["r-token"][s] >= counts["a-token"][s] + counts["b-token"][s] for s in counts["r-token"])
    assert sum(counts["a-token"].values()) < sum(counts["r-token"].values())


def test_methods_and_paths_the_api_does_not_serve(server):
    c = client(server)
    r = c.put("/v1/jobs/some-id")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "DELETE"}
    assert c.head("/v1/jobs/some-id").status_code == 405  # so Allow rightly leaves HEAD out
    r = c.request("OPTIONS", "/v1/jobs")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    for path in ("/v1/jobs/..%2F", "/v1/jobs/", "/v1/benchmarks/"):
        r = c.delete(path) if "jobs/." in path else c.get(path)
        assert r.status_code in (404, 405) and r.headers["content-type"] == "application/json", (path, r.status_code)


def test_field_names():
    assert field_name(("models", 1, "path")) == "models[1].path"
    assert field_name(("params", "density")) == "params.density"
    assert parse_tokens("alice:x, root:y:admin\n# c\nsolo") == {
        "x": parse_tokens("alice:x")["x"], "y": parse_tokens("root:y:admin")["y"], "solo": parse_tokens("solo")["solo"]}
    assert parse_tokens("root:y:admin")["y"].admin and not parse_tokens("alice:x")["x"].admin


def test_non_finite_numbers_are_refused_from_any_entry_point():
    """YAML (`.nan`, `.inf`) and Python specs can carry what JSON bodies cannot: the spec parser
    refuses them too, naming where they are."""
    import yaml

    from service.schemas import SpecError, parse_spec

    for text, field in [("params: {weights: [.nan, 1.0]}", "params.weights[0]"),
                        ("params: {weights: [1.0, -.inf]}", "params.weights[1]")]:
        data = spec(method="task_arithmetic") | yaml.safe_load(text)
        with pytest.raises(SpecError) as e:
            parse_spec(data)
        assert e.value.field == field and e.value.status == 422 and "finite" in str(e.value)
    assert parse_spec(spec(method="task_arithmetic", params={"weights": [1.0, 0.5]})).params["weights"] == [1.0, 0.5]


def test_a_model_root_inside_the_artifacts_is_a_configuration_error(tmp_path):
    with pytest.raises(ValueError, match="lies in the artifacts folder"):
        Settings(artifacts=tmp_path, model_roots=(tmp_path / "models",))
    with pytest.raises(ValueError, match="lies in the artifacts folder"):
        Settings(artifacts=tmp_path, model_roots=(tmp_path,))
    assert Settings(artifacts=tmp_path / "art", model_roots=(tmp_path,)).model_roots == (tmp_path,)


def test_client_refuses_bad_input_without_tracebacks(server, tmp_path):
    from service.client import ApiError, Client, load_spec_file

    p = tmp_path / "s.yaml"
    p.write_text("kind: merge\nname_like: 2024-05-01\nparams: {weights: [.nan]}\n")
    with pytest.raises(ApiError, match=r"params.weights\[0\]: must be a finite number"):
        load_spec_file(p)
    p.write_text("kind: merge\nwhen: 2024-05-01\n")
    assert load_spec_file(p) == {"kind": "merge", "when": "2024-05-01"}  # YAML dates are text
    p.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ApiError, match="not a text file"):
        load_spec_file(p)
    with pytest.raises(ApiError, match="a folder, not a spec file"):
        load_spec_file(tmp_path)
    with pytest.raises(ApiError, match="not a usable address"):
        Client("http://[::1")
    with Client(server[0], "a-token") as c:
        with pytest.raises(ApiError) as e:
            c.job("../../healthz")  # one path segment, not another route
        assert e.value.status == 404
        (tmp_path / "x.tar").write_bytes(b"keep")
        with pytest.raises(ApiError, match="already exists"):
            c.download("any", 0, tmp_path / "x.tar")
        assert (tmp_path / "x.tar").read_bytes() == b"keep"


def test_front_of_an_unfinished_search_lists_its_candidates_so_far(server):
    """The page plots a running search: /front serves the candidates scored so far (estimated
    objectives; a torn last line, a crash mid-write, is skipped), before the job's front exists."""
    from evolve.problem import Candidate

    c = client(server)
    job = c.post("/v1/jobs", json=spec(kind="evolve", params={}, method="task_arithmetic",
                                       objectives=[{"benchmark": "bench.jsonl", "estimator": "subset_mean"}])).json()
    assert c.get(f"/v1/jobs/{job['id']}/front").json()["candidates"] == []
    run = server[1].job_dir(job["id"]) / "search"
    run.mkdir(parents=True)
    written = [Candidate(i, f"k{i}", 0, [0.1 * i, 0.2], [{"weights": [0.1 * i, 0.2]}], {"bench:accuracy": 0.5 + 0.1 * i})
               for i in range(2)]
    (run / "candidates.jsonl").write_text("".join(json.dumps(w.to_json()) + "\n" for w in written) + '{"id": 2, "ke')
    front = c.get(f"/v1/jobs/{job['id']}/front").json()
    assert [(x["id"], x["objectives"], x["on_front"]) for x in front["candidates"]] == [
        (0, {"bench:accuracy": 0.5}, False), (1, {"bench:accuracy": 0.6}, False)]
    assert front["knee"] is None and front["status"] == "queued"
    assert c.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert c.get(f"/v1/jobs/{job['id']}/front").json()["candidates"] == []  # ended: only what the job stored

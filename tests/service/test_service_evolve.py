"""An evolve job through the service: benchmark upload, search in a worker process, the front,
a candidate's download, and resuming the search after the worker is killed mid-run.

Tiny random Llamas with the zoo's character tokenizer and a 16-item benchmark keep a
two-generation search to a few seconds.
"""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
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


# -- the page, in headless Chromium driven over the DevTools protocol -------------------------

class Browser:
    """Headless Chromium with one page, driven by `Runtime.evaluate` over a websocket."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        self.proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                      "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and self.proc.poll() is None, "chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None).__enter__()
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg["error"]
                return msg["result"]

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"page never satisfied: {expression}")

    def close(self) -> None:
        self.ws.close()
        self.proc.kill()
        self.proc.wait()


def point(cid: int) -> str:
    """JS for the scatter's circle of candidate `cid`."""
    return f"[...document.querySelectorAll('#plot circle')].find(c => c.dataset.cid === '{cid}')"


@pytest.mark.browser
def test_page_shows_progress_front_and_downloads(done_job, tmp_path):
    if not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")):
        pytest.fail("no Chromium installed (Debian: apt-get install chromium; scripts/setup.sh does it as root)")
    client, url, job, _, _ = done_job
    front = client.front(job["id"])
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{url}/jobs/{job['id']}?token=a-token")  # becomes a cookie
        browser.wait(f"document.querySelectorAll('#plot circle').length === {len(front['candidates'])}")
        assert browser.js("location.search") == ""  # the token left the address bar
        assert browser.js("document.getElementById('status').textContent") == "succeeded"
        assert browser.js("document.getElementById('bar').style.width") == "100%"
        assert browser.js("!document.getElementById('pair').hidden")
        assert browser.js("[...document.querySelectorAll('#xs option')].map(o => o.value)") == front["objectives"]
        assert "generation 2/2" in browser.js("document.getElementById('prog').textContent")
        knee = front["knee"]
        assert browser.js(point(knee) + ".getAttribute('r')") == "7"
        other = next((c for c in front["candidates"] if c["id"] != knee), front["candidates"][0])
        browser.js(point(other["id"]) + ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")
        assert json.loads(browser.wait("document.getElementById('params')?.textContent")) == other["params"]
        browser.js("document.getElementById('download').click()")  # 202s while the tar is built, then the file
        assert browser.wait("document.getElementById('dlnote').textContent === 'ready' && 'ready'") == "ready"
        # the other objective on x: the points move, nothing breaks
        browser.js("{ const x = document.getElementById('xs'); x.value = x.options[1].value; "
                   "x.dispatchEvent(new Event('change')) }")
        assert browser.js("document.querySelectorAll('#plot circle').length") == len(front["candidates"])
        # estimates that report an sd get error bars (this job's subset means report none): one
        # bar per candidate for an sd on the y objective, spanning +- 1 sd around its point
        assert browser.js("document.querySelectorAll('#plot line.err').length") == 0
        bars = browser.js("{ const x = document.getElementById('xs'), y = document.getElementById('ys'); "
                          "x.value = x.options[0].value; y.value = y.options[1].value; "
                          "front.candidates.forEach(c => c.sd = {[y.value]: 0.5}); draw(); "
                          "[...document.querySelectorAll('#plot line.err')].map(l => "
                          "[+l.getAttribute('x1') - +l.getAttribute('x2'), +l.getAttribute('y1') - +l.getAttribute('y2')]) }")
        assert len(bars) == len(front["candidates"]) and all(dx == 0 and dy != 0 for dx, dy in bars)
        # a finished job shows no stage and no time left, whatever progress it last reported
        assert browser.js("document.getElementById('stage').textContent") == ""
        shown = browser.js("showProgress({generation: 1, generations: 2, eta_seconds: 50}); "
                           "document.getElementById('prog').textContent")
        assert "generation 1/2" in shown and "left" not in shown
        assert browser.js("document.getElementById('bar').style.width") == "100%"

        # a merge job's page: its one checkpoint, selected, and no empty axes
        merge = client.submit({"kind": "merge", "base": "base", "method": "task_arithmetic", "device": "cpu",
                               "models": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}]})
        assert [e for e in client.events(merge["id"]) if e["type"] == "end"]
        browser.call("Page.navigate", url=f"{url}/jobs/{merge['id']}")
        browser.wait("document.getElementById('status')?.textContent === 'succeeded'")
        assert "no objectives to plot" in browser.wait("document.getElementById('plot').textContent")
        assert browser.js("document.querySelectorAll('#plot circle, #plot line').length") == 0
        assert browser.wait("document.getElementById('download') !== null")
    finally:
        browser.close()

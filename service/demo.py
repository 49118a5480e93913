"""`evomerge demo`: the whole product on the tiny zoo, as a user would drive it.

1. builds (or reuses) the tiny zoo: a char-level Llama base, task fine-tunes, benchmarks;
2. starts the service (`evomerge serve`: API plus one CPU worker) on a free loopback port;
3. submits an evolve job over REST: TIES over two fine-tunes (`inc` and `dup`), two
   objectives (each task's accuracy on 20 items per candidate, by the default `estimator: auto`:
   on the zoo, p-IRT on items chosen per candidate by adaptive testing), NSGA-II;
4. follows its progress (server-sent events), prints the Pareto front with estimated and
   true (fully re-evaluated) accuracies, downloads the knee point's checkpoint and loads it
   with transformers;
5. stops the service.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Two tasks whose fine-tunes merge well on the tiny zoo: TIES finds merges at 0.75 inc / 0.83 dup
# (rev and cip, the first two, leave a concave front whose knee sits next to the rev fine-tune).
DEMO_TASKS = ("inc", "dup")


def demo_spec(zoo: Path, manifest: dict, tasks: list[str], population: int, generations: int) -> dict:
    return {
        "kind": "evolve",
        "base": str(zoo / manifest["models"]["base"]["path"]),
        "models": [{"name": t, "path": str(zoo / manifest["models"][t]["path"])} for t in tasks],
        "method": "ties",
        "search": {"space": {"weights": [0.0, 1.5], "density": [0.1, 1.0]}, "algorithm": "nsga2",
                   "population": population, "generations": generations, "seed": 0},
        "objectives": [{"benchmark": str(zoo / manifest["benchmarks"][t]["path"])} for t in tasks],
        "evaluation": {"max_new_tokens": manifest["eval_settings"]["max_new_tokens"]},
        "device": "cpu",
    }


def run_demo(out: Path, population: int = 8, generations: int = 4, log=print) -> dict:
    from service.client import Client
    from zoo.build import build_zoo

    out = Path(out).resolve()
    zoo = out / "zoo"
    log(f"== 1. building the tiny zoo in {zoo}")
    manifest = build_zoo(zoo, preset="tiny", seed=0, log=log)
    tasks = list(DEMO_TASKS)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log(f"== 2. starting the service on {url}")
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                               "--artifacts", str(out / "artifacts"), "--model-root", str(out), "--devices", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=open(out / "service.log", "w"))
    try:
        client = Client(url)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.health()
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the service did not start; see {out / 'service.log'}") from None
                time.sleep(0.3)
        log(f"== 3. submitting an evolve job: ties over {tasks}, {population} x {generations} generations")
        job = client.submit(demo_spec(zoo, manifest, tasks, population, generations))

        def show(ev: dict) -> None:
            if ev.get("type") == "stage":
                log(f"   [{ev['stage']}]")
            elif ev.get("type") == "progress":
                best = ", ".join(f"{k}={v:.3f}" for k, v in ev["best"].items())
                log(f"   generation {ev['generation']}/{ev['generations']}: {ev['evaluations']} candidates, best {best}")

        final = client.wait(job["id"], on_event=show)
        if final["status"] != "succeeded":
            raise RuntimeError(f"job {job['id']} ended {final['status']}: {final.get('error')}")
        front = client.front(job["id"])
        log("== 4. Pareto front (estimated -> true accuracy)")
        names, knee = front["objectives"], front["knee"]
        rows: dict[str, list[int]] = {}  # genomes that merge alike print once
        for c in sorted((c for c in front["candidates"] if c["on_front"]), key=lambda c: -c["objectives"][names[0]]):
            cells = "  ".join(f"{n}: {c['objectives'][n]:.3f} -> {(c['true_objectives'] or {}).get(n, float('nan')):.3f}"
                              for n in names)
            rows.setdefault(cells, []).append(c["id"])
        for cells, ids in rows.items():
            first = knee if knee in ids else ids[0]
            same = f"  (= {', '.join(f'#{i}' for i in ids if i != first)})" if len(ids) > 1 else ""
            log(f"   #{first:<3} {cells}{'   <- knee' if first == knee else ''}{same}")
        dest = out / "knee-model"
        if dest.exists():  # the previous demo's download
            shutil.rmtree(dest)
        dest = client.download(job["id"], knee, dest)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(dest)
        log(f"   downloaded candidate {knee} to {dest} ({sum(p.numel() for p in model.parameters())} parameters, "
            f"loads in transformers)")
        return {"job": job["id"], "front": front, "knee_dir": str(dest)}
    finally:
        log("== 5. stopping the service")
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

"""The service commands: run the service (`serve`, `worker`), talk to one over REST (`submit`,
`status`, `cancel`, `download`, `benchmark`, through `service.client.Client`), and `demo`,
which does all of it end to end."""
from __future__ import annotations

import json
import time
from pathlib import Path

from service.client import ApiError, Client


def cmd_serve(args) -> None:
    from service.serve import serve

    devices = None if args.devices is None else [d.strip() for d in args.devices.split(",") if d.strip()]
    serve(args.host, args.port, args.db, args.artifacts, args.model_roots, devices, ray_address=args.ray_address,
          ray_jobs=args.ray_jobs)


def cmd_worker(args) -> None:
    import logging

    from service.worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_worker(args.db, args.artifacts, args.device, ray_address=args.ray_address)


def _progress_line(ev: dict) -> str | None:
    if ev.get("type") == "status":
        return f"status: {ev['status']}" + (f" ({ev['error']})" if ev.get("error") else "")
    if ev.get("type") == "stage":
        from service.cli.library import stage_name

        return f"stage: {stage_name(ev)}"
    if ev.get("type") == "progress":
        return "progress: " + ", ".join(f"{k} {v}" for k, v in ev.items() if k not in ("type", "id"))
    if ev.get("type") == "irt":
        from service.cli.library import fitness_line

        return "\n".join(([f"probes: {ev['probes']}"] if "probes" in ev else [])
                         + [f"fitness: {Path(b).name}: {fitness_line(i)}" for b, i in ev["benchmarks"].items()])
    return None


def cmd_submit(args) -> None:
    with Client(args.url, args.token) as c:
        job = c.submit(args.spec)
        print(job["id"])
        if args.wait:
            def show(ev: dict) -> None:
                line = _progress_line(ev)
                if line:
                    print(line, flush=True)

            final = c.wait(job["id"], show)
            if final["status"] != "succeeded":
                raise ApiError(f"job {job['id']} {final['status']}" + (f": {final['error']}" if final["error"] else ""))


def cmd_status(args) -> None:
    with Client(args.url, args.token) as c:
        if args.id is None:
            for j in c.jobs()["jobs"]:
                created = time.strftime("%Y-%m-%d %H:%M", time.localtime(j["created_at"]))
                print(f"{j['id']}  {j['kind']:6}  {j['status']:9}  {created}")
            return
        job = c.job(args.id)
        if args.json:
            print(json.dumps(job, indent=2))
            return
        print(f"{job['id']}  {job['kind']}  {job['status']}")
        if job["progress"]:
            print(_progress_line(job["progress"]))
        if job["error"]:
            print(f"error: {job['error']}")


def cmd_cancel(args) -> None:
    with Client(args.url, args.token) as c:
        status = c.cancel(args.id)["status"]
        print("cancel requested (the job stops at its next check)" if status == "running" else status)


def cmd_download(args) -> None:
    with Client(args.url, args.token) as c:
        print(c.download(args.id, args.cid, args.out or f"{args.id}-{args.cid}"))


def cmd_benchmark(args) -> None:
    with Client(args.url, args.token) as c:
        b = c.upload_benchmark(args.name, args.file)
        print(f"{b['name']}: {b['items']} items")


def cmd_demo(args) -> None:
    from service.demo import run_demo

    run_demo(Path(args.out), population=args.population, generations=args.generations,
             log=lambda m: print(m, flush=True))

"""Running the API: `serve` (uvicorn plus one worker process per device, what `evomerge serve`
runs), `BackgroundServer` (the API in a thread, for tests and notebooks) and `app_from_env`
(for `uvicorn --factory service.serve:app_from_env`)."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from fastapi import FastAPI

from .app import create_app
from .config import Settings
from .store import Store
from .worker import worker_command


def default_devices() -> list[str]:
    """Every visible GPU, or the CPU when there is none."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def start_workers(settings: Settings, devices: list[str]) -> list[subprocess.Popen]:
    return [subprocess.Popen(worker_command(settings, d, parent_pid=os.getpid())) for d in devices]


def stop_processes(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM (a worker requeues its running job), then SIGKILL whoever is still there."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def serve(host: str = "127.0.0.1", port: int = 8000, db_url: str | None = None,
          artifacts: str | os.PathLike | None = None, model_roots: list[str | os.PathLike] | None = None,
          devices: list[str] | None = None, settings: Settings | None = None, ray_address: str | None = None,
          ray_jobs: int | None = None) -> None:
    """Runs the API with uvicorn until SIGINT/SIGTERM, plus a worker process per device.

    `devices=None` means every GPU (or the CPU); `devices=[]` runs the API alone, for
    setups whose workers run elsewhere (`evomerge worker`) against a shared database.
    `ray_address` (or EVOMERGE_RAY_ADDRESS): instead, `ray_jobs` workers that run their jobs on
    that Ray cluster, each job where its resources are (service/ray_dispatch.py)."""
    import uvicorn

    settings = (settings or Settings.from_env()).with_(ray_address=ray_address, ray_jobs=ray_jobs)
    if settings.ray_address:
        devices = ["ray"] * settings.ray_jobs
    else:
        devices = default_devices() if devices is None else list(devices)
    settings = settings.with_(
        db_url=db_url, artifacts=Path(artifacts) if artifacts else None,
        model_roots=tuple(Path(p) for p in model_roots) if model_roots else None,
        devices=tuple(devices) if devices and not settings.ray_address else None)
    store = Store(settings.database_url)  # creates the schema before the workers start
    procs = start_workers(settings, devices)
    try:
        uvicorn.run(create_app(settings, store), host=host, port=port, log_level="info")
    finally:
        stop_processes(procs)
        store.close()


class BackgroundServer:
    """The API served by uvicorn in a thread of this process, on a free loopback port.

    For tests and notebooks: `with BackgroundServer(settings) as url: ...` (no workers;
    start those with `service.worker`)."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        self.app.state.store.close()


def app_from_env() -> FastAPI:
    """For `uvicorn --factory service.serve:app_from_env` (the API alone, settings from EVOMERGE_*)."""
    return create_app(Settings.from_env())

"""One job's work, wherever it runs (a worker process, or a Ray task, service/ray_dispatch.py):
a merge or a mergekit config into job_dir/model, a search in job_dir/search, a candidate's
download tar; and how results and errors are put for the store and the user."""
from __future__ import annotations

import math
import tarfile
from pathlib import Path
from typing import Any

from core.fs import atomic_file
from core.hooks import Hooks

from .config import Settings
from .store import Job


def jsonable(obj: Any) -> Any:
    """Plain JSON for the store and the browser: numpy scalars to numbers, NaN/inf to None."""
    if hasattr(obj, "to_json") and callable(obj.to_json):
        obj = obj.to_json()
    elif hasattr(obj, "__dataclass_fields__"):
        obj = dict(obj.__dict__)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def one_line(e: BaseException) -> str:
    """An error as the user sees it: the message's first line, with the type for unexpected errors."""
    msg = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, (ValueError, OSError)) and msg:
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def run_merge(spec, job_dir: Path, hooks: Hooks):
    """One merge (or a mergekit config) into job_dir/model; the result is candidate 0 with the
    spec's parameters. A training method (ATM) resumes from its state beside job_dir/model."""
    from merging import merge
    from merging.methods import get_method

    if spec.kind == "mergekit":
        from merging.mergekit import merge_mergekit

        hooks.emit({"type": "stage", "stage": "merging"})
        _, notes = merge_mergekit(spec, job_dir / "model", overwrite=True, progress=False, hooks=hooks)
        for note in notes:
            hooks.emit({"type": "note", "note": note})
        params = {"mergekit": spec.model_dump(mode="json", exclude={"kind", "device"}, exclude_none=True)}
        return [{"id": 0, "params": params, "objectives": {}, "true_objectives": None, "on_front": True}], {
            "knee": 0, "objectives": []}
    hooks.emit({"type": "stage", "stage": "merging" if get_method(spec.method).kind != "training" else spec.method})
    merge(spec, job_dir / "model", overwrite=True, progress=False, hooks=hooks)
    candidates = [{"id": 0, "params": spec.params, "objectives": {}, "true_objectives": None, "on_front": True}]
    return candidates, {"knee": 0, "objectives": []}


def run_evolve(spec, job_dir: Path, hooks: Hooks, resume: bool):
    """A Pareto search in job_dir/search (checkpointed there); the result is its front."""
    import evolve

    def progress(event) -> None:
        data = jsonable(event)
        data.setdefault("type", "progress")
        hooks.emit(data)

    result = evolve.run(spec, job_dir / "search", hooks=Hooks(progress, hooks.should_stop), resume=resume)
    from evolve.search import CANDIDATES_FILE, read_candidates

    front = [jsonable(c) | {"on_front": True} for c in result.front]
    on_front = {c["id"] for c in front}
    dominated = [jsonable(c) | {"on_front": False}
                 for c in read_candidates(job_dir / "search" / CANDIDATES_FILE) if c.id not in on_front]
    summary = {"knee": jsonable(result.knee), "hypervolume": jsonable(result.hypervolume),
               "true_hypervolume": jsonable(result.true_hypervolume), "cost": jsonable(result.cost),
               "objectives": [o["name"] for o in result.objectives],
               "senses": {o["name"]: o["sense"] for o in result.objectives}}
    return front + dominated, summary, result.complete


def build_checkpoint_tar(settings: Settings, job: Job, cid: int) -> Path:
    """The tar of candidate `cid` as a HF folder (exported first for evolve jobs); cached on disk."""
    job_dir = settings.job_dir(job.id)
    exports = job_dir / "exports"
    tar_path = exports / f"{cid}.tar"
    if tar_path.is_file():
        return tar_path
    exports.mkdir(parents=True, exist_ok=True)
    if job.kind in ("merge", "mergekit"):
        folder = job_dir / "model"
    else:
        import evolve

        folder = exports / str(cid)
        if not (folder / "config.json").is_file():
            # on the CPU where export allows it: the API process should not compete with workers for a GPU
            evolve.export(job_dir / "search", cid, folder, overwrite=True, device="cpu")
    if not folder.is_dir():
        raise FileNotFoundError(f"the output of job {job.id} is missing from the artifacts folder")
    with atomic_file(tar_path) as tmp, tarfile.open(tmp, "w") as tf:
        tf.add(folder, arcname=f"{job.id}-{cid}")
    return tar_path

"""Session fixtures: the model zoo, and a cache folder inside the repository.

The tiny zoo is built once into a cache folder shared by test sessions
(`$EVOMERGE_ZOO_CACHE`, default `.cache/zoo-tiny-seed0` in the repository); later
sessions reuse it after `build_zoo` has checked every file's hash (about a second).
The fixture builds with `strict=False`, so a zoo that misses a quality threshold fails
the quality tests in test_zoo.py instead of erroring every test that uses the zoo.
"""
import json
import os
from pathlib import Path

import pytest

# Hashes and evaluation responses go to the repository's cache, not the user's.
os.environ.setdefault("EVOMERGE_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "evomerge"))
ZOO_CACHE = Path(os.environ.get("EVOMERGE_ZOO_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "zoo-tiny-seed0"))


@pytest.fixture(scope="session")
def tiny_zoo() -> Path:
    """The folder of the tiny zoo, seed 0 (see zoo/build.py for its layout)."""
    from zoo.build import build_zoo

    build_zoo(ZOO_CACHE, preset="tiny", seed=0, log=lambda line: None, strict=False)
    return ZOO_CACHE


@pytest.fixture(scope="session")
def tiny_zoo_manifest(tiny_zoo) -> dict:
    """The tiny zoo's zoo.json."""
    return json.loads((tiny_zoo / "zoo.json").read_text())


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    """A real local Ray cluster with 2 CPUs, started once for the session; its address (what
    another process's `ray.init(address=...)` or a spec's `execution.address` names)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One torch thread in the test process: on 2 shared cores, two threads stall on each
    other (measured 5-100x slower); test.sh also sets OMP_NUM_THREADS=1 for the subprocesses."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where CUDA is, or when `-m` names them (then, without CUDA,
    they fail: asked for, they are not silently passed over)."""
    import torch

    if torch.cuda.is_available() or "gpu" in (config.getoption("markexpr") or ""):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]

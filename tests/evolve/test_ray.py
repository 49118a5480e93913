"""Evaluators on a real local Ray cluster (started here, 2 CPUs): the same run as the local
backend, actors killed and replaced, the driver killed and resumed."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from factories import state_dict
from test_evolve import spec_for

from core.hooks import Hooks
from evolve import EvolveSpec, export, run
from evolve.execution import RayPool

pytestmark = pytest.mark.slow


def nsga2(zoo, manifest, **execution):
    spec = spec_for(zoo, manifest, algorithm="nsga2", population=6, generations=2)
    if execution:
        spec["execution"] = {"backend": "ray", "evaluators": 2, **execution}
    return spec


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]


def same_run(a: Path, b: Path) -> None:
    ra, rb = records(a), records(b)
    assert [(c["genome"], c["objectives"], c["trace"]) for c in ra] == [(c["genome"], c["objectives"], c["trace"])
                                                                        for c in rb]
    fa, fb = (json.loads((p / "front.json").read_text()) for p in (a, b))
    assert [(c["id"], c["true_objectives"]) for c in fa["front"]] == [(c["id"], c["true_objectives"])
                                                                      for c in fb["front"]]


@pytest.fixture(scope="module")
def local_run(tiny_zoo, tiny_zoo_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    run(nsga2(tiny_zoo, tiny_zoo_manifest), out)
    return out


def test_two_evaluators_give_the_local_backends_run(ray_cluster, local_run, tiny_zoo, tiny_zoo_manifest, tmp_path,
                                                    monkeypatch):
    events = []
    result = run(nsga2(tiny_zoo, tiny_zoo_manifest, address=ray_cluster), tmp_path / "ray", hooks=Hooks(events.append))
    same_run(local_run, tmp_path / "ray")
    evaluators = result.cost["evaluators"]
    assert len(evaluators) == 2 and sum(e["candidates"] for e in evaluators) == 12
    assert all(e["candidates"] > 0 and e["tasks"].get("full") for e in evaluators)  # both shared the final check
    assert sum(e["tasks"]["endpoint"] for e in evaluators) == 3  # base and two models, one task each
    assert [len(e["evaluators"]) for e in events if e["type"] == "progress"] == [2, 2]
    # the actors are gone with the job
    assert not [a for a in ray.util.list_named_actors() if a.startswith("evomerge-")]
    # a run made on Ray exports where Ray is missing (exporting needs none)
    import evolve.execution

    monkeypatch.setattr(evolve.execution, "ray_available", lambda: False)
    ours = state_dict(export(tmp_path / "ray", result.knee, tmp_path / "knee"))
    theirs = state_dict(export(local_run, result.knee, tmp_path / "local-knee"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_killed_actor_is_replaced_and_its_candidate_retried(ray_cluster, local_run, tiny_zoo, tiny_zoo_manifest,
                                                              tmp_path):
    killed = []

    def kill_one(event):
        if event["type"] == "progress" and not killed:  # between the generations: the next task finds it dead
            name = sorted(a for a in ray.util.list_named_actors() if a.startswith("evomerge-"))[0]
            ray.kill(ray.get_actor(name))
            killed.append(name)

    result = run(nsga2(tiny_zoo, tiny_zoo_manifest, address=ray_cluster), tmp_path / "ray", hooks=Hooks(kill_one))
    assert killed and sum(e["replaced"] for e in result.cost["evaluators"]) == 1
    rows = records(tmp_path / "ray")
    assert len(rows) == 12 and len({r["key"] for r in rows}) == 12  # every candidate scored and recorded once
    same_run(local_run, tmp_path / "ray")


DRIVER = """
import os, signal, sys
sys.path[:0] = [{root!r}]; sys.path += [{tests!r}, {tests!r} + "/evolve"]
from core.hooks import Hooks
from evolve import run
spec = {spec!r}
run(spec, {out!r}, hooks=Hooks(lambda e: e["type"] == "progress" and os.kill(os.getpid(), signal.SIGKILL)))
"""


def test_a_killed_driver_resumes_to_the_same_run(ray_cluster, local_run, tiny_zoo, tiny_zoo_manifest, tmp_path):
    spec = nsga2(tiny_zoo, tiny_zoo_manifest, address=ray_cluster)
    tests = str(Path(__file__).parents[1])
    code = DRIVER.format(root=str(Path(tests).parent), tests=tests, spec=spec, out=str(tmp_path / "ray"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    before = records(tmp_path / "ray")
    assert len(before) == 6 and not (tmp_path / "ray" / "front.json").exists()
    result = run(spec, tmp_path / "ray", resume=True)
    assert result.cost["evaluated_this_run"] == 6  # the first generation is not scored again
    same_run(local_run, tmp_path / "ray")


class Fragile:
    """A Ray actor whose process dies on a task: on `always`, at every try; on `once`, at the first
    (a marker file remembers it across the replacement)."""

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def work(self, x):
        if x == "always" or (x == "once" and not self.marker.exists()):
            self.marker.touch()
            os._exit(1)
        return x * 2 if isinstance(x, int) else x


class Unfit:
    """An actor whose constructor refuses, as an evaluator whose memory plan does not fit its node."""

    def __init__(self):
        raise ValueError("evaluation.batch_size: 512 does not fit this node's memory")

    def work(self, x):
        return x


def test_an_actor_that_cannot_start_fails_at_once_with_its_reason(ray_cluster):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pool = RayPool(Unfit, (), 1, {"num_cpus": 0.5})
    try:
        with pytest.raises(ValueError, match=r"evaluator 0 could not start: evaluation\.batch_size: 512 does not fit"):
            list(pool.imap("work", [(1,)]))
        assert pool.stats[0].replaced == 0  # not retried: its constructor would refuse again
    finally:
        pool.close()


def test_a_task_that_kills_its_actor_twice_fails_naming_it(ray_cluster, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pool = RayPool(Fragile, (str(tmp_path / "marker"),), 2, {"num_cpus": 0.5})
    try:
        assert sorted(pool.imap("work", [(1,), ("once",), (3,)])) == [(0, 2), (1, "once"), (2, 6)]
        assert sum(s.replaced for s in pool.stats) == 1
        with pytest.raises(RuntimeError, match="died twice on the same work task"):
            list(pool.imap("work", [("always",)]))
    finally:
        pool.close()


def test_ray_backend_is_refused_where_ray_is_missing(monkeypatch, tiny_zoo, tiny_zoo_manifest):
    import evolve.execution as execution

    spec = nsga2(tiny_zoo, tiny_zoo_manifest, address="auto")
    assert EvolveSpec.model_validate(spec).search.batch == 1  # nsga2: a generation is the batch
    bo = {**spec, "search": {**spec["search"], "algorithm": "bo"}}
    assert EvolveSpec.model_validate(bo).search.batch == 2  # bo: q = N
    monkeypatch.setattr(execution, "ray_available", lambda: False)
    with pytest.raises(ValueError, match=r"execution\.backend: ray is not installed"):
        EvolveSpec.model_validate(spec)

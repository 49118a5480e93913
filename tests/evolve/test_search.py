"""The search loop on tiny models with a closed-form objective: squared distance of the
candidate's weights to each fine-tune (two objectives, both minimized)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import perturbed, save, state_dict, tiny_llama

from evolve.genome import SearchSpace
from evolve.materialize import ResidentMerge
from evolve.problem import CandidateEvaluator, MergeProblem
from evolve.search import run_search
from fitness.fitness import Objective, Score


class DistanceScorer:
    """Objective j: ||theta - theta_j||^2 over all parameters (an exact, cheap fitness)."""

    def __init__(self, models):
        self.targets = [state_dict(m) for m in models]
        a, b = self.targets
        worst = 2 * float(sum(((a[k] - b[k]) ** 2).sum() for k in a))
        self.objectives = [Objective(f"dist{j}", "min", worst=worst) for j in range(len(models))]

    def settings_key(self):
        return "distance-v1"

    def score(self, model):
        sd = model.state_dict()
        return Score({o.name: float(sum(((sd[k] - t[k]) ** 2).sum() for k in t))
                      for o, t in zip(self.objectives, self.targets)}, items=1, forward_passes=0)

    score_full = score


def family(root: Path):
    base = root / "base"
    if not base.exists():
        save(tiny_llama(), base)
        for i in range(2):
            perturbed(base, root / f"ft{i}", seed=i + 1, scale=0.05)
    return base, [root / "ft0", root / "ft1"]


def search(root: Path, out: Path, resume=False, kill_after=None, method="ties", generations=4):
    base, models = family(root)
    space = SearchSpace(method, 2)
    resident = ResidentMerge(base, models, method, device="cpu")
    scorer = DistanceScorer(models)
    problem = MergeProblem(space, scorer.objectives)
    ev = CandidateEvaluator(space, resident, scorer)

    def cb(p):
        if kill_after is not None and p.generation == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    return run_search(problem, ev, out, population=6, generations=generations, seed=3, resume=resume,
                      fingerprint="f", callback=cb), ev


def test_front_is_non_dominated_and_in_memory_equals_export(tmp_path):
    res, ev = search(tmp_path, tmp_path / "run")
    assert len(res.candidates) >= 6 * 2
    F = np.array([[c.objectives["dist0"], c.objectives["dist1"]] for c in res.candidates])
    front = set(res.front)
    for i in front:
        assert not any((F[j] <= F[i]).all() and (F[j] < F[i]).any() for j in range(len(F)))
    for i in set(range(len(F))) - front:
        assert any((F[j] <= F[i]).all() and (F[j] < F[i]).any() for j in range(len(F)))
    assert res.knee in front and res.hypervolume > 0
    # the candidate in memory equals the streamed checkpoint of the same parameters
    from merging import merge
    knee = res.candidates[res.knee]
    base, models = family(tmp_path)
    out = merge({"base": base, "models": [{"name": f"m{i}", "path": p} for i, p in enumerate(models)],
                 "method": "ties", "params": knee.params[0], "device": "cpu"}, tmp_path / "knee", progress=False)
    resident_sd = ev.resident.materialize(ev.space.params_for_tensor(np.array(knee.genome))).state_dict()
    exported = state_dict(out)
    for k, v in exported.items():
        assert torch.equal(v, resident_sd[k]), k
    lines = (tmp_path / "run" / "candidates.jsonl").read_text().splitlines()
    assert len(lines) == len(res.candidates) and len({json.loads(x)["key"] for x in lines}) == len(lines)


SCRIPT = """
import sys; sys.path[:0] = [{tests!r}, {tests!r} + "/.."]  # the test module and factories
from pathlib import Path
from test_search import search
search(Path({root!r}), Path({out!r}), resume={resume}, kill_after={kill})
"""


def test_killed_run_resumes_to_the_same_front(tmp_path):
    family(tmp_path)
    full, _ = search(tmp_path, tmp_path / "full")
    code = SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path), out=str(tmp_path / "killed"),
                         resume=False, kill=2)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    before = (tmp_path / "killed" / "candidates.jsonl").read_text().splitlines()
    assert 6 <= len(before) < len(full.candidates)
    resumed, ev = search(tmp_path, tmp_path / "killed", resume=True)
    assert ev.evaluated == len(full.candidates) - len(before)  # nothing scored twice
    key = lambda res: sorted(tuple(res.candidates[i].genome) for i in res.front)  # noqa: E731
    assert key(resumed) == key(full)
    assert [c.genome for c in resumed.candidates] == [c.genome for c in full.candidates]


def test_resume_refuses_another_spec(tmp_path):
    search(tmp_path, tmp_path / "run", generations=1)
    base, models = family(tmp_path)
    space = SearchSpace("ties", 2)
    scorer = DistanceScorer(models)
    ev = CandidateEvaluator(space, ResidentMerge(base, models, "ties", device="cpu"), scorer)
    with pytest.raises(ValueError, match="different spec"):
        run_search(MergeProblem(space, scorer.objectives), ev, tmp_path / "run", resume=True, fingerprint="other")


def stoppable_search(root: Path, scorer_cls, algorithm: str, generations: int):
    """`go(out, resume, stop_at)`: a task-arithmetic search over `family(root)`, stopped after `stop_at` generations."""
    base, models = family(root)
    space = SearchSpace("task_arithmetic", 2)
    scorer = scorer_cls(models)
    resident = ResidentMerge(base, models, "task_arithmetic", device="cpu")

    def go(out, resume=False, stop_at=None):
        ev = CandidateEvaluator(space, resident, scorer)
        stop = (lambda: len({c.generation for c in ev.candidates}) >= stop_at) if stop_at else None
        return run_search(MergeProblem(space, scorer.objectives), ev, out, algorithm=algorithm, population=6,
                          generations=generations, seed=0, resume=resume, should_stop=stop)

    return go


@pytest.mark.parametrize("algorithm", ["bo", "nsga2", "nsga3", "smsemoa", "moead"])
def test_every_algorithm_stops_and_resumes_exactly(tmp_path, algorithm):
    go = stoppable_search(tmp_path, DistanceScorer, algorithm, generations=4)

    full = go(tmp_path / "full")
    part = go(tmp_path / "part", stop_at=2)
    assert len(part.candidates) < len(full.candidates)
    resumed = go(tmp_path / "part", resume=True)
    assert [c.genome for c in resumed.candidates] == [c.genome for c in full.candidates]
    assert resumed.front == full.front


class OneDistance(DistanceScorer):
    """One objective: the summed squared distance to both fine-tunes (minimized at their midpoint)."""

    def __init__(self, models):
        super().__init__(models)
        self.objectives = [Objective("dist", "min", worst=self.objectives[0].worst * 2)]

    def score(self, model):
        sd = model.state_dict()
        return Score({"dist": float(sum(((sd[k] - t[k]) ** 2).sum() for t in self.targets for k in t))})


@pytest.mark.parametrize("algorithm", ["ga", "cmaes", "nsga2", "bo"])
def test_single_objective_algorithms_improve_and_resume(tmp_path, algorithm):
    go = stoppable_search(tmp_path, OneDistance, algorithm, generations=5)

    full = go(tmp_path / "full")
    first = [c.objectives["dist"] for c in full.candidates if c.generation == 0]
    best = full.candidates[full.knee].objectives["dist"]
    assert best <= min(first) and len(full.front) >= 1
    # the optimum of |theta - ft0|^2 + |theta - ft1|^2 over task arithmetic is weights (0.5, 0.5)
    assert np.allclose(full.candidates[full.knee].genome, [0.5, 0.5], atol=0.25)
    go(tmp_path / "part", stop_at=2)
    resumed = go(tmp_path / "part", resume=True)
    assert [c.genome for c in resumed.candidates] == [c.genome for c in full.candidates]


def test_resume_after_the_last_checkpoint_reports_the_final_generation(tmp_path):
    """A run killed after its last checkpoint but before reporting it: the resumed run reports
    the generation it restored (the service shows it), and evaluates nothing again."""
    base, models = family(tmp_path)
    space = SearchSpace("ties", 2)
    resident = ResidentMerge(base, models, "ties", device="cpu")
    scorer = DistanceScorer(models)

    def go(events):
        ev = CandidateEvaluator(space, resident, scorer)
        res = run_search(MergeProblem(space, scorer.objectives), ev, tmp_path / "run", population=6, generations=3,
                         seed=3, resume=True, fingerprint="f", callback=events.append)
        return res, ev

    first_events, again_events = [], []
    first, _ = go(first_events)
    again, ev = go(again_events)
    assert [p.generation for p in first_events] == [1, 2, 3]
    assert [p.generation for p in again_events] == [3] and ev.evaluated == 0
    assert again_events[0].evaluations == len(first.candidates) and again.front == first.front
    assert again_events[0].hypervolume == first_events[-1].hypervolume


def test_a_method_version_change_refuses_the_old_checkpoint(monkeypatch):
    """The resume fingerprint: the spec's JSON alone for a version-1 method (old checkpoints still
    resume), and with the version where a method's values changed (DARE's masks: version 2), so a
    checkpoint scored under another version is not resumed."""
    import dataclasses
    import hashlib

    from evolve.run import _fingerprint
    from evolve.spec import EvolveSpec
    from merging.methods import registry

    def spec(method):
        return EvolveSpec.model_validate({"kind": "evolve", "base": "/b", "method": method,
                                          "models": [{"name": "x", "path": "/x"}, {"name": "y", "path": "/y"}],
                                          "objectives": [{"benchmark": "/mc.jsonl"}]})

    ties = spec("ties")
    plain = hashlib.sha256(ties.model_dump_json(exclude={"device", "output", "execution"}).encode()).hexdigest()
    assert _fingerprint(ties) == plain
    dare = spec("dare_ties")
    now = _fingerprint(dare)
    monkeypatch.setitem(registry.METHODS, "dare_ties", dataclasses.replace(registry.METHODS["dare_ties"], version=1))
    assert _fingerprint(dare) != now

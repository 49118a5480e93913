"""evolve.run end to end on the tiny zoo: real models, real benchmarks, IRT fitness."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import state_dict

from core.hooks import Hooks
from data.benchmarks import load_benchmark
from evolve import EvolveSpec, export, run
from evolve.genome import SearchSpace
from fitness.evaluate import EvalSettings, evaluate_folder

pytestmark = pytest.mark.slow


def spec_for(zoo, manifest, **search):
    tasks = ["rev", "cip"]
    return {
        "kind": "evolve",
        "base": str(zoo / manifest["models"]["base"]["path"]),
        "models": [{"name": t, "path": str(zoo / manifest["models"][t]["path"])} for t in tasks],
        "method": "ties",
        "search": {"population": 6, "generations": 3, "seed": 1, **search},
        # fitness left to the defaults (auto: the CAT or blend_irt on 20 items), as a user's spec would
        "objectives": [{"benchmark": str(zoo / manifest["benchmarks"][t]["path"])} for t in tasks],
        "evaluation": {"max_new_tokens": manifest["eval_settings"]["max_new_tokens"], "irt": {"probes": 5, "epochs": 200}},
        "device": "cpu",
    }


@pytest.fixture(scope="module")
def finished(tiny_zoo, tiny_zoo_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("evolve") / "run"
    events = []
    result = run(spec_for(tiny_zoo, tiny_zoo_manifest), out, hooks=Hooks(events.append))
    return out, result, events


def test_front_is_non_dominated_and_reported(finished):
    out, result, events = finished
    doc = json.loads((out / "front.json").read_text())
    cands = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    names = [o["name"] for o in doc["objectives"]]
    F = np.array([[c["objectives"][n] for n in names] for c in cands])  # both maximized
    front = {c["id"] for c in doc["front"]}
    for i in range(len(F)):
        dominated = any((F[j] >= F[i]).all() and (F[j] > F[i]).any() for j in range(len(F)))
        assert dominated == (i not in front)
    # the default search for 6 x 3 candidates is bo, one candidate per ask
    assert [e["generation"] for e in events if e["type"] == "progress"] == list(range(1, 19)) and len(cands) == 18
    assert {e["stage"] for e in events if e["type"] == "stage"} >= {"endpoints", "probes", "irt", "search", "final_check"}
    # the capped final check: min(8, front) members, the knee and each objective's best among them
    checked = {c["id"] for c in doc["front"] if c["true_objectives"] is not None}
    assert len(checked) == min(8, len(doc["front"])) == doc["cost"]["final_checked"]
    assert doc["knee"] in checked
    for n in names:
        assert max(doc["front"], key=lambda c: c["objectives"][n])["id"] in checked
    assert doc["cost"]["items_per_candidate"] <= 40 < doc["cost"]["full_items_per_candidate"]
    assert (out / "front.png").stat().st_size > 1000
    # estimator auto chose, per benchmark, one of its three settings (its rule: tests/fitness), and each
    # estimate keeps its sd: the CAT's Laplace sd (times its line's slope) with the job's model error,
    # or the blend's rmse
    for t in ("rev", "cip"):
        key = next(k for k in doc["fitness"] if k.endswith(f"{t}.jsonl"))
        fit = doc["fitness"][key]
        auto = fit["auto"]
        assert set(auto["loo_mae"]) == {"p_irt", "p_irt_line", "blend_irt"} and auto["rows"] == 5
        assert fit["strategy"] == auto["strategy"] and ("blend" in fit) == (auto["estimator"] == "blend_irt")
        slope = auto["line"]["slope"] if auto["line"] else 1.0
        assert 0.0 <= slope <= 1.0 and (auto["line"] is False or auto["estimator"] == "p_irt")
        for c in cands:
            assert (key in (c["trace"] or {})) == (fit["strategy"] == "adaptive")
            want = (np.hypot(slope * c["trace"][key]["sd"], fit["model_sd"]) if key in (c["trace"] or {})
                    else fit["blend"]["rmse"])
            assert c["sd"][f"{t}:accuracy"] == pytest.approx(float(want)) and want > 0
    assert all(f["sd"] == next(c["sd"] for c in cands if c["id"] == f["id"]) for f in doc["front"])


def test_cli_progress_says_what_auto_chose(finished, capsys):
    """`evomerge evolve`'s progress prints one line per benchmark at the irt stage naming the
    setting auto chose (as front.json records it) and the errors it chose by."""
    from service.cli.library import ProgressPrinter

    out, _, events = finished
    doc = json.loads((out / "front.json").read_text())
    ProgressPrinter()(next(e for e in events if e["type"] == "irt"))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "  probes: 5" and len(lines) - 1 == len(doc["fitness"]) == 2
    for key, info in doc["fitness"].items():
        line = next(x for x in lines if x.strip().startswith(Path(key).name + ":"))
        chosen = "blend_irt on 20 fixed random items" if info["auto"]["estimator"] == "blend_irt" else (
            "p_irt on 20 adaptive items")
        assert chosen in line and ("mapped by" in line) == bool(info["auto"]["line"])
        assert f"p_irt {100 * info['auto']['loo_mae']['p_irt']:.1f}" in line


def test_exported_knee_loads_and_scores_its_true_objectives(finished, tiny_zoo, tiny_zoo_manifest, tmp_path):
    out, result, _ = finished
    folder = export(out, result.knee, tmp_path / "knee")
    knee = next(c for c in result.front if c["id"] == result.knee)
    settings = EvalSettings(max_new_tokens=tiny_zoo_manifest["eval_settings"]["max_new_tokens"])
    for t in ("rev", "cip"):
        bench = load_benchmark(tiny_zoo / tiny_zoo_manifest["benchmarks"][t]["path"])
        acc = evaluate_folder(folder, bench, settings, device="cpu", use_cache=False).accuracy
        assert abs(acc - knee["true_objectives"][f"{t}:accuracy"]) < 1e-9


def test_in_memory_candidate_equals_export(finished, tmp_path):
    out, result, _ = finished
    from evolve.materialize import ResidentMerge

    spec = EvolveSpec.model_validate_json((out / "spec.json").read_text())
    c = result.front[0]
    resident = ResidentMerge(spec.base, [m.path for m in spec.models], spec.method, device="cpu")
    space = SearchSpace(spec.method, 2)
    resident.materialize(space.params_for_tensor(np.array(c["genome"])))
    exported = state_dict(export(out, c["id"], tmp_path / "c"))
    for k, v in resident.state_dict().items():
        assert torch.equal(v, exported[k]), k


KILL = """
import os, signal, sys
sys.path[:0] = [{tests!r}, {tests!r} + "/.."]  # the test module and factories
from core.hooks import Hooks
from evolve import run
from test_evolve import spec_for
import json, pathlib
zoo = pathlib.Path({zoo!r})
manifest = json.loads((zoo / "zoo.json").read_text())
def cb(e):
    if e.get("type") == "progress" and e["generation"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
run(spec_for(zoo, manifest), {out!r}, hooks=Hooks(cb))
"""


def test_killed_run_resumes_to_the_same_front(finished, tiny_zoo, tiny_zoo_manifest, tmp_path):
    out, result, _ = finished
    killed = tmp_path / "killed"
    code = KILL.format(tests=str(__import__("pathlib").Path(__file__).parent), zoo=str(tiny_zoo), out=str(killed))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (killed / "front.json").exists()
    done_before = len((killed / "candidates.jsonl").read_text().splitlines())
    resumed = run(spec_for(tiny_zoo, tiny_zoo_manifest), killed, resume=True)
    assert resumed.cost["evaluated_this_run"] == resumed.cost["candidates"] - done_before
    assert sorted(c["genome"] for c in resumed.front) == sorted(c["genome"] for c in result.front)
    assert resumed.knee == result.knee


def test_probe_answers_are_cached_and_equal_fresh_ones(tiny_zoo, tiny_zoo_manifest, tmp_path, monkeypatch):
    """A second setup of the same job reads the probes' answers from the response cache instead
    of materializing and evaluating them, and fits the same IRT and subsets from them."""
    import fitness.evaluate as fe
    from evolve.run import setup

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    raw = spec_for(tiny_zoo, tiny_zoo_manifest)
    for o in raw["objectives"]:  # entropy subsets come from the probes' answers
        o.update(estimator="gmp_irt", subset={"size": 20, "strategy": "entropy"})
    spec = EvolveSpec.model_validate(raw)
    calls = []
    real = fe.evaluate
    monkeypatch.setattr(fe, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = setup(spec)
    n_first = len(calls)
    second = setup(spec)
    assert n_first == 5 * 2 + 3 * 2  # 5 probes and 3 endpoints (fresh cache) on 2 benchmarks, then nothing
    assert len(calls) == n_first
    assert second.cost["probe_items"] == first.cost["probe_items"] > 0
    for key, fit in first.fitness.fits.items():
        again = second.fitness.fits[key]
        assert len(fit.subset.indices) == 20 and np.array_equal(fit.subset.indices, again.subset.indices)
        assert np.allclose(fit.item_params.a, again.item_params.a) and np.allclose(fit.item_params.b, again.item_params.b)
        assert np.allclose(fit.endpoint_thetas, again.endpoint_thetas)


def test_probes_grow_in_batches_while_the_last_helped_and_they_are_cheap(tiny_zoo, tiny_zoo_manifest, tmp_path,
                                                                         monkeypatch):
    """fitness.probes in a job: with room in the budget, a batch of 2 follows the first 5 probes,
    and the second batch only if the first one's gain helped on some benchmark (its probe_gain
    event says), up to 5 + 4; with every batch helping, exactly 9 (the batches' own Latin
    hypercubes, in order); with the probes too dear next to the search, 5."""
    from evolve.run import probe_recipes, setup
    from fitness.probes import ProbeGain
    from service.cli.library import stage_name

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    raw = spec_for(tiny_zoo, tiny_zoo_manifest)
    raw["evaluation"]["irt"].update(more_probes=4, probe_batch=2, probe_share=100.0)
    spec = EvolveSpec.model_validate(raw)
    per_probe = sum(len(load_benchmark(o.benchmark)) for o in spec.objectives)
    events = []
    job = setup(spec, Hooks(events.append))
    gains = [e for e in events if e["type"] == "probe_gain"]  # measured after each batch another could follow
    n = len(job.probes[0])
    assert [e["probes"] for e in gains] == [7]
    assert n == (9 if any(b["helped"] for b in gains[0]["benchmarks"].values()) else 7)
    assert [e for e in events if e["type"] == "irt"][-1]["probes"] == n and job.cost["probe_items"] == n * per_probe
    stages = [e for e in events if e["type"] == "stage" and e["stage"] == "probes"]
    assert [stage_name(e) for e in stages] == ["probes"] + [f"probes, batch {j}" for j in range(1, (n - 5) // 2 + 1)]

    monkeypatch.setattr(ProbeGain, "helped", property(lambda self: True))
    grown = setup(spec).probes[0]
    batches = [np.array([x for x, _ in probe_recipes(spec, job.space, j)]) for j in range(3)]
    assert len(grown) == 9 and np.array_equal(grown, np.vstack(batches)) and np.array_equal(job.probes[0], grown[:n])
    raw["evaluation"]["irt"]["probe_share"] = 0.5  # 7 probes' items > half of 6 x 3 candidates' 40
    dear = setup(EvolveSpec.model_validate(raw))
    assert len(dear.probes[0]) == 5 and all("probe_gain" not in b for b in dear.fitness.describe().values())


def test_full_estimator_final_check_reuses_exact_objectives(tiny_zoo, tiny_zoo_manifest, tmp_path):
    spec = spec_for(tiny_zoo, tiny_zoo_manifest, population=4, generations=2)
    for o in spec["objectives"]:
        o["estimator"] = "full"
    res = run(spec, tmp_path / "run")
    front = json.loads((tmp_path / "run" / "front.json").read_text())["front"]
    assert res.cost["final_items"] == 0 and front
    knee = next(c for c in front if c["knee"])
    bench = load_benchmark(tiny_zoo / tiny_zoo_manifest["benchmarks"]["rev"]["path"])
    folder = export(tmp_path / "run", knee["id"], tmp_path / "knee")
    settings = EvalSettings(max_new_tokens=tiny_zoo_manifest["eval_settings"]["max_new_tokens"])
    measured = evaluate_folder(folder, bench, settings, device="cpu", use_cache=False).accuracy
    label = next(k for k in knee["true_objectives"] if "rev" in k)
    assert knee["true_objectives"] == knee["objectives"]
    assert measured == pytest.approx(knee["true_objectives"][label], abs=1e-9)


@pytest.mark.parametrize("method,blocks", [("ties", 1), ("tsv", 3), ("task_arithmetic", 2)])
def test_probes_are_a_latin_hypercube_of_the_search_space(method, blocks):
    """Probe genomes: inside the bounds, every gene's range cut in n equal strata with exactly one
    probe in each (Latin hypercube), the same for a seed and different for another."""
    from evolve.run import probe_genomes

    space = SearchSpace(method, 3, n_blocks=blocks, n_layers=6)
    n = 7
    X = probe_genomes(space, n, seed=3)
    low, high = space.bounds
    assert X.shape == (n, space.n_var) and np.all(X >= low) and np.all(X <= high)
    strata = np.floor((X - low) / (high - low) * n).astype(int)
    for g in range(space.n_var):
        assert sorted(strata[:, g]) == list(range(n))
    assert np.array_equal(X, probe_genomes(space, n, seed=3))
    assert not np.allclose(X, probe_genomes(space, n, seed=4))
    for x in X:  # every probe is a valid parameter set of the method
        assert len(space.params(x)) == blocks


def test_run_folders_are_claimed_before_any_work(finished, tiny_zoo, tiny_zoo_manifest, tmp_path):
    """A folder holding a run is neither replaced silently nor resumed by another spec (nothing
    written: export still builds what was scored), missing models fail at once, and a run whose
    models changed on disk is neither resumed nor exported."""
    import shutil

    out, result, _ = finished
    run_copy = tmp_path / "run"
    shutil.copytree(out, run_copy)
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    spec = spec_for(tiny_zoo, tiny_zoo_manifest)
    other = spec | {"method": "dare_ties"}
    with pytest.raises(ValueError, match="holds an evolve run"):
        run(spec, run_copy)
    with pytest.raises(ValueError, match="different spec"):
        run(other, run_copy, resume=True)
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == before

    missing = spec | {"models": [spec["models"][0], {"name": "gone", "path": str(tmp_path / "nowhere")}]}
    with pytest.raises(ValueError, match="no such model folder"):
        run(missing, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()

    zoo = tmp_path / "zoo"  # the same run over a copy of the zoo whose cip model is then replaced
    shutil.copytree(tiny_zoo, zoo)
    moved = json.loads(json.dumps(spec).replace(str(tiny_zoo), str(zoo)))
    res = run(moved | {"search": {**spec["search"], "generations": 1}, "final_check": False}, tmp_path / "moved")
    export(tmp_path / "moved", res.knee, tmp_path / "ok")  # unchanged inputs export fine
    cip = zoo / tiny_zoo_manifest["models"]["cip"]["path"]
    rev = zoo / tiny_zoo_manifest["models"]["rev"]["path"]
    shutil.copy(rev / "model.safetensors", cip / "model.safetensors")
    with pytest.raises(ValueError, match=r"models\[1\].*changed on disk"):
        export(tmp_path / "moved", res.knee, tmp_path / "stale")
    with pytest.raises(ValueError, match=r"models\[1\].*changed on disk"):
        run(moved | {"search": {**spec["search"], "generations": 1}, "final_check": False}, tmp_path / "moved",
            resume=True)
    assert not (tmp_path / "stale").exists()


@pytest.mark.parametrize("store", ["lowrank", "sparse"])
def test_job_with_a_compressed_store_checks_the_exact_merge(tiny_zoo, tiny_zoo_manifest, tmp_path, store):
    """A job whose task vectors live in a compressed store searches on the compressed merges, but
    its final check measures the exact merge, which is what the export writes (bit for bit), so the
    front's true objectives describe the checkpoint a user downloads."""
    from evolve.materialize import ResidentMerge

    raw = spec_for(tiny_zoo, tiny_zoo_manifest, population=4, generations=1)
    raw["evaluation"]["store"] = store
    out = tmp_path / "run"
    result = run(raw, out)
    assert json.loads((out / "spec.json").read_text())["evaluation"]["store"] == store
    assert all(c["true_objectives"] is not None for c in result.front)
    knee = next(c for c in result.front if c["id"] == result.knee)
    spec = EvolveSpec.model_validate(raw)
    resident = ResidentMerge(spec.base, [m.path for m in spec.models], spec.method, device="cpu", store=store)
    assert resident.settings.kind == store and not resident.lossless
    exact = resident.materialize(SearchSpace(spec.method, 2).params_for_tensor(np.array(knee["genome"])), exact=True)
    exported = state_dict(export(out, knee["id"], tmp_path / "knee"))
    for k, v in resident.state_dict().items():
        assert torch.equal(v, exported[k]), k
    settings = EvalSettings(max_new_tokens=tiny_zoo_manifest["eval_settings"]["max_new_tokens"])
    bench = load_benchmark(tiny_zoo / tiny_zoo_manifest["benchmarks"]["rev"]["path"])
    acc = evaluate_folder(tmp_path / "knee", bench, settings, device="cpu", use_cache=False).accuracy
    assert abs(acc - knee["true_objectives"]["rev:accuracy"]) < 1e-9
    assert exact is resident.model


def test_job_that_does_not_fit_is_refused_before_anything_is_written(tiny_zoo, tiny_zoo_manifest, tmp_path,
                                                                     monkeypatch):
    """With 1 MB of host memory the tiny zoo's model does not fit: the job is refused by its memory
    plan, naming the component, and leaves no run folder."""
    import evolve.plan
    from evolve.plan import PlanError

    monkeypatch.setattr(evolve.plan, "host_available", lambda: 1_000_000)
    with pytest.raises(PlanError) as e:
        run(spec_for(tiny_zoo, tiny_zoo_manifest), tmp_path / "run")
    assert e.value.field == "evaluation.dtype" and "resident model" in str(e.value)
    assert not (tmp_path / "run").exists()

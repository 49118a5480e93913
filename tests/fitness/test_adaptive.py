"""fitness.adaptive (computerized adaptive testing) against simulation with known truth, brute force
and catsim's information function; the adaptive strategy through the spec, Fitness and evolve."""
import json

import numpy as np
import pytest
from pydantic import ValidationError

from fitness.adaptive import (
    CatSession,
    PopulationPrior,
    Prior,
    accuracy_sd,
    endpoint_prior,
    fixed_map_accuracy,
    item_information,
    map_theta,
    predicted_accuracy,
    run_cat,
    select_batch,
    spread_prior,
)
from fitness.irt import ItemParams
from fitness.spec import ObjectiveSpec, SubsetSpec

N_ITEMS = 1000


@pytest.fixture(scope="module")
def world():
    """The issue's setting: 1-D 2PL, 1,000 items, 300 candidates whose abilities are convex
    combinations of four endpoint models' abilities, answers drawn from the true curves."""
    rng = np.random.default_rng(0)
    items = ItemParams(rng.lognormal(0, 0.5, (N_ITEMS, 1)), rng.normal(0, 1.5, N_ITEMS))
    ends = rng.normal(0, 1.2, (4, 1))
    theta = rng.dirichlet(np.ones(4), 300) @ ends
    y = (rng.random((300, N_ITEMS)) < items.prob(theta)).astype(float)
    return {"items": items, "ends": ends, "theta": theta, "y": y, "exact": y.mean(axis=1)}


def test_adaptive_beats_random_items_with_the_same_estimator(world):
    items, y, exact = world["items"], world["y"], world["exact"]
    prior = endpoint_prior(world["ends"])
    rng = np.random.default_rng(1)
    rand, cat, pop_est = [], [], []
    pop = PopulationPrior(prior)
    for i in range(y.shape[0]):
        idx = rng.choice(N_ITEMS, 10, replace=False)
        rand.append(fixed_map_accuracy(items, idx, y[i, idx], prior))
        res = run_cat(items, lambda j: y[i, j], prior, budget=10, round_size=5, stop_sd=0)
        assert len(res.items) == 10 and np.unique(res.items).size == 10 and res.rounds == 2
        cat.append(res.accuracy)
        res = run_cat(items, lambda j: y[i, j], pop.prior(), budget=10, round_size=5, stop_sd=0)
        pop.add(res.theta)
        pop_est.append(res.accuracy)
    mae = {k: float(np.abs(np.array(v) - exact).mean()) for k, v in
           {"random": rand, "adaptive": cat, "population": pop_est}.items()}
    print({k: round(100 * v, 2) for k, v in mae.items()})
    assert mae["adaptive"] * 1.5 <= mae["random"], mae
    assert mae["population"] * 1.5 <= mae["random"], mae


def test_whole_benchmark_budget_gives_the_exact_accuracy(world):
    small = world["items"].subset(np.arange(60))
    prior = endpoint_prior(world["ends"])
    for i in range(5):
        y = world["y"][i, :60]
        res = run_cat(small, lambda j: y[j], prior, budget=60, round_size=7, stop_sd=0)
        assert sorted(res.items.tolist()) == list(range(60))
        assert res.accuracy == pytest.approx(y.mean(), abs=1e-12)
        assert res.sd == 0.0
    # a budget above the benchmark's size is capped at it
    assert run_cat(small, lambda j: world["y"][0, j], prior, budget=500, stop_sd=0).items.size == 60


def brute_force_information(item_params, theta, h=1e-4):
    """Fisher information as the expected negative second derivative of the item's log-likelihood,
    by finite differences: I = -(sum over y in {0,1} P(y|theta) d2/dtheta2 log P(y|theta))."""
    def loglik(t, y):
        p = item_params.prob(np.array([t]))
        return y * np.log(p) + (1 - y) * np.log1p(-p)
    p = item_params.prob(np.array([theta]))
    out = 0.0
    for y in (0.0, 1.0):
        d2 = (loglik(theta + h, y) - 2 * loglik(theta, y) + loglik(theta - h, y)) / h ** 2
        out = out - (p if y else 1 - p) * d2
    return out


def test_first_item_is_the_most_informative_at_the_prior_mean(world):
    items = world["items"].subset(np.arange(200))
    prior = Prior([0.37], [1.0])
    info = item_information(items, prior.mean)
    brute = brute_force_information(items, 0.37)
    assert np.allclose(info, brute, rtol=1e-4)
    # catsim (a(theta - b) parameterisation, 4PL with c = 0, d = 1) as an independent oracle
    from catsim.irt import inf_hpc

    bank = np.column_stack([items.a[:, 0], items.b / items.a[:, 0], np.zeros(200), np.ones(200)])
    assert np.allclose(info, inf_hpc(0.37, bank), rtol=1e-9)
    s = CatSession(items, prior, budget=12, round_size=4, stop_sd=0)
    first = s.next_items()
    assert first[0] == int(np.argmax(brute))
    assert first.tolist() == np.argsort(-brute, kind="stable")[:4].tolist()


def test_no_repeats_and_the_budget_holds(world):
    items, y = world["items"], world["y"]
    prior = endpoint_prior(world["ends"])
    for i, (budget, rnd) in enumerate([(10, 3), (7, 7), (13, 5), (1, 5)]):
        s = CatSession(items, prior, budget=budget, round_size=rnd, stop_sd=0)
        sizes = []
        while not s.done:
            idx = s.next_items()
            sizes.append(idx.size)
            s.observe(idx, y[i, idx])
        assert len(s.items) == budget == sum(sizes) and len(set(s.items)) == budget
        assert all(k == rnd for k in sizes[:-1]) and 0 < sizes[-1] <= rnd
        assert s.next_items().size == 0
    s = CatSession(items, prior, budget=5)
    idx = s.next_items()
    with pytest.raises(ValueError):
        s.observe(idx[:2], y[0, idx[:2]])  # answers to other items than asked


def test_stop_rule_ends_early_when_the_accuracy_is_pinned_down(world):
    items = world["items"]
    prior = endpoint_prior(world["ends"])
    # a model that gets everything wrong: its predicted accuracy is near 0 with little doubt
    res = run_cat(items, lambda j: np.zeros(len(j)), prior, budget=50, round_size=5, stop_sd=0.02)
    assert res.sd < 0.02 and res.items.size < 50 and res.items.size % 5 == 0
    # without the rule it uses the whole budget
    assert run_cat(items, lambda j: np.zeros(len(j)), prior, budget=50, round_size=5, stop_sd=0).items.size == 50


def test_map_and_accuracy_sd_against_brute_force():
    rng = np.random.default_rng(3)
    items = ItemParams(rng.lognormal(0, 0.4, (40, 1)), rng.normal(0, 1, 40))
    seen = np.arange(12)
    y = (rng.random(12) < 0.6).astype(float)
    prior = Prior([0.5], [0.8])
    theta, H = map_theta(items, seen, y, prior)
    grid = np.linspace(-6, 6, 240001)
    p = items.prob(grid[:, None], seen)
    logpost = (y * np.log(p) + (1 - y) * np.log1p(-p)).sum(1) - 0.5 * ((grid - 0.5) / 0.8) ** 2
    assert theta[0] == pytest.approx(grid[np.argmax(logpost)], abs=1e-4)
    # posterior precision = minus the second derivative of the log-posterior at the mode
    f = lambda t: float((y * np.log(items.prob(np.array([t]), seen)) + (1 - y) * np.log1p(-items.prob(np.array([t]), seen))).sum() - 0.5 * ((t - 0.5) / 0.8) ** 2)  # noqa: E731
    h = 1e-4
    curv = -(f(theta[0] + h) - 2 * f(theta[0]) + f(theta[0] - h)) / h ** 2
    assert H[0, 0] == pytest.approx(curv, rel=1e-4)
    # delta-method sd of the predicted accuracy: |d acc / d theta| / sqrt(H)
    acc = lambda t: predicted_accuracy(items, seen, y, np.array([t]))  # noqa: E731
    slope = (acc(theta[0] + h) - acc(theta[0] - h)) / (2 * h)
    assert accuracy_sd(items, seen, theta, H) == pytest.approx(abs(slope) / np.sqrt(H[0, 0]), rel=1e-5)


def test_multidimensional_selection_is_greedy_d_optimal():
    rng = np.random.default_rng(5)
    items = ItemParams(rng.lognormal(0, 0.5, (80, 2)), rng.normal(0, 1, 80))
    theta = np.array([0.2, -0.4])
    H0 = np.array([[2.0, 0.3], [0.3, 1.0]])
    picked = select_batch(items, theta, H0, [3, 7], 4)
    assert len(set(picked.tolist())) == 4 and not {3, 7} & set(picked.tolist())
    info = item_information(items, theta)  # [80, 2, 2]
    H = H0.copy()
    for j in picked:  # each pick maximises det(H + I_j) over the remaining items, by brute force
        dets = [np.linalg.det(H + info[k]) if k not in (3, 7) and k not in picked[:list(picked).index(j)] else -1
                for k in range(80)]
        assert j == int(np.argmax(dets))
        H = H + info[j]


def test_population_prior_respects_the_spread_floor():
    fallback = Prior([0.0], [2.0])
    pop = PopulationPrior(fallback, min_sd=0.5)
    assert pop.prior() is fallback  # nothing scored yet: the endpoint prior
    pop.add([1.3])
    one = pop.prior()
    assert one.mean.tolist() == [1.3] and one.sd.tolist() == [0.5]
    pop.add([1.32])
    assert pop.prior().sd.tolist() == [0.5]  # two close candidates: still the floor
    pop.add([3.0])
    wide = pop.prior()
    assert wide.sd[0] == pytest.approx(np.std([1.3, 1.32, 3.0], ddof=1)) and wide.sd[0] > 0.5
    two_d = spread_prior([[0.0, 1.0]], min_sd=0.25)
    assert two_d.sd.tolist() == [0.25, 0.25]
    again = PopulationPrior(fallback, min_sd=0.5)
    again.restore([[1.3], [1.32], [3.0]])
    assert np.array_equal(again.prior().mean, wide.mean) and np.array_equal(again.prior().sd, wide.sd)


def test_spec_validation():
    ok = SubsetSpec(strategy="adaptive", size=10, round=5, prior="population", stop_sd=0.02)
    assert ok.adaptive_settings() == {"round": 5, "prior": "population", "stop_sd": 0.02, "min_sd": 0.5}
    assert SubsetSpec(strategy="adaptive").adaptive_settings()["prior"] == "endpoints"
    # fixed strategies serialize exactly as before (no adaptive keys), so their fingerprints hold
    assert SubsetSpec().model_dump() == {"size": 20, "strategy": "random", "seed": 0}
    cases = [({"strategy": "adaptive", "rounds": 5}, "subset.rounds"),
             ({"strategy": "adaptive", "prior": "probes"}, "subset.prior"),
             ({"strategy": "adaptive", "stop_sd": -0.1}, "subset.stop_sd"),
             ({"strategy": "adaptive", "round": 0}, "subset.round"),
             ({"strategy": "random", "round": 5}, "subset.round")]
    for bad, field in cases:
        with pytest.raises(ValidationError) as err:
            ObjectiveSpec(benchmark="b.jsonl", subset=bad)
        assert field in str(err.value), (bad, str(err.value))


# ---- through Fitness and evolve on the tiny zoo ------------------------------------------------
def adaptive_spec(zoo, manifest, prior="population"):
    tasks = ["rev", "cip"]
    return {
        "kind": "evolve",
        "base": str(zoo / manifest["models"]["base"]["path"]),
        "models": [{"name": t, "path": str(zoo / manifest["models"][t]["path"])} for t in tasks],
        "method": "task_arithmetic",
        "search": {"algorithm": "nsga2", "population": 4, "generations": 3, "seed": 2},
        "objectives": [{"benchmark": str(zoo / manifest["benchmarks"][t]["path"]), "estimator": "p_irt",
                        "subset": {"size": 10, "strategy": "adaptive", "round": 5, "prior": prior, "stop_sd": 0}}
                       for t in tasks],
        "evaluation": {"max_new_tokens": manifest["eval_settings"]["max_new_tokens"],
                       "irt": {"probes": 3, "epochs": 100}},
        "device": "cpu",
    }


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("prior", ["population", "surrogate"])
def test_resumed_run_selects_the_same_items(tiny_zoo, tiny_zoo_manifest, tmp_path, prior):
    """An evolve job with a population (or surrogate) prior, crashed in the middle of a generation
    and resumed from its checkpoint and candidates.jsonl, asks every candidate the same items as a
    job that ran through; and `evolve.run.run` accepts the spec and records the traces."""
    from evolve.problem import CandidateEvaluator, MergeProblem
    from evolve.run import run, setup
    from evolve.search import read_candidates, run_search
    from evolve.spec import EvolveSpec

    spec = adaptive_spec(tiny_zoo, tiny_zoo_manifest, prior)
    result = run({**spec, "final_check": False}, tmp_path / "through")
    through = read_candidates(tmp_path / "through" / "candidates.jsonl")
    assert len(through) >= 8 and result.cost["items_per_candidate"] == 20
    for c in through:
        assert set(c.trace) == {o["benchmark"] for o in spec["objectives"]}
        for t in c.trace.values():
            assert len(t["items"]) == 10 == len(set(t["items"])) and t["rounds"] == 2
        assert c.cost["forward_passes"] == 2  # one batched pass per round carries both benchmarks
    # the population prior really moves the selections: candidates differ in their first rounds
    firsts = {tuple(tuple(t["items"][:5]) for t in c.trace.values()) for c in through}
    assert len(firsts) > 1
    if prior == "surrogate":  # each candidate's prior is its own prediction, from 3 probes on
        means = {tuple(t["prior"]["mean"]) for c in through for t in c.trace.values()}
        assert len(means) == len(through) * len(spec["objectives"])

    job = setup(EvolveSpec.model_validate(spec))
    fitness, calls = job.fitness, {"n": 0}
    real_score = fitness.score

    def crashing_score(model, **kw):  # the process dies while scoring the 6th candidate (generation 2)
        calls["n"] += 1
        if calls["n"] == 6:
            raise Crash()
        return real_score(model, **kw)

    def search(fit, resume):
        problem = MergeProblem(job.space, fit.objectives)
        ev = CandidateEvaluator(job.space, job.resident, fit, probe_genomes=job.probes[0])
        s = spec["search"]
        return run_search(problem, ev, tmp_path / "crashed", population=s["population"], generations=s["generations"],
                          seed=s["seed"], resume=resume, fingerprint="adaptive")

    fitness.score = crashing_score
    with pytest.raises(Crash):
        search(fitness, resume=False)
    assert len(read_candidates(tmp_path / "crashed" / "candidates.jsonl")) == 5
    fresh = setup(EvolveSpec.model_validate(spec)).fitness  # a restarted process builds a new Fitness
    resumed = search(fresh, resume=True).candidates
    assert [c.genome for c in resumed] == [c.genome for c in through]
    assert [c.trace for c in resumed] == [c.trace for c in through]
    assert [c.objectives for c in resumed] == [c.objectives for c in through]
    # and the record says so: every candidate's items are in candidates.jsonl
    rows = [json.loads(x) for x in (tmp_path / "crashed" / "candidates.jsonl").read_text().splitlines()]
    assert [r["trace"] for r in rows] == [c.trace for c in through]


@pytest.mark.slow
def test_model_sd_makes_the_cat_interval_cover_simulated_truths():
    """Misspecified answers (the simulator's ARC preset: guessing, slips, misfit, two traits) and
    item parameters from 17 known rows: the CAT's Laplace sd alone puts far fewer than 90 % of the
    candidates' true accuracies inside estimate +- 1.645 sd; with calibrate_model_sd's term added
    it no longer falls short of 90 % (it errs on the wide side: 96-97 % here, estimated from 13
    probe rows; issue 22 asks for within 5 points, bench/README.md has the measured shares)."""
    from dataclasses import replace

    from fitness.adaptive import answers_prior, calibrate_model_sd
    from fitness.irt import fit_item_params
    from fitness.simulate import PRESETS, job_world

    def fit(rows):
        return fit_item_params(rows, "2pl")

    def prior_of(params, answers):
        return answers_prior(params, answers)

    cfg = replace(PRESETS["arc_challenge"], n_items=400)
    laplace, total = [], []
    for seed in range(4):
        _, known, truth, answers = job_world(cfg, np.random.default_rng(seed), candidates=30, noise_sd=1.0)
        params = fit(known)
        prior = prior_of(params, known[:4])
        model_sd = calibrate_model_sd(known, 4, fit, prior_of, budget=20)
        for i in range(len(truth)):
            r = run_cat(params, lambda idx, i=i: answers[i, idx], prior, budget=20)
            err = abs(r.accuracy - truth[i])
            laplace.append(err <= 1.6449 * r.sd)
            total.append(err <= 1.6449 * float(np.hypot(r.sd, model_sd)))
    assert np.mean(laplace) < 0.8 and 0.87 <= np.mean(total) <= 0.99, (np.mean(laplace), np.mean(total))

"""fitness.estimators on simulated benchmarks where the true accuracy is known."""
import json

import numpy as np
import pytest

from fitness.adaptive import Prior, answers_prior, endpoint_prior, run_cat
from fitness.estimators import (
    ESTIMATORS,
    NEEDS_PRIOR,
    estimate,
    fit_lambdas,
    full,
    gmp_irt,
    gp_irt,
    gp_irt_lambda,
    judge,
    map_irt,
    mp_irt,
    p_irt,
    subset_mean,
)
from fitness.irt import ItemParams, estimate_theta, fit_item_params

K_SMALL = 20


def make_world(seed, n_items=600, n_models=150, dims=2, n_endpoints=3):
    """Known 2PL items; endpoint abilities; candidates whose ability is a convex combination of
    the endpoints' (as MERGE^3 assumes of merges); their 0/1 answers on every item."""
    rng = np.random.default_rng(seed)
    items = ItemParams(rng.lognormal(0.0, 0.5, (n_items, dims)) / np.sqrt(dims), rng.normal(0.0, 1.5, n_items))
    endpoints = rng.normal(0.0, 1.2, (n_endpoints, dims))
    lambdas = rng.dirichlet(np.ones(n_endpoints), n_models)
    theta = lambdas @ endpoints
    y = (rng.random((n_models, n_items)) < items.prob(theta)).astype(float)
    return {"items": items, "endpoints": endpoints, "lambdas": lambdas, "theta": theta, "y": y, "rng": rng}


def opts(name, world):
    """What `estimate` needs besides the common arguments: map_irt's prior (the endpoints' spread),
    blend_irt's weights too (fixed ones here: their calibration has its own tests)."""
    from fitness.estimators import Blend

    out = {"prior": endpoint_prior(world["endpoints"])} if name in NEEDS_PRIOR else {}
    return out | ({"blend": Blend(0.3, 0.5, 0.2, 0.6)} if name == "blend_irt" else {})


def mean_abs_errors(world, names, n_subsets=6, k=K_SMALL, item_params=None, endpoints=None):
    """MAE against the exact accuracy over all models, averaged over several random subsets."""
    y, rng = world["y"], world["rng"]
    item_params = item_params or world["items"]
    endpoints = world["endpoints"] if endpoints is None else endpoints
    exact = y.mean(axis=1)
    errors = {name: [] for name in names}
    for _ in range(n_subsets):
        idx = np.sort(rng.choice(y.shape[1], k, replace=False))
        for name in names:
            est = estimate(name, y[:, idx], idx, None, item_params, endpoints, **opts(name, world))
            errors[name].append(np.abs(est - exact).mean())
    return {name: float(np.mean(v)) for name, v in errors.items()}


@pytest.fixture(scope="module")
def world():
    return make_world(0)


def test_full_is_exact_accuracy_and_subset_mean_is_weighted():
    y = np.array([[1, 0, 1, 1], [0, 0, 0, 1.0]])
    assert np.array_equal(full(y), [0.75, 0.25]) and full(y[0]) == 0.75
    assert estimate("full", y[1]) == 0.25
    assert subset_mean([1, 0, 1], weights=[0.5, 0.25, 0.25]) == pytest.approx(0.75)
    assert subset_mean([1, 0, 1], weights=[2, 1, 1]) == pytest.approx(0.75)  # normalised
    assert subset_mean([1, 0, 1, 1]) == 0.75


def test_irt_estimators_beat_subset_mean_at_small_k(world):
    mae = mean_abs_errors(world, ["subset_mean", "p_irt", "gp_irt", "mp_irt", "gmp_irt", "map_irt"])
    print({k: round(v, 4) for k, v in mae.items()})
    for name in ("p_irt", "gp_irt", "mp_irt", "gmp_irt", "map_irt"):
        assert mae[name] < 0.95 * mae["subset_mean"], (name, mae)


def test_mp_irt_uses_the_endpoint_span():
    # two endpoints in a three-dimensional ability space: merges lie on a plane, and mp-IRT,
    # which fits 2 lambdas instead of 3 free ability coordinates, predicts better than p-IRT
    world = make_world(0, dims=3, n_endpoints=2)
    mae = mean_abs_errors(world, ["subset_mean", "p_irt", "mp_irt", "gmp_irt"])
    print({k: round(v, 4) for k, v in mae.items()})
    assert mae["mp_irt"] < mae["p_irt"] < mae["subset_mean"]
    assert mae["gmp_irt"] < mae["subset_mean"]


def test_fit_lambdas_is_the_ability_mle_in_the_endpoint_span():
    # with as many independent endpoints as dimensions the span is everything, so
    # sum_k lambda_k theta_k must equal the unconstrained MLE of theta, and near the truth
    world = make_world(1, n_models=30, dims=2, n_endpoints=2)
    y, items, ends = world["y"], world["items"], world["endpoints"]
    every = np.arange(y.shape[1])
    lambdas = fit_lambdas(y, every, items, ends)
    assert lambdas.shape == (30, 2)
    assert np.allclose(lambdas @ ends, estimate_theta(y, items), atol=1e-3)
    assert np.abs(lambdas @ ends - world["theta"]).mean() < 0.25
    assert np.allclose(fit_lambdas(y[0], every, items, ends), lambdas[0])


def test_seeing_every_item_gives_the_exact_accuracy(world):
    y, items, ends = world["y"][:10], world["items"], world["endpoints"]
    every = np.arange(y.shape[1])
    exact = y.mean(axis=1)
    for name in ESTIMATORS:
        assert np.allclose(estimate(name, y, every, None, items, ends, **opts(name, world)), exact), name


def test_single_endpoint_uses_its_theta(world):
    y, items = world["y"][0], world["items"]
    idx = np.arange(0, 600, 30)
    theta = world["endpoints"][:1]
    expected = (20 / 600) * y[idx].mean() + (580 / 600) * items.prob(theta[0], np.setdiff1d(np.arange(600), idx)).mean()
    assert mp_irt(y[idx], idx, None, items, theta) == pytest.approx(expected)
    assert gmp_irt(y[idx], idx, None, items, theta) == pytest.approx(0.5 * y[idx].mean() + 0.5 * expected)


def test_map_irt_between_its_limits(world):
    """A flat prior gives p-IRT's MLE; a prior pinned at theta0 gives p-IRT evaluated at theta0."""
    y, items = world["y"], world["items"]
    idx = np.arange(3, 600, 15)  # 40 items
    row = next(r for r in y if 0.2 < r[idx].mean() < 0.8)  # an interior MLE
    flat = Prior(np.zeros(items.dims), 1e4)
    assert map_irt(row[idx], idx, None, items, prior=flat) == pytest.approx(p_irt(row[idx], idx, None, items), abs=1e-4)
    theta0 = np.array([0.3, -0.2])
    unseen = np.setdiff1d(np.arange(600), idx)
    pinned = (40 / 600) * row[idx].mean() + (560 / 600) * items.prob(theta0, unseen).mean()
    assert map_irt(row[idx], idx, None, items, prior=Prior(theta0, 1e-5)) == pytest.approx(pinned, abs=1e-6)


def test_blends_and_batching(world):
    y, items, ends = world["y"][:4], world["items"], world["endpoints"]
    idx = np.arange(5, 600, 40)
    w = np.linspace(1, 2, idx.size)
    sub = y[:, idx]
    for lam in (0.0, 0.3, 1.0):
        blend = lam * subset_mean(sub, idx, w) + (1 - lam) * p_irt(sub, idx, w, items)
        assert np.allclose(gp_irt(sub, idx, w, items, lam=lam), blend)
    mp = mp_irt(sub, idx, w, items, ends)
    assert np.allclose(gmp_irt(sub, idx, w, items, ends, delta=0.25), 0.25 * subset_mean(sub, idx, w) + 0.75 * mp)
    # a matrix of models gives the same numbers as one model at a time
    for name in ESTIMATORS:
        many = estimate(name, sub, idx, w, items, ends, **opts(name, world))
        one = [estimate(name, sub[i], idx, w, items, ends, **opts(name, world)) for i in range(4)]
        assert isinstance(one[0], float) and np.allclose(many, one, atol=1e-6), name


def test_gp_irt_lambda_trusts_a_good_irt_model_more(world):
    y, items = world["y"], world["items"]
    good = gp_irt_lambda(y, items, K_SMALL)
    rng = np.random.default_rng(0)
    shuffled = ItemParams(items.a, rng.permutation(items.b))  # a wrong model of the items
    bad = gp_irt_lambda(y, shuffled, K_SMALL)
    assert 0 <= good < bad <= 1


def test_registry_and_errors(world):
    assert set(ESTIMATORS) == {"subset_mean", "full", "p_irt", "gp_irt", "mp_irt", "gmp_irt", "map_irt", "blend_irt"}
    with pytest.raises(ValueError, match="blend weights"):
        estimate("blend_irt", [1, 0], [0, 1], None, world["items"], prior=Prior(np.zeros(2), 1.0))
    with pytest.raises(ValueError, match="prior"):
        estimate("map_irt", [1, 0], [0, 1], None, world["items"])
    with pytest.raises(ValueError, match="unknown estimator"):
        estimate("nope", [1, 0])
    with pytest.raises(ValueError, match="item_params"):
        estimate("p_irt", [1, 0], [0, 1])
    with pytest.raises(ValueError, match="endpoint_thetas"):
        estimate("mp_irt", [1, 0], [0, 1], None, world["items"])
    with pytest.raises(ValueError):
        estimate("p_irt", [1, 0], [0, 0], None, world["items"])  # repeated item


@pytest.mark.parametrize("fitter", ["map", "py-irt"])
def test_end_to_end_with_fitted_items(fitter):
    # the estimators know only what the pipeline would: items fitted (by either fitter) on 200 models'
    # answers, and the endpoints' MLE abilities from all their answers; the candidates (convex
    # combinations of three endpoints) answer according to the true items
    rng = np.random.default_rng(7)
    n_items = 500
    items = ItemParams(rng.lognormal(0.0, 0.5, (n_items, 1)), rng.normal(0.0, 1.5, n_items))
    train_theta = rng.normal(size=(200, 1))
    train = (rng.random((200, n_items)) < items.prob(train_theta)).astype(float)
    fitted = fit_item_params(train, "2pl", fitter=fitter, epochs=300, seed=0)
    ends = estimate_theta(train[:3], fitted)
    theta = rng.dirichlet(np.ones(3), 100) @ train_theta[:3]
    world = {"y": (rng.random((100, n_items)) < items.prob(theta)).astype(float), "rng": rng}
    mae = mean_abs_errors(world, ["subset_mean", "p_irt", "gp_irt", "mp_irt", "gmp_irt"],
                          item_params=fitted, endpoints=ends)
    print({k: round(v, 4) for k, v in mae.items()})
    for name in ("p_irt", "gp_irt", "mp_irt", "gmp_irt"):
        assert mae[name] < mae["subset_mean"], (name, mae)


def test_judge():
    assert judge([0.1, 0.2, 0.3], [0.2, 0.3, 0.5]) == pytest.approx({"mae": 0.4 / 3, "spearman": 1.0})
    assert judge([0.3, 0.2, 0.1], [0.1, 0.2, 0.3])["spearman"] == pytest.approx(-1.0)


def test_a_job_scores_map_irt_under_the_endpoint_prior():
    """Fitness wires map_irt to the endpoints' MAP spread: the job's value equals the estimator
    called by hand with that prior, and differs from the MLE-based p_irt."""
    from data.benchmarks import from_items
    from fitness.evaluate import Responses
    from fitness.fitness import Fitness, fit_benchmark
    from fitness.spec import EvaluationSpec, ObjectiveSpec

    bench = from_items("b", [{"id": f"g{i}", "prompt": "p", "answer": "a"} for i in range(120)])
    rng = np.random.default_rng(1)
    skill = np.linspace(-1.5, 1.5, 8)
    difficulty = rng.normal(0, 1, 120)
    answers = [Responses(bench.ids, (rng.random(120) < 1 / (1 + np.exp(difficulty - s))).astype(np.uint8),
                         np.ones(120, int), [""] * 120) for s in skill]
    evaluation = EvaluationSpec(irt={"epochs": 50})
    spec = ObjectiveSpec(benchmark="b.jsonl", estimator="map_irt", subset={"size": 15, "seed": 2})
    fit = fit_benchmark(bench, [spec], evaluation, answers[:4], answers[4:])
    assert fit.prior is not None
    candidate = answers[5]
    pos = np.arange(len(fit.subset))
    got = Fitness._estimate(spec, fit, Responses([candidate.item_ids[i] for i in fit.subset.indices],
                                                 candidate.correct[fit.subset.indices], np.ones(15, int), [""] * 15), pos)
    y = candidate.correct[fit.subset.indices].astype(float)
    assert got == pytest.approx(map_irt(y, fit.subset.indices, None, fit.item_params, prior=fit.prior))
    assert got != pytest.approx(p_irt(y, fit.subset.indices, None, fit.item_params))


@pytest.mark.parametrize("case,call,words", [
    ("answers other than 0/1", lambda w, y, i: subset_mean(y * 2, i), "0/1 answers"),
    ("a NaN answer", lambda w, y, i: p_irt(np.where(i == 3, np.nan, y), i, None, w["items"]), "0/1 answers"),
    ("fewer indices than answers", lambda w, y, i: subset_mean(y, i[:10]), "20 responses for 10 subset items"),
    ("fractional indices", lambda w, y, i: p_irt(y, i + 0.7, None, w["items"]), "integer item indices"),
    ("NaN weights", lambda w, y, i: subset_mean(y, i, np.full(20, np.nan)), "weights must be"),
    ("2-D weights", lambda w, y, i: subset_mean(y, i, np.ones((4, 5))), "weights must be"),
    ("lam above 1", lambda w, y, i: gp_irt(y, i, None, w["items"], lam=2.0), "lam must lie in [0, 1]"),
    ("negative delta", lambda w, y, i: gmp_irt(y, i, None, w["items"], w["endpoints"], delta=-1.0),
     "delta must lie in [0, 1]"),
    ("endpoint thetas of other dims", lambda w, y, i: mp_irt(y, i, None, w["items"], np.zeros((3, 3))),
     "endpoint_thetas must be finite [K, 2]"),
    ("no endpoint thetas", lambda w, y, i: mp_irt(y, i, None, w["items"], np.zeros((0, 2))), "endpoint_thetas"),
    ("theta from 0/2 answers", lambda w, y, i: estimate_theta(y * 2, w["items"], i), "0/1 answers"),
    ("negative item index", lambda w, y, i: estimate_theta(y[:3], w["items"], [0, 1, -1]), "distinct indices"),
    ("repeated item index", lambda w, y, i: estimate_theta(y[:3], w["items"], [0, 0, 0]), "distinct indices"),
    ("item index past the end", lambda w, y, i: estimate_theta(y[:3], w["items"], [0, 1, 600]), "distinct indices"),
    ("non-positive prior sd", lambda w, y, i: estimate_theta(y, w["items"], i, method="map", prior_sd=0),
     "prior_sd must be positive"),
])
def test_bad_inputs_are_refused_not_turned_into_numbers(world, case, call, words):
    idx = np.arange(20)
    y = world["y"][10, idx]
    with pytest.raises(ValueError) as e:
        call(world, y, idx)
    assert words in str(e.value)


def _map_fit(rows):
    return fit_item_params(rows, "2pl")


def _endpoint_prior(params, answers):
    return answers_prior(params, answers)


def test_blend_puts_everything_on_the_known_mean_when_every_row_scores_the_same():
    """Closed case: rows with the same number of right answers (in different items) have the same
    accuracy, so the other rows' mean predicts each row exactly and the least-squares weights are
    (0, 0, 1); the estimate is then that accuracy whatever a candidate answers."""
    from fitness.estimators import Blend, blend_irt, calibrate_blend

    rng = np.random.default_rng(3)
    rows = np.zeros((8, 60))
    for r in rows:
        r[rng.choice(60, 24, replace=False)] = 1.0
    idx = np.arange(0, 60, 6)
    blend = calibrate_blend(rows, 3, idx, None, _map_fit, _endpoint_prior, draws=3)
    assert blend.prior >= 0.9 and blend.known == pytest.approx(0.4)
    assert blend.mean + blend.irt + blend.prior == pytest.approx(1.0)
    params = _map_fit(rows)
    only_known = Blend(0.0, 0.0, 1.0, 0.4)  # the 10 seen answers count as given, the known mean stands for the rest
    got = blend_irt(np.ones(10), idx, None, params, prior=_endpoint_prior(params, rows[:3]), blend=only_known)
    assert got == pytest.approx(10 / 60 + 50 / 60 * 0.4)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["mmlu_pro_math", "arc_challenge"])
def test_calibrated_blend_is_no_worse_than_the_subset_mean_on_misspecified_answers(preset):
    """On the simulator's answers (guessing floors, slips, misfitting items, two ability traits:
    a 1-D 2PL is the wrong model), item parameters from a job's 17 known rows, merges of the same
    parents as candidates: over seeds, blend_irt's mean absolute error is at most the subset
    mean's at k = 20 and 50, and at most map_irt's (the stack's weights can always fall back on
    either); the interval +- 1.645 rmse holds about 90 % of the truths (240 of them per preset).
    ``estimator: auto`` (the CAT, with its line or not, or the blend, per world and k by their
    leave-one-out errors on the probe rows) errs less than the subset mean and less than the plain
    CAT, which these answers mislead."""
    from dataclasses import replace

    from fitness.adaptive import loo_cats
    from fitness.estimators import blend_irt, calibrate_blend
    from fitness.fitness import choose_estimator
    from fitness.simulate import PRESETS, job_world

    cfg = replace(PRESETS[preset], n_items=300)
    err = {name: [] for name in ("mean", "map", "blend", "cat", "auto")}
    inside = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        _, known, truth, answers = job_world(cfg, rng, candidates=30, noise_sd=1.0)
        params = _map_fit(known)
        prior = _endpoint_prior(params, known[:4])
        for k in (20, 50):
            idx = np.sort(rng.choice(300, k, replace=False))
            blend = calibrate_blend(known, 4, idx, None, _map_fit, _endpoint_prior, draws=4, seed=seed)
            y = answers[:, idx]
            err["mean"].append(np.abs(subset_mean(y, idx) - truth).mean())
            err["map"].append(np.abs(map_irt(y, idx, None, params, prior=prior) - truth).mean())
            got = blend_irt(y, idx, None, params, prior=prior, blend=blend)
            err["blend"].append(np.abs(got - truth).mean())
            inside.append(np.abs(got - truth) <= 1.6449 * blend.rmse)
            cat = np.array([run_cat(params, lambda j, i=i: answers[i, j], prior, budget=k).accuracy
                            for i in range(len(truth))])
            err["cat"].append(np.abs(cat - truth).mean())
            check = loo_cats(known, 4, _map_fit, _endpoint_prior, k)
            choice, _ = choose_estimator(check, blend)
            intercept, slope = check.line() if choice["line"] else (0.0, 1.0)
            err["auto"].append(err["blend"][-1] if choice["estimator"] == "blend_irt"
                               else np.abs(np.clip(intercept + slope * cat, 0, 1) - truth).mean())
    mae = {name: float(np.mean(v)) for name, v in err.items()}
    assert mae["blend"] <= mae["mean"] and mae["blend"] <= mae["map"] + 0.002, mae
    assert mae["auto"] <= mae["mean"] and mae["auto"] <= mae["cat"], mae
    coverage = float(np.mean(np.concatenate(inside)))
    assert 0.85 <= coverage <= 0.97, coverage  # the leave-one-out rmse as the sd: a 90 % interval


def test_blend_irt_needs_a_fixed_subset():
    from pydantic import ValidationError

    from fitness.spec import ObjectiveSpec

    with pytest.raises(ValidationError, match="estimator: blend_irt"):
        ObjectiveSpec(benchmark="b.jsonl", estimator="blend_irt", subset={"strategy": "adaptive"})
    assert ObjectiveSpec(benchmark="b.jsonl", estimator="blend_irt").subset.strategy == "random"


def test_a_job_calibrates_blend_irt_on_its_known_rows():
    """fit_benchmark calibrates the weights on the endpoints and probes for the job's subset, the
    job's value is blend_irt by hand with them, and describe() reports them."""
    from data.benchmarks import from_items
    from fitness.estimators import blend_irt
    from fitness.evaluate import Responses
    from fitness.fitness import Fitness, fit_benchmark
    from fitness.spec import EvaluationSpec, ObjectiveSpec

    bench = from_items("b", [{"id": f"g{i}", "prompt": "p", "answer": "a"} for i in range(120)])
    rng = np.random.default_rng(4)
    skill, difficulty = np.linspace(-1.5, 1.5, 9), rng.normal(0, 1, 120)
    answers = [Responses(bench.ids, (rng.random(120) < 1 / (1 + np.exp(difficulty - s))).astype(np.uint8),
                         np.ones(120, int), [""] * 120) for s in skill]
    spec = ObjectiveSpec(benchmark="b.jsonl", estimator="blend_irt", subset={"size": 15, "seed": 2})
    fit = fit_benchmark(bench, [spec], EvaluationSpec(), answers[:3], answers[3:8])
    b = fit.blend
    assert b is not None and b.mean + b.irt + b.prior == pytest.approx(1.0) and min(b.mean, b.irt, b.prior) >= 0
    assert b.known == pytest.approx(np.mean([r.correct.mean() for r in answers[:8]]))
    cand, idx = answers[8], fit.subset.indices
    got = Fitness._estimate(spec, fit, Responses([cand.item_ids[i] for i in idx], cand.correct[idx], np.ones(15, int),
                                                 [""] * 15), np.arange(15))
    y = cand.correct[idx].astype(float)
    assert got == pytest.approx(float(blend_irt(y, idx, fit.subset.weights, fit.item_params, prior=fit.prior, blend=b)))


def test_blend_check_mae_is_nested_leave_one_out():
    """Brute force: for each probe row, the parts of every (row, subset) pair are recomputed by
    hand (item parameters and prior fitted without the row), the simplex grid is searched for the
    weights that fit every other row best, and that row's errors at those weights are kept; their
    mean absolute values, per row, are ``check_errors``."""
    from fitness.estimators import _blend_parts, calibrate_blend

    world = make_world(5, n_items=80, n_models=9)
    rows, n_end, idx = world["y"], 3, np.arange(0, 80, 8)
    blend = calibrate_blend(rows, n_end, idx, None, _map_fit, _endpoint_prior, draws=3, seed=1, step=0.1)
    rng = np.random.default_rng(1)
    subsets = [idx] + [np.sort(rng.choice(80, idx.size, replace=False)) for _ in range(2)]
    share = idx.size / 80
    per_row = []
    for r in range(len(rows)):
        rest = np.delete(rows, r, axis=0)
        params = _map_fit(rest)
        prior = _endpoint_prior(params, rest[: n_end - (r < n_end)])
        per_row.append([(_blend_parts(rows[r: r + 1, s], s, None, params, prior, rest.mean())[0], rows[r].mean())
                        for s in subsets])
    ticks = np.round(np.arange(0, 1.05, 0.1), 10)
    grid = [np.array([a, b, 1 - a - b]) for a in ticks for b in ticks if a + b <= 1 + 1e-9]

    def sq_errors(r, w):
        return [(share * p[0] + (1 - share) * p[1:] @ w - t) ** 2 for p, t in per_row[r]]

    nested = []
    for r in range(n_end, len(rows)):
        best = min(grid, key=lambda w: sum(sum(sq_errors(o, w)) for o in range(len(rows)) if o != r))
        nested.append(np.mean(np.sqrt(sq_errors(r, best))))
    assert blend.check_errors == pytest.approx(nested, rel=1e-9) and len(nested) == len(rows) - n_end
    assert blend.to_json()["check_mae"] == pytest.approx(np.mean(nested))
    unchecked = blend.__class__(blend.mean, blend.irt, blend.prior, blend.known)  # no rmse, no check rows
    assert {k: v for k, v in json.loads(json.dumps(unchecked.to_json(), allow_nan=False)).items()
            if v is None} == {"rmse": None, "check_mae": None}  # strict JSON


def test_choose_estimator_leaves_the_plain_cat_only_for_an_error_lower_beyond_noise():
    """The rule, by brute force on random cases: an alternative (the CAT with a line fitted
    without each row, by least squares with its slope clipped to [0, 1]; the blend) passes when
    the mean of the paired differences d = |e_CAT| - |e_alt| exceeds its standard error; the
    passing one with the lower error wins, else the plain CAT. Closed cases: a CAT off by a
    constant is mapped exactly by the line; a blend that errs much less than a CAT with no
    shared bias is taken."""
    from fitness.adaptive import CatCheck
    from fitness.estimators import Blend
    from fitness.fitness import choose_estimator

    def nested_line_errors(x, t):
        out = []
        for r in range(x.size):
            k = np.arange(x.size) != r
            slope = float(np.clip(np.polyfit(x[k], t[k], 1)[0], 0, 1))
            out.append(abs(t[k].mean() + slope * (x[r] - x[k].mean()) - t[r]))
        return np.array(out)

    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        t = rng.uniform(0.1, 0.6, 9)
        x = t + rng.normal(rng.uniform(-0.05, 0.05), 0.03, 9) * rng.choice([0.3, 1.0])
        b_err = np.abs(rng.normal(0, rng.uniform(0.005, 0.05), 9))
        cat = CatCheck(x, t, np.full(9, 0.01))
        got, check = choose_estimator(cat, Blend(0.2, 0.3, 0.5, 0.5, 0.01, tuple(b_err)))
        plain, passed = np.abs(x - t), {}
        for name, alt in (("p_irt_line", nested_line_errors(x, t)), ("blend_irt", b_err)):
            d = plain - alt
            assert got["margin"][name] == pytest.approx(d.std(ddof=1) / 3) and got["loo_mae"][name] == pytest.approx(alt.mean())
            if d.mean() > d.std(ddof=1) / 3:
                passed[name] = alt.mean()
        want = min(passed, key=passed.get) if passed else "p_irt"
        assert got["estimator"] == {"blend_irt": "blend_irt"}.get(want, "p_irt")
        if want == "p_irt_line":
            slope = float(np.clip(np.polyfit(x, t, 1)[0], 0, 1))
            assert got["line"] == pytest.approx({"intercept": t.mean() - slope * x.mean(), "slope": slope})
        else:
            assert got["line"] is False
        assert check is {"p_irt": cat}.get(want, check) and (check is None) == (want == "blend_irt")
        if want == "p_irt_line":
            assert np.allclose(np.abs(check.errors), nested_line_errors(x, t))
        seen.add(want)
    assert seen == {"p_irt", "p_irt_line", "blend_irt"}
    t = np.linspace(0.1, 0.5, 6)
    offset, _ = choose_estimator(CatCheck(t + 0.05, t, np.zeros(6)), Blend(0.2, 0.3, 0.5, 0.5, 0.01, (0.01,) * 6))
    assert offset["line"] and offset["loo_mae"]["p_irt_line"] == pytest.approx(0, abs=1e-12)
    noisy, _ = choose_estimator(CatCheck(t + np.array([0.06, -0.05, 0.07, -0.06, 0.05, -0.07]), t, np.zeros(6)),
                             Blend(0.2, 0.3, 0.5, 0.5, 0.01, (0.01,) * 6))
    assert noisy["estimator"] == "blend_irt" and not noisy["line"]


@pytest.mark.parametrize("world", ["2pl", "equal_scores"])
def test_estimator_auto_is_the_configuration_it_chooses(world):
    """A job's ``estimator: auto`` on one benchmark equals the explicit configuration it names: the
    CAT (adaptive items, p_irt, with the line of `loo_cats` on the probe rows and the model sd of
    its nested calibration) or blend_irt on the same stratified random subset with the same
    weights; the leave-one-out errors it reports are those and ``calibrate_blend``'s, and its
    rule chose between them. On rows that all score alike the CAT's line is flat at their
    accuracy, which predicts each exactly."""
    from data.benchmarks import from_items
    from fitness.adaptive import answers_prior, loo_cats
    from fitness.evaluate import Responses
    from fitness.fitness import fit_benchmark, fitted_item_params
    from fitness.spec import EvaluationSpec, ObjectiveSpec

    n = 120
    bench = from_items("b", [{"id": f"g{i}", "prompt": "p", "answer": "a"} for i in range(n)])
    rng = np.random.default_rng(4)
    if world == "2pl":
        skill, difficulty = np.linspace(-1.5, 1.5, 8), rng.normal(0, 1, n)
        correct = [(rng.random(n) < 1 / (1 + np.exp(difficulty - s))).astype(np.uint8) for s in skill]
    else:
        correct = [np.isin(np.arange(n), rng.choice(n, 48, replace=False)).astype(np.uint8) for _ in range(8)]
    answers = [Responses(bench.ids, c, np.ones(n, int), [""] * n) for c in correct]
    ev = EvaluationSpec()
    auto = fit_benchmark(bench, [ObjectiveSpec(benchmark="b.jsonl", subset={"size": 15})], ev, answers[:3], answers[3:])
    cat = fit_benchmark(bench, [ObjectiveSpec(benchmark="b.jsonl", subset={"size": 15, "strategy": "adaptive"})],
                        ev, answers[:3], answers[3:])
    blend = fit_benchmark(bench, [ObjectiveSpec(benchmark="b.jsonl", estimator="blend_irt", subset={"size": 15})],
                          ev, answers[:3], answers[3:])
    Y = np.array(correct, dtype=float)
    check = loo_cats(Y, 3, lambda rows: fitted_item_params(rows, ev.irt), lambda p, a: answers_prior(p, a, 0.5), 15)
    cal = check.calibrated()
    assert auto.choice["loo_mae"] == {"p_irt": pytest.approx(float(np.abs(check.errors).mean())),
                                      "p_irt_line": pytest.approx(float(np.abs(cal.errors).mean())),
                                      "blend_irt": pytest.approx(float(np.mean(blend.blend.check_errors)))}
    chosen = auto.choice["estimator"]  # the rule itself: test_choose_estimator_leaves_the_plain_cat_...
    same = cat if chosen == "p_irt" else blend
    assert auto.subset.strategy == same.subset.strategy and np.array_equal(auto.subset.indices, same.subset.indices)
    assert (auto.blend is None) == (same.blend is None)
    if auto.blend is not None:
        assert auto.blend == same.blend and auto.cat_line is None and auto.model_sd == 0
    elif auto.choice["line"]:
        assert auto.cat_line == pytest.approx(check.line()) and auto.model_sd == pytest.approx(cal.model_sd)
        assert auto.cat_value(0.3) == pytest.approx(min(max(check.line()[0] + check.line()[1] * 0.3, 0), 1))
    else:
        assert auto.cat_line is None and auto.model_sd == pytest.approx(same.model_sd) and auto.cat_value(0.3) == 0.3
    if world == "equal_scores":  # every row at 0.4: a flat line at 0.4 predicts each exactly
        assert auto.choice["line"] and auto.cat_line == pytest.approx((0.4, 0.0))


def test_fit_line_is_least_squares_with_its_slope_in_the_unit_interval():
    """Closed cases: an exact line with slope 0.5 is recovered; slope 2 is clipped to 1 (intercept
    then mean(t) - mean(x)), a negative slope to 0 (intercept mean(t)); fewer than three rows give
    the identity. `CatCheck.calibrated` maps each row by the line of the other rows (brute force)."""
    from fitness.adaptive import CatCheck, fit_line

    x = np.array([0.1, 0.2, 0.4, 0.5])
    assert fit_line(x, 0.1 + 0.5 * x) == pytest.approx((0.1, 0.5))
    assert fit_line(x, 2 * x) == pytest.approx((2 * x.mean() - x.mean(), 1.0))
    assert fit_line(x, 1 - x) == pytest.approx(((1 - x).mean(), 0.0))
    assert fit_line(x[:2], x[:2] + 0.3) == (0.0, 1.0)
    t = np.array([0.12, 0.18, 0.33, 0.41])
    check = CatCheck(x, t, np.full(4, 0.02))
    cal = check.calibrated()
    for r in range(4):
        keep = np.arange(4) != r
        slope = np.polyfit(x[keep], t[keep], 1)[0]
        assert 0 < slope < 1
        intercept = t[keep].mean() - slope * x[keep].mean()
        assert cal.estimates[r] == pytest.approx(intercept + slope * x[r])
        assert cal.sds[r] == pytest.approx(0.02 * slope)

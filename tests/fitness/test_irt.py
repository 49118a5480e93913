"""fitness.irt: both fitters (joint MAP and py-irt) recover simulated 2PL items; ability estimates
recover simulated models."""
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from fitness.irt import ItemParams, estimate_theta, fit_item_params, sigmoid


def simulate(n_models, n_items, dims=1, seed=0, a_sd=0.5):
    """Responses drawn from a known 2PL: P = sigmoid(a . theta - b)."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n_models, dims))
    truth = ItemParams(rng.lognormal(0.0, a_sd, size=(n_items, dims)) / np.sqrt(dims), rng.normal(0.0, 1.5, n_items))
    y = (rng.random((n_models, n_items)) < truth.prob(theta)).astype(float)
    return y, truth, theta


@pytest.fixture(scope="module")
def world():
    return simulate(250, 300, seed=0)


FITTERS = ["map", "py-irt"]


@pytest.fixture(scope="module", params=FITTERS)
def fitted(world, request):
    y, _, _ = world
    return fit_item_params(y, "2pl", fitter=request.param, epochs=300, seed=0)


def rank(x, y):
    return spearmanr(x, y)[0]


def test_2pl_fit_recovers_item_parameters(world, fitted):
    _, truth, _ = world
    assert fitted.n_rows == 250 and fitted.n_items == 300 and fitted.dims == 1
    assert fitted.meta["n_observations"] == 250 * 300 and fitted.meta["fitter"] in FITTERS
    assert rank(fitted.b, truth.b) > 0.95
    # discrimination is the hard parameter: with 250 models and a ~ LogNormal(0, 0.5) the
    # sampling noise alone holds its rank correlation near 0.85 (measured 0.82-0.88)
    assert rank(fitted.a[:, 0], truth.a[:, 0]) > 0.75
    assert np.all(fitted.a > 0)


def test_theta_from_fitted_items_recovers_abilities(world, fitted):
    y, _, theta = world
    est = estimate_theta(y, fitted)
    assert est.shape == (250, 1)
    assert rank(est[:, 0], theta[:, 0]) > 0.95
    # predicted accuracy at the estimated ability matches each model's observed accuracy
    assert np.abs(fitted.prob(est).mean(axis=1) - y.mean(axis=1)).mean() < 0.02


@pytest.mark.parametrize("fitter", FITTERS)
def test_fit_is_deterministic_and_leaves_global_state_alone(fitter):
    y, _, _ = simulate(60, 80, seed=3)
    np.random.seed(123)
    state, threads = np.random.get_state()[1].copy(), torch.get_num_threads()
    first = fit_item_params(y, "multidim_2pl", 2, fitter=fitter, epochs=60, seed=7)
    second = fit_item_params(y, "multidim_2pl", 2, fitter=fitter, epochs=60, seed=7)
    assert np.array_equal(first.a, second.a) and np.array_equal(first.b, second.b)
    assert np.array_equal(np.random.get_state()[1], state)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("fitter", FITTERS)
def test_1pl_has_unit_discrimination(fitter):
    rng = np.random.default_rng(1)
    theta, b = rng.normal(size=(150, 1)), rng.normal(0, 1.5, 120)
    y = (rng.random((150, 120)) < sigmoid(theta - b)).astype(float)
    fit = fit_item_params(y, "1pl", fitter=fitter, epochs=200)
    assert np.all(fit.a == 1.0) and fit.model == "1pl"
    assert rank(fit.b, b) > 0.95


@pytest.mark.parametrize("fitter", FITTERS)
def test_multidim_2pl_fits_and_predicts(fitter):
    y, truth, theta = simulate(150, 160, dims=2, seed=2)
    fit = fit_item_params(y, "multidim_2pl", dims=2, fitter=fitter, epochs=300)
    assert fit.a.shape == (160, 2) and fit.b.shape == (160,)
    # dimensions are only identified up to rotation; the curves they imply are identified
    est = estimate_theta(y, fit)
    assert rank(fit.b, truth.b) > 0.9
    assert np.corrcoef(fit.prob(est).ravel(), truth.prob(theta).ravel())[0, 1] > 0.9


@pytest.mark.parametrize("fitter", FITTERS)
def test_missing_cells_are_skipped(fitter):
    y, truth, _ = simulate(120, 100, seed=4)
    y[np.random.default_rng(0).random(y.shape) < 0.2] = np.nan
    fit = fit_item_params(y, "2pl", fitter=fitter, epochs=200)
    assert fit.meta["n_observations"] == int((~np.isnan(y)).sum())
    assert rank(fit.b, truth.b) > 0.9
    with pytest.raises(ValueError):
        fit_item_params(np.full((3, 4), 0.5))
    with pytest.raises(ValueError):
        fit_item_params(np.ones((4, 3)), "2pl", dims=2)
    with pytest.raises(ValueError, match="fitter"):
        fit_item_params(np.ones((4, 3)), fitter="jml")


def test_mle_and_map_abilities():
    _, truth, theta = simulate(200, 400, seed=5)
    rng = np.random.default_rng(6)
    y = (rng.random((200, 400)) < truth.prob(theta)).astype(float)
    mle = estimate_theta(y, truth)
    assert np.abs(mle - theta).mean() < 0.2
    # the MLE solves the score equation sum_j a_j (y_j - P_j) = 0
    score = ((y - truth.prob(mle)) @ truth.a)
    assert np.abs(score).max() < 1e-3
    # MAP under N(0, 1) lies between the prior mean and the MLE (one dimension)
    few = np.arange(0, 400, 20)
    mle_few = estimate_theta(y[:, few], truth, few)
    map_few = estimate_theta(y[:, few], truth, few, method="map")
    assert np.all(np.abs(map_few) <= np.abs(mle_few) + 1e-6)
    assert np.all(np.sign(map_few) * np.sign(mle_few) >= 0)
    # all models in one call give the same answer as one model at a time
    one = np.array([estimate_theta(y[i, few], truth, few) for i in range(5)])
    assert np.allclose(one, mle_few[:5], atol=1e-4)


def test_perfect_record_mle_hits_bound_map_stays_finite():
    truth = ItemParams(np.ones((10, 1)), np.linspace(-1, 1, 10))
    assert estimate_theta(np.ones(10), truth)[0] == pytest.approx(8.0)
    assert 0 < estimate_theta(np.ones(10), truth, method="map")[0] < 4
    assert estimate_theta(np.zeros(10), truth)[0] == pytest.approx(-8.0)


def test_save_load_roundtrip_is_atomic(tmp_path, fitted):
    fitted.item_ids = [f"item{j}" for j in range(fitted.n_items)]
    path = fitted.save(tmp_path / "sub" / "items.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["items.json"]  # no temp file left
    back = ItemParams.load(path)
    assert np.array_equal(back.a, fitted.a) and np.array_equal(back.b, fitted.b)
    assert back.n_rows == 250 and back.item_ids == fitted.item_ids and back.meta == fitted.meta


def test_py_irt_export_conventions(tmp_path):
    disc, diff = np.array([[0.5, 2.0], [1.0, 1.0]]), np.array([[1.0, -1.0], [0.5, 0.0]])
    theta = np.array([0.3, -0.7])
    exported = {"disc": disc.tolist(), "diff": diff.tolist(), "ability": [[0, 0]] * 3,
                "irt_model": "multidim_2pl", "item_ids": {"0": "x", "1": "y"}}
    stock = ItemParams.from_py_irt(exported)  # py-irt: sum_d disc_d (theta_d - diff_d)
    assert np.allclose(stock.logits(theta), (disc * (theta - diff)).sum(axis=1))
    assert stock.n_rows == 3 and stock.item_ids == ["x", "y"]
    (tmp_path / "best_parameters.json").write_text(json.dumps(exported))
    tiny = ItemParams.load(tmp_path / "best_parameters.json", convention="tinybenchmarks")
    assert np.allclose(tiny.logits(theta), (disc * theta - diff).sum(axis=1))  # tinyBenchmarks fork


def test_a_jobs_irt_fit_is_cached_per_machine(tmp_path, monkeypatch):
    """The same responses and IRT settings read back the same item parameters without refitting;
    other settings or other responses fit anew."""
    import fitness.fitness as ff
    from fitness.spec import IrtSpec

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    Y = (rng.random((8, 60)) < 0.5).astype(float)
    first = ff.fitted_item_params(Y, IrtSpec(fitter="py-irt", epochs=30))
    fresh = fit_item_params(Y, "2pl", fitter="py-irt", epochs=30, seed=42)
    assert np.array_equal(first.a, fresh.a) and np.array_equal(first.b, fresh.b)

    def no_fit(*args, **kwargs):
        raise AssertionError("refitted")

    monkeypatch.setattr(ff, "fit_item_params", no_fit)
    again = ff.fitted_item_params(Y, IrtSpec(fitter="py-irt", epochs=30, probes=3))  # probes do not change the fit of given rows
    assert np.array_equal(again.a, first.a) and np.array_equal(again.b, first.b) and again.n_rows == 8
    for other in ((Y, IrtSpec(fitter="py-irt", epochs=31)), (1 - Y, IrtSpec(fitter="py-irt", epochs=30)),
                  (Y, IrtSpec(epochs=30))):
        with pytest.raises(AssertionError, match="refitted"):
            ff.fitted_item_params(*other)


@pytest.mark.parametrize("kwargs,words", [
    ({"model": "multidim_2pl", "dims": 0}, "dims must be a positive integer"),
    ({"model": "multidim_2pl", "dims": -1}, "dims must be a positive integer"),
    ({"model": "multidim_2pl", "dims": 1.5}, "dims must be a positive integer"),
    ({"fitter": "py-irt", "epochs": 0}, "epochs must be a positive integer"),
])
def test_bad_fit_arguments_are_named(kwargs, words):
    y = (np.random.default_rng(0).random((6, 10)) < 0.5).astype(float)
    with pytest.raises(ValueError, match=words):
        fit_item_params(y, **kwargs)

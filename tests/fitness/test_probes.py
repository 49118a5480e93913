"""fitness.probes: what a batch of probe rows does for the item fit (against a brute-force
leave-one-out and closed cases), and when the next batch is cheap enough."""
import numpy as np
import pytest

from fitness.adaptive import answers_prior, run_cat
from fitness.irt import ItemParams, fit_item_params
from fitness.probes import ProbeGain, probe_budget, probe_gain

N_ENDS, K = 3, 10


@pytest.fixture(scope="module")
def rows():
    """A 2PL world: 3 endpoints and 12 probe merges (convex mixes of them), 200 items."""
    rng = np.random.default_rng(1)
    items = ItemParams(rng.lognormal(0, 0.4, (200, 1)), rng.normal(0, 1.2, 200))
    ends = rng.normal(0, 1.0, (N_ENDS, 1))
    theta = np.vstack([ends, rng.dirichlet(np.ones(N_ENDS), 12) @ ends])
    return items, (rng.random((len(theta), 200)) < items.prob(theta)).astype(float)


def _fit(y):
    return fit_item_params(y, "2pl")


def _errors(y, held, fit):
    """|CAT estimate - observed accuracy| of row `held` of y, parameters fitted without it."""
    rest = np.delete(y, held, axis=0)
    params = fit(rest)
    prior = answers_prior(params, rest[: N_ENDS - (held < N_ENDS)])
    return abs(run_cat(params, lambda idx: y[held, idx], prior, K).accuracy - y[held].mean())


def test_probe_gain_is_the_paired_leave_one_out_difference_on_the_earlier_probes(rows):
    _, y = rows
    new = 4
    got = probe_gain(y, N_ENDS, new, _fit, answers_prior, K)
    old = range(N_ENDS, len(y) - new)
    d = np.array([_errors(y[:-new], r, _fit) - _errors(y, r, _fit) for r in old])
    assert got.rows == len(d) == 8
    assert got.mean == pytest.approx(d.mean(), abs=1e-12)
    assert got.se == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)), abs=1e-12)
    assert got.helped == (d.mean() > d.std(ddof=1) / np.sqrt(len(d)))


def test_parameters_that_rows_cannot_change_gain_nothing(rows):
    """Item parameters from a leaderboard are not refitted: the same CAT with or without the batch."""
    items, y = rows
    got = probe_gain(y, N_ENDS, 4, lambda r: items, answers_prior, K)
    assert (got.mean, got.se, got.helped) == (0.0, 0.0, False)


def test_a_batch_that_repairs_the_fit_helps(rows):
    """A fitter that needs at least 13 rows to see the true items (with fewer, every item looks
    8 logits easier than it is, so a CAT predicts its unseen items all but certainly right): the
    batch that brings it there lowers the earlier probes' errors, far beyond noise."""
    items, y = rows
    broken = ItemParams(items.a, items.b - 8)
    got = probe_gain(y, N_ENDS, 4, lambda r: items if len(r) >= 13 else broken, answers_prior, K)
    assert got.helped and got.mean > 0.05 and got.mean > 3 * got.se


def test_no_batch_or_too_few_earlier_probes_measure_nothing(rows):
    _, y = rows
    assert not probe_gain(y, N_ENDS, 0, _fit, answers_prior, K).helped
    thin = probe_gain(y[: N_ENDS + 5], N_ENDS, 4, _fit, answers_prior, K)
    assert thin.rows == 1 and not thin.helped and thin.to_json()["se"] is None  # strict JSON: no infinity
    assert ProbeGain(0.02, 0.01, 8).to_json() == {"mean": 0.02, "se": 0.01, "rows": 8, "helped": True}


@pytest.mark.parametrize("n,batch,most,share,per_probe,search,want", [
    (11, 4, 35, 0.5, 100, 3000, 15),   # 15 x 100 = 1500 <= 0.5 x 3000
    (11, 4, 35, 0.5, 100, 2999, 11),   # 1500 > 1499.5: too dear
    (33, 4, 35, 1.0, 10, 10**6, 35),   # the last batch is cut at the most
    (35, 4, 35, 1.0, 10, 10**6, 35),   # at the most: no batch
    (11, 4, 35, 0.0, 100, 10**6, 11),  # share 0: never
])
def test_probe_budget_is_the_cheap_next_batch(n, batch, most, share, per_probe, search, want):
    assert probe_budget(n, batch, most, share, per_probe, search) == want

"""fitness.simulate: the response model's closed form, seeding, the presets against the real-answers table,
merge families, and the IRT fitter recovering a simulated 2PL's difficulties (a property oracle)."""
from dataclasses import replace

import numpy as np
import pytest

from fitness.irt import fit_item_params, sigmoid
from fitness.simulate import (
    ARC_CHALLENGE,
    MMLU_PRO_MATH,
    REAL,
    SimConfig,
    Simulation,
    describe,
    item_total_correlation,
    merge_family,
    simulate,
)


def test_guessing_floor_and_slip_closed_form():
    """An item with a = 0 is answered right with P = c + (1-c-s) sigmoid(-b), whatever the ability."""
    cfg = SimConfig(n_items=3, choices=10, dims=2, ability_sd=(1.0, 1.0), nuisance_sd=(0.5,), slip_max=0.2)
    sim = Simulation.draw(cfg, np.random.default_rng(0))
    sim.a[:] = 0.0
    sim.b[:] = [-1.0, 0.0, 2.5]
    assert np.allclose(sim.c, 0.1)  # guess_concentration None: exactly 1/choices
    expected = sim.c + (1 - sim.c - sim.s) * sigmoid(-sim.b)
    rng = np.random.default_rng(1)
    theta = sim.abilities(200_000, rng)
    assert np.allclose(sim.prob(theta[:5]), expected)
    freq = sim.answer(theta, rng).mean(axis=0)
    assert np.all(np.abs(freq - expected) < 4 * np.sqrt(expected * (1 - expected) / theta.shape[0]))
    # a strong model on a hard item still sits near the floor; a weak one on an easy item near the ceiling
    sim.a[:, 0] = 5.0
    assert np.all(sim.prob(np.array([-8.0, 0.0])) < sim.c + 0.01)
    assert np.all(sim.prob(np.array([8.0, 0.0])) > 1 - sim.s - 0.01)


def test_reproducible_by_seed():
    a, b, c = (simulate(ARC_CHALLENGE, 30, s) for s in (7, 7, 8))
    assert np.array_equal(a.responses, b.responses) and np.array_equal(a.sim.b, b.sim.b)
    assert np.array_equal(a.accuracy, b.accuracy)
    assert not np.array_equal(a.responses, c.responses)
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    assert np.array_equal(merge_family(a.theta[:3], 5, rng1)[0], merge_family(a.theta[:3], 5, rng2)[0])


@pytest.mark.parametrize("name, cfg", [("mmlu_pro_math", MMLU_PRO_MATH), ("arc_challenge", ARC_CHALLENGE)])
def test_preset_matches_real_answers(name, cfg):
    """Within stated tolerances of ../shared/real-answers.md (the simulator itself varies by about half of
    them from one drawn benchmark to the next): accuracy mean +-0.03, sd +-0.015, share of
    items with negative corrected item-total correlation +-0.06, first principal component +-0.03."""
    real = REAL[name]
    d = describe(simulate(cfg, real["models"], 1).responses, fit_irt=False)
    assert abs(d["acc_mean"] - real["acc_mean"]) < 0.03, d
    assert abs(d["acc_sd"] - real["acc_sd"]) < 0.015, d
    assert abs(d["itc_neg"] - real["itc_neg"]) < 0.06, d
    assert abs(d["pca"][0] - real["pca"][0]) < 0.03, d
    assert d["pca"][1] > 0.5 * real["pca"][1]  # a second dimension shows


def test_merge_family_inside_parents_hull():
    rng = np.random.default_rng(0)
    parents = rng.normal(0, 1, (4, 2))
    theta, w = merge_family(parents, 500, rng, noise_sd=0.0)
    assert np.allclose(w.sum(1), 1) and np.all(w >= 0)
    assert np.allclose(theta, w @ parents)
    assert np.all(theta.min(0) >= parents.min(0) - 1e-12) and np.all(theta.max(0) <= parents.max(0) + 1e-12)
    noisy, w2 = merge_family(parents, 2000, rng, noise_sd=0.2, shift=-0.5)
    resid = noisy - w2 @ parents - np.array([-0.5, 0.0])
    assert abs(resid.std() - 0.2) < 0.02 and np.all(np.abs(resid.mean(0)) < 0.03)


def test_item_total_correlation_matches_numpy():
    y = simulate(ARC_CHALLENGE, 60, 2).responses
    itc = item_total_correlation(y)
    j = int(np.flatnonzero(np.isfinite(itc))[0])
    assert np.isclose(itc[j], np.corrcoef(y[:, j], y.sum(1) - y[:, j])[0, 1])


def test_fit_recovers_difficulties_of_a_simulated_2pl():
    """Property oracle: on a large 1-D 2PL matrix (no guessing, no slips, no misfit) the MAP fitter's
    difficulties correlate > 0.9 with the true ones (and discriminations > 0.5)."""
    cfg = replace(SimConfig(n_items=300, choices=None, dims=1, ability_sd=(1.0,), nuisance_sd=()), b_sd=1.5)
    s = simulate(cfg, 600, 4)
    params = fit_item_params(s.responses, "2pl")
    assert np.corrcoef(params.b, s.sim.b)[0, 1] > 0.9
    assert np.corrcoef(params.a[:, 0], s.sim.a[:, 0])[0, 1] > 0.5


def test_job_world_shapes_and_seed():
    """A job's world: parents + probes known rows, candidates' truths are expected accuracies
    (between the floor and 1), and the same seed gives the same world."""
    from fitness.simulate import ARC_CHALLENGE, job_world

    w = job_world(ARC_CHALLENGE, np.random.default_rng(5), parents=3, probes=4, candidates=6)
    assert w.known.shape == (7, ARC_CHALLENGE.n_items) and w.answers.shape == (6, ARC_CHALLENGE.n_items)
    assert set(np.unique(w.known)) <= {0.0, 1.0} and np.all((w.truth > w.sim.c.mean() - 0.1) & (w.truth < 1))
    again = job_world(ARC_CHALLENGE, np.random.default_rng(5), parents=3, probes=4, candidates=6)
    assert np.array_equal(again.known, w.known) and np.array_equal(again.truth, w.truth)

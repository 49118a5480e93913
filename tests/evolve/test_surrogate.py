"""The surrogate prior (evolve/surrogate.py) against a Gaussian process worked by hand."""
from __future__ import annotations

import numpy as np
import pytest

from evolve.surrogate import MIN_OBSERVATIONS, SurrogatePriors, predict


def by_hand(U, y, u, gp):
    """GP regression (Rasmussen & Williams 2006, eq. 2.25-2.26) with the fitted model's RBF
    lengthscales, constant mean and noise, on outcomes standardized as BoTorch does; the sd of
    a new observation, times the leave-one-out scale (eq. 5.12: LOO residuals by refitting the
    posterior without each point, brute force) when above 1."""
    ls = gp.covar_module.lengthscale.detach().numpy().ravel()
    c = float(gp.mean_module.constant.detach())
    noise = float(gp.likelihood.noise.detach())
    m, s = y.mean(), y.std(ddof=1)
    z = (y.ravel() - m) / s

    def k(A, B):
        d = (A[:, None, :] - B[None, :, :]) / ls
        return np.exp(-0.5 * (d ** 2).sum(-1))

    def post(Ut, zt, v):
        K = k(Ut, Ut) + noise * np.eye(len(Ut))
        ks = k(Ut, v[None, :])[:, 0]
        return c + ks @ np.linalg.solve(K, zt - c), 1.0 + noise - ks @ np.linalg.solve(K, ks)

    loo = []
    for i in range(len(U)):
        keep = np.arange(len(U)) != i
        mu_i, var_i = post(U[keep], z[keep], U[i])
        loo.append((z[i] - mu_i) ** 2 / var_i)
    mean, var = post(U, z, u)
    return m + s * mean, s * np.sqrt(var) * max(1.0, np.sqrt(np.mean(loo)))


def test_prediction_matches_the_gp_equations():
    import torch

    from evolve.bo import fit_surrogate

    rng = np.random.default_rng(4)
    U = rng.random((7, 2))
    y = np.sin(3 * U[:, :1]) + U[:, 1:] ** 2 + 0.05 * rng.standard_normal((7, 1))
    u = np.array([0.3, 0.6])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        gp = fit_surrogate(U, y, np.full_like(y, np.nan))
    mean, sd = predict(U, y, torch.as_tensor(u[None, :], dtype=torch.float64))
    want_mean, want_sd = by_hand(U, y, u, gp)
    assert mean == pytest.approx(want_mean, abs=1e-6) and sd == pytest.approx(want_sd, abs=1e-6)
    # near a training point the prediction follows it, far from all of them the sd grows
    near, _ = predict(U, y, torch.as_tensor(U[:1] + 1e-4, dtype=torch.float64))
    assert near == pytest.approx(float(y[0, 0]), abs=0.1)


def test_priors_start_after_enough_observations_and_respect_the_floor():
    sp = SurrogatePriors([0.0, 0.0], [2.0, 2.0], {"b": 0.3})
    rng = np.random.default_rng(0)
    X = rng.random((8, 2)) * 2
    for i, x in enumerate(X):
        if i < MIN_OBSERVATIONS:
            assert sp.priors(x) == {}
        sp.add(x, {"b": [x.sum() - 2.0]})  # ability linear in the genome
    p = sp.priors(np.array([1.0, 1.0]))["b"]
    assert p.mean.shape == (1,) and p.mean[0] == pytest.approx(0.0, abs=0.2)
    assert p.sd[0] >= 0.3
    sp.add(np.array([1.5, 1.5]), {})  # a candidate without a CAT on "b" is no observation
    assert len(sp.U) == 8

"""Surrogate-informed fitness: a candidate's CAT starts from what nearby genomes scored.

Merges whose genomes are close have close abilities, so before a candidate is scored a
Gaussian process over the unit-cube genome, fitted on the abilities measured so far (the
probes' MAP abilities on every item, then each scored candidate's ability from its CAT answers
under the endpoint prior, `Fitness.observed_ability`, so that the surrogate's own priors do not
feed back into what it learns), predicts its
ability: N(mu(x), s(x)^2) becomes the CAT's prior (`subset.prior: surrogate`). s(x) is the
GP's posterior sd times its leave-one-out calibration (the RMS of the standardized LOO
residuals, Rasmussen & Williams 2006 eq. 5.12, when above 1: merges' abilities jump, a task
is kept or lost, and a GP fitted on a dozen points is overconfident there), floored at the
subset's `min_sd` so that the answers still move the estimate. A candidate near scored
ones starts close to its ability and needs fewer items for the same error. One GP per
adaptive benchmark and ability dimension (`bo.fit_surrogate`: RBF kernel with ARD, noise
inferred, since the observed abilities are themselves estimates); refitted from the stored
observations before each candidate, deterministically, so a resumed job rebuilds the same
priors from the recorded candidates' traces.
"""
from __future__ import annotations

import numpy as np

from fitness.adaptive import Prior

from .bo import fit_surrogate

MIN_OBSERVATIONS = 3  # below this the spec's fallback prior (the endpoints') serves


class SurrogatePriors:
    def __init__(self, lower, upper, min_sd: dict[str, float]):
        self.lower, self.upper = np.asarray(lower, float), np.asarray(upper, float)
        self.min_sd = dict(min_sd)
        self.U: list[np.ndarray] = []
        self.thetas: dict[str, list[np.ndarray]] = {k: [] for k in min_sd}

    def _unit(self, x) -> np.ndarray:
        return (np.asarray(x, float) - self.lower) / np.where(self.upper > self.lower, self.upper - self.lower, 1.0)

    def add(self, x, thetas: dict[str, np.ndarray]) -> None:
        """One observation: a genome and its measured ability on every surrogate benchmark."""
        if not all(k in thetas for k in self.thetas):
            return
        self.U.append(self._unit(x))
        for k in self.thetas:
            self.thetas[k].append(np.atleast_1d(np.asarray(thetas[k], float)))

    def priors(self, x) -> dict[str, Prior]:
        """The prior of every surrogate benchmark at genome x (empty below MIN_OBSERVATIONS)."""
        if len(self.U) < MIN_OBSERVATIONS:
            return {}
        import torch

        U, u = np.array(self.U), torch.as_tensor(self._unit(x)[None, :], dtype=torch.float64)
        out = {}
        for k, rows in self.thetas.items():
            T = np.array(rows)
            mean, sd = np.zeros(T.shape[1]), np.zeros(T.shape[1])
            for d in range(T.shape[1]):
                mean[d], sd[d] = predict(U, T[:, d:d + 1], u)
            out[k] = Prior(mean, np.maximum(sd, self.min_sd[k]))
        return out


def predict(U: np.ndarray, y: np.ndarray, u) -> tuple[float, float]:
    """Predictive mean and sd of a new observation at u, by a GP fitted on (U, y), the sd
    times max(1, loo_scale)."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        gp = fit_surrogate(U, y, np.full_like(y, np.nan))
        post = gp.posterior(u, observation_noise=True)
        scale = max(1.0, loo_scale(gp))
    return float(post.mean.detach().squeeze()), scale * float(post.variance.detach().clamp_min(0).sqrt().squeeze())


def loo_scale(gp) -> float:
    """RMS of the GP's standardized leave-one-out residuals (y_i - mu_-i) / sigma_-i, in closed
    form from K^-1 (R&W eq. 5.12): 1 when the GP's uncertainty is calibrated on its own data."""
    import torch

    with torch.no_grad():
        X, z = gp.train_inputs[0], gp.train_targets
        noise = gp.likelihood.noise_covar.noise
        K = gp.covar_module(X).to_dense() + torch.diag_embed(noise.expand(len(z)))
        Kinv = torch.linalg.inv(K)
        alpha = Kinv @ (z - gp.mean_module(X))
        d = torch.diagonal(Kinv)
        return float(torch.sqrt(torch.mean(alpha ** 2 / d)))

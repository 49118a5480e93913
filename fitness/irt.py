"""Item response theory: fit item parameters once, then read a model's ability from a few answers.

Item model (multidimensional two-parameter logistic, as in tinyBenchmarks and MERGE^3)::

    P(item j correct | theta) = sigmoid( sum_d a_jd * theta_d  -  b_j )

``a`` (discrimination, [items, dims]) says how sharply an item separates weak from strong
models along each ability dimension; ``b`` (difficulty, [items]) shifts the curve. 1PL is the
special case dims = 1, a = 1.

*Fitting* (``fit_item_params``) takes a 0/1 response matrix whose rows are models and columns
items, with one of two fitters:

* ``"map"`` (the default): joint maximum a posteriori estimation of items and abilities,

      max  sum_obs [y log P + (1-y) log(1-P)]  +  log N(theta_i; 0, I) + log N(b_j; 0, 3^2)
                                                +  log N(log a_jd; 0, 1),

  by L-BFGS-B on the analytic gradient (scipy): deterministic, no sampling, under a second on
  a few thousand items. This is joint Bayesian estimation of the 2PL (Swaminathan & Gifford
  1985, Psychometrika 50), i.e. JML with priors that keep the estimates finite
  when, as here, there are only tens of rows: the fine-tunes answer their own benchmark all
  right, which sends unpenalised JML to infinity. On the small zoo it halves IRT's own error
  (the accuracy it predicts at the ability read from all of a held-out merge's answers: 0.67
  points against py-irt's 1.40); at 20 items per benchmark it makes the estimates on fixed
  subsets 3-25% more accurate and those on adaptive items 2.3x (``bench/fitness_estimators.py``).
* ``"py-irt"``: py-irt's variational Bayes (pyro SVI, hierarchical priors, Adam lr 0.1, 2000
  epochs: the settings tinyBenchmarks passes to ``py-irt train``), which is what tinyBenchmarks
  and MERGE^3 use. Stock py-irt parameterises the logit as ``sum_d disc_d * (theta_d - diff_d)``;
  we convert to the form above with ``a = disc`` and ``b = sum_d disc_d * diff_d``, the same curve.

IRT needs many rows: three or four endpoint models are far too few, so callers add probe
merges, and ``ItemParams.n_rows`` records how many rows the fit used so that cost figures can
count them.

*Ability* (``estimate_theta``) is then a small convex problem per model with the items fixed:
maximum likelihood (as tinyBenchmarks' ``fit_theta``) or MAP under a N(0, prior_sd^2 I) prior,
solved with scipy's L-BFGS-B on an analytic gradient, all models in one call.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize

from core.devices import torch_threads
from core.fs import atomic_write

LOGIT_CLIP = 30.0  # as tinyBenchmarks' item_curve: keeps exp() finite, flattens the gradient beyond
THETA_BOUND = 8.0  # MLE of an all-correct / all-wrong record is at infinity; stop at this |theta_d|
FORMAT = "evomerge.item_params"


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow warnings


def bernoulli_nll(z: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Negative log-likelihood of 0/1 answers ``y`` at logits ``z``, summed over the observed
    cells (``mask``), and its derivative in z: sigmoid(z) - y, zero where unobserved or where
    |z| reaches the clip (the logits are clipped to +-LOGIT_CLIP, so the loss is flat there).
    log P = -softplus(-z) and log(1-P) = -softplus(z), by logaddexp: exact and stable."""
    zc = np.clip(z, -LOGIT_CLIP, LOGIT_CLIP)
    terms = y * np.logaddexp(0.0, -zc) + (1.0 - y) * np.logaddexp(0.0, zc)
    resid = np.where(np.abs(z) < LOGIT_CLIP, sigmoid(zc) - y, 0.0)
    if mask is not None:
        terms, resid = np.where(mask, terms, 0.0), np.where(mask, resid, 0.0)
    return float(terms.sum()), resid


@dataclass
class ItemParams:
    """Fitted item parameters: ``a`` [items, dims], ``b`` [items], plus where they came from.

    ``n_rows`` is the number of response rows (models, probe merges included) the fit used;
    ``meta`` keeps the fit settings (model type, epochs, seed, ...).
    """

    a: np.ndarray
    b: np.ndarray
    model: str = "2pl"
    n_rows: int = 0
    item_ids: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.a = np.asarray(self.a, dtype=np.float64)
        self.b = np.asarray(self.b, dtype=np.float64).reshape(-1)
        if self.a.ndim == 1:
            self.a = self.a[:, None]
        if self.a.shape[0] != self.b.shape[0]:
            raise ValueError(f"a has {self.a.shape[0]} items, b has {self.b.shape[0]}")
        if self.item_ids is not None and len(self.item_ids) != self.n_items:
            raise ValueError("item_ids must name every item")

    @property
    def n_items(self) -> int:
        return int(self.b.shape[0])

    @property
    def dims(self) -> int:
        return int(self.a.shape[1])

    def logits(self, theta: np.ndarray, items: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """sum_d a_jd theta_d - b_j, clipped to +-30; theta [dims] or [models, dims] -> [..., items]."""
        a, b = (self.a, self.b) if items is None else (self.a[items], self.b[items])
        theta = np.asarray(theta, dtype=np.float64)
        if theta.ndim == 0:
            theta = theta.reshape(1)
        if theta.shape[-1] != self.dims:
            raise ValueError(f"theta's last axis must have {self.dims} dims, got shape {theta.shape}")
        return np.clip(theta @ a.T - b, -LOGIT_CLIP, LOGIT_CLIP)

    def prob(self, theta: np.ndarray, items: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """P(correct | theta) for every item (or the given ones): the item characteristic curves."""
        return sigmoid(self.logits(theta, items))

    def subset(self, items: Sequence[int] | np.ndarray) -> "ItemParams":
        items = np.asarray(items, dtype=int)
        ids = None if self.item_ids is None else [self.item_ids[i] for i in items]
        return ItemParams(self.a[items], self.b[items], self.model, self.n_rows, ids, dict(self.meta))

    # ---- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": 1,
            "model": self.model,
            "n_rows": int(self.n_rows),
            "a": self.a.tolist(),
            "b": self.b.tolist(),
            "item_ids": self.item_ids,
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically: a temporary file beside ``path``, fsync, then rename over it."""
        return atomic_write(path, json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], convention: str = "py_irt") -> "ItemParams":
        """Our own format, or a py-irt parameter export (keys ``disc``/``diff``, see ``from_py_irt``)."""
        if data.get("format") == FORMAT:
            return cls(np.array(data["a"]), np.array(data["b"]), data.get("model", "2pl"),
                       int(data.get("n_rows", 0)), data.get("item_ids"), dict(data.get("meta") or {}))
        if "diff" in data:
            return cls.from_py_irt(data, convention=convention)
        raise ValueError("not an item parameter file: expected evomerge format or py-irt 'diff'/'disc'")

    @classmethod
    def load(cls, path: str | os.PathLike, convention: str = "py_irt") -> "ItemParams":
        """Read a file written by ``save`` or a py-irt ``parameters.json``/``best_parameters.json``."""
        with open(path) as f:
            return cls.from_dict(json.load(f), convention=convention)

    @classmethod
    def from_py_irt(cls, params: dict[str, Any], model: str | None = None, convention: str = "py_irt",
                    n_rows: int | None = None) -> "ItemParams":
        """Convert py-irt's exported ``disc``/``diff`` to (a, b).

        ``convention="py_irt"``: stock py-irt, logit = sum_d disc_d (theta_d - diff_d), so
        b = sum_d disc_d diff_d. ``convention="tinybenchmarks"``: the tinyBenchmarks fork of py-irt
        (``felipemaiapolo/py-irt``, multidim_2pl), logit = sum_d (disc_d theta_d - diff_d), so
        b = sum_d diff_d; use it to import tinyBenchmarks' ``best_parameters.json``.
        """
        model = model or str(params.get("irt_model", "2pl"))
        diff = np.asarray(params["diff"], dtype=np.float64)
        diff2 = diff[:, None] if diff.ndim == 1 else diff
        if "disc" in params:
            disc = np.asarray(params["disc"], dtype=np.float64)
            disc = disc[:, None] if disc.ndim == 1 else disc
        else:  # 1PL: unit discrimination
            disc = np.ones_like(diff2)
        if convention == "py_irt":
            b = (disc * diff2).sum(axis=1)
        elif convention == "tinybenchmarks":
            b = diff2.sum(axis=1)
        else:
            raise ValueError(f"unknown convention {convention!r}")
        item_ids = params.get("item_ids")
        if isinstance(item_ids, dict):  # py-irt exports {index: item_id}
            item_ids = [item_ids[k] for k in sorted(item_ids, key=int)]
        if n_rows is None:
            n_rows = len(params.get("subject_ids") or params.get("ability") or [])
        return cls(disc, b, model, int(n_rows), item_ids)


# ---- fitting ---------------------------------------------------------------------------------
PY_IRT_MODELS = {"1pl": "1pl", "2pl": "2pl", "multidim_2pl": "multidim_2pl", "mirt": "multidim_2pl"}


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed python, numpy, torch and pyro for the block, then put the caller's RNG states back."""
    import pyro
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        pyro.set_rng_seed(seed)  # seeds random, numpy and torch
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _py_irt_dataset(responses: np.ndarray, item_ids: list[str]):
    """py-irt's Dataset built in memory (no jsonlines file); NaN cells are left out as unobserved."""
    from py_irt.dataset import Dataset, OrderedSet

    rows, cols = np.nonzero(~np.isnan(responses))
    subject_ids = [f"m{i}" for i in range(responses.shape[0])]
    return Dataset(
        item_ids=OrderedSet(item_ids),
        subject_ids=OrderedSet(subject_ids),
        item_id_to_ix={x: j for j, x in enumerate(item_ids)},
        ix_to_item_id={j: x for j, x in enumerate(item_ids)},
        subject_id_to_ix={x: i for i, x in enumerate(subject_ids)},
        ix_to_subject_id={i: x for i, x in enumerate(subject_ids)},
        observation_subjects=rows.tolist(),
        observation_items=cols.tolist(),
        observations=responses[rows, cols].tolist(),
        training_example=[True] * len(rows),
    )


FITTERS = ("map", "py-irt")
MAP_PRIOR_SD = {"theta": 1.0, "b": 3.0, "log_a": 1.0}  # the "map" fitter's priors (module docstring)


def _checked(responses: np.ndarray, model: str, dims: int, item_ids) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """The response matrix as floats, its observed mask, py-irt's model name and the item ids."""
    y = np.asarray(responses, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError("responses must be a [models, items] matrix")
    observed = ~np.isnan(y)
    if not np.all(np.isin(y[observed], (0.0, 1.0))):
        raise ValueError("responses must be 0/1 (NaN for missing)")
    if not observed.any(axis=0).all() or not observed.any(axis=1).all():
        raise ValueError("every row and every column needs at least one observed response")
    py_model = PY_IRT_MODELS.get(model)
    if py_model is None:
        raise ValueError(f"unknown IRT model {model!r}; choose from {sorted(PY_IRT_MODELS)}")
    if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
        raise ValueError(f"dims must be a positive integer, got {dims!r}")
    if dims != 1 and py_model != "multidim_2pl":
        raise ValueError("dims > 1 needs model='multidim_2pl'")
    ids = [str(x) for x in item_ids] if item_ids is not None else [f"q{j}" for j in range(y.shape[1])]
    if len(set(ids)) != y.shape[1]:
        raise ValueError("item_ids must be unique, one per column")
    return y, observed, py_model, ids


def fit_item_params(
    responses: np.ndarray,
    model: str = "2pl",
    dims: int = 1,
    *,
    fitter: str = "map",
    epochs: int = 2000,
    lr: float = 0.1,
    priors: str = "hierarchical",
    seed: int = 42,
    device: str = "cpu",
    item_ids: Sequence[str] | None = None,
    use_best: bool = True,
    threads: int | None = 1,
) -> ItemParams:
    """Fit IRT item parameters to a response matrix, deterministically (see the module docstring).

    responses: [models, items], 1 correct / 0 wrong / NaN not evaluated. model: ``"1pl"``,
    ``"2pl"`` or ``"multidim_2pl"`` (with ``dims``; only the multidimensional model takes more
    than one). Rows and items with no observation at all are an error rather than silently given
    prior values. ``fitter="map"`` uses ``seed`` (the starting point of a multidimensional fit)
    and none of the py-irt settings. ``fitter="py-irt"``: defaults follow tinyBenchmarks'
    ``tutorials/irt.py::train_irt_model`` (hierarchical priors, lr 0.1, 2000 epochs, seed 42, and
    the lowest-loss epoch's parameters, i.e. ``best_parameters.json``, with ``use_best``).

    Determinism of py-irt: the seed fixes pyro's sampling, and ``threads=1`` (default) runs torch
    single-threaded during the fit, because multi-threaded CPU scatter-adds (the backward pass of
    the per-observation gathers) sum in a varying order and make repeated fits differ in the last
    bits. On these small problems one thread is also the fastest. ``threads=None`` leaves torch alone.
    """
    y, observed, py_model, ids = _checked(responses, model, dims, item_ids)
    if fitter == "map":
        params = _fit_map(np.where(observed, y, 0.0), observed, py_model, dims, seed)
        params.meta = {"fitter": "map", "seed": seed, "dims": dims, "prior_sd": dict(MAP_PRIOR_SD),
                       "n_observations": int(observed.sum()), **params.meta}
    elif fitter == "py-irt":
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        params = _fit_py_irt(y, ids, py_model, dims, epochs, lr, priors, seed, device, use_best, threads)
        params.meta = {"epochs": epochs, "lr": lr, "priors": priors, "seed": seed, "dims": dims,
                       "n_observations": int(observed.sum()), "fitter": "py-irt",
                       "params": "best" if use_best else "last"}
    else:
        raise ValueError(f"unknown IRT fitter {fitter!r}; choose from {list(FITTERS)}")
    params.item_ids = ids if item_ids is not None else None
    return params


def _fit_map(y: np.ndarray, mask: np.ndarray, model: str, dims: int, seed: int) -> ItemParams:
    """Joint MAP of (theta [rows, dims], b [items], log a [items, dims]) by L-BFGS-B.

    With z = theta a^T - b and r = (sigmoid(z) - y) on observed cells, the gradient of the
    negative log posterior is r a + theta / s_theta^2 for theta, -sum_rows r + b / s_b^2 for b,
    and a * (r^T theta) + log a / s_a^2 for log a (1PL: a = 1, not fitted). The start: abilities
    from each row's standardized accuracy, difficulties from each item's observed accuracy, a = 1,
    plus a small seeded jitter on the extra dimensions so that they can separate.
    """
    rows, items = y.shape
    free_a = model != "1pl"
    sd = MAP_PRIOR_SD
    rng = np.random.default_rng(seed)
    acc = (y * mask).sum(1) / mask.sum(1)
    theta0 = np.repeat(((acc - acc.mean()) / (acc.std() + 1e-9))[:, None], dims, axis=1)
    p_item = np.clip((y * mask).sum(0) / mask.sum(0), 0.05, 0.95)
    la0 = np.zeros((items, dims))
    if dims > 1:
        theta0 = theta0 + rng.normal(0.0, 0.3, theta0.shape)
        la0 = la0 + rng.normal(0.0, 0.3, la0.shape)
    n_theta, n_b = rows * dims, items

    def unpack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        theta, b = x[:n_theta].reshape(rows, dims), x[n_theta:n_theta + n_b]
        log_a = x[n_theta + n_b:].reshape(items, dims) if free_a else np.zeros((items, dims))
        return theta, b, log_a

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        theta, b, log_a = unpack(x)
        a = np.exp(log_a)
        nll, r = bernoulli_nll(theta @ a.T - b, y, mask)
        nll += 0.5 * ((theta ** 2).sum() / sd["theta"] ** 2 + (b ** 2).sum() / sd["b"] ** 2)
        grads = [(r @ a + theta / sd["theta"] ** 2).ravel(), -r.sum(0) + b / sd["b"] ** 2]
        if free_a:
            nll += 0.5 * (log_a ** 2).sum() / sd["log_a"] ** 2
            grads.append((a * (r.T @ theta) + log_a / sd["log_a"] ** 2).ravel())
        return float(nll), np.concatenate(grads)

    x0 = [theta0.ravel(), -np.log(p_item / (1.0 - p_item))] + ([la0.ravel()] if free_a else [])
    res = minimize(fun, np.concatenate(x0), jac=True, method="L-BFGS-B",
                   options={"maxiter": 20_000, "maxfun": 40_000, "ftol": 1e-12, "gtol": 1e-6, "maxcor": 20})
    _, b, log_a = unpack(res.x)
    return ItemParams(np.exp(log_a), b, model, rows, meta={"iterations": int(res.nit), "converged": bool(res.success)})


def _fit_py_irt(y: np.ndarray, ids: list[str], py_model: str, dims: int, epochs: int, lr: float, priors: str,
                seed: int, device: str, use_best: bool, threads: int | None) -> ItemParams:
    """py-irt's SVI fit (pyro), seeded, single-threaded by default, its stdout swallowed."""
    import pyro

    with warnings.catch_warnings():  # py-irt's imports raise pydantic/click deprecation warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        from py_irt.config import IrtConfig
        from py_irt.training import IrtModelTrainer

    config = IrtConfig(model_type=py_model, epochs=epochs, lr=lr, priors=priors, seed=seed,
                       dims=dims if py_model == "multidim_2pl" else None, log_every=max(epochs, 1))
    with _seeded(seed), torch_threads(threads), contextlib.redirect_stdout(io.StringIO()):
        trainer = IrtModelTrainer(data_path=None, config=config, dataset=_py_irt_dataset(y, ids), verbose=False)
        trainer.train(epochs=epochs, device=device)
        exported = trainer.best_params if use_best and trainer.best_params else trainer.last_params
        pyro.clear_param_store()
    return ItemParams.from_py_irt(exported, model=py_model, n_rows=y.shape[0])


# ---- ability ---------------------------------------------------------------------------------
def _neg_log_lik(theta: np.ndarray, y: np.ndarray, mask: np.ndarray, a: np.ndarray, b: np.ndarray,
                 prior_sd: float | None) -> tuple[float, np.ndarray]:
    """Bernoulli NLL summed over observed cells and rows, with its gradient in theta [rows, dims]."""
    nll, resid = bernoulli_nll(theta @ a.T - b, y, mask)  # resid [rows, items]
    grad = resid @ a                                     # [rows, dims]
    if prior_sd is not None:
        nll += 0.5 * float((theta ** 2).sum()) / prior_sd ** 2
        grad = grad + theta / prior_sd ** 2
    return float(nll), grad


def estimate_theta(
    responses: np.ndarray,
    item_params: ItemParams,
    items: Sequence[int] | np.ndarray | None = None,
    method: str = "mle",
    prior_sd: float = 1.0,
    bound: float = THETA_BOUND,
) -> np.ndarray:
    """Ability of one or many models from their 0/1 answers on ``items`` (all items by default).

    MLE (tinyBenchmarks ``fit_theta``):  theta = argmax sum_j y_j log P_j + (1-y_j) log(1-P_j),
    P_j = sigmoid(a_j . theta - b_j). MAP adds log N(theta; 0, prior_sd^2 I), which keeps the
    estimate finite and shrinks it toward the population mean when few items were seen; the MLE
    of an all-correct or all-wrong record is unbounded and stops at +-``bound``.

    responses: [n] or [models, n] aligned with ``items`` (NaN = not answered). Returns [dims] or
    [models, dims]. Rows are independent, so all of them are solved as one L-BFGS-B problem
    (the objective and gradient are sums over rows).
    """
    if method not in ("mle", "map"):
        raise ValueError("method must be 'mle' or 'map'")
    if method == "map" and not prior_sd > 0:
        raise ValueError(f"prior_sd must be positive, got {prior_sd}")
    if items is not None:
        idx = np.asarray(items).reshape(-1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError("items must be integer item indices")
        if np.any(idx < 0) or np.any(idx >= item_params.n_items) or np.unique(idx).size != idx.size:
            raise ValueError(f"items must be distinct indices in 0..{item_params.n_items - 1}")
    y = np.asarray(responses, dtype=np.float64)
    single = y.ndim == 1
    y = np.atleast_2d(y)
    ip = item_params if items is None else item_params.subset(items)
    if y.shape[1] != ip.n_items:
        raise ValueError(f"{y.shape[1]} responses for {ip.n_items} items")
    mask = ~np.isnan(y)
    if not np.isin(y[mask], (0.0, 1.0)).all():
        raise ValueError("responses must be 0/1 answers (NaN: not answered)")
    y = np.where(mask, y, 0.0)
    rows, dims = y.shape[0], ip.dims
    prior = prior_sd if method == "map" else None

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        nll, grad = _neg_log_lik(flat.reshape(rows, dims), y, mask, ip.a, ip.b, prior)
        return nll, grad.ravel()

    res = minimize(fun, np.zeros(rows * dims), jac=True, method="L-BFGS-B",
                   bounds=[(-bound, bound)] * (rows * dims),
                   options={"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-7, "maxcor": 20})
    theta = res.x.reshape(rows, dims)
    return theta[0] if single else theta

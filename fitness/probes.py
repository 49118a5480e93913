"""How many probe merges a job evaluates in full: more while they still improve the item fit and
cost little next to the search.

Probes are merges of the job's own kind answered on every item. They are the rows, besides the
endpoints, that the item parameters are fitted on, and the rows on which `choose_estimator`
checks the estimators and the CAT's line and model error are fitted. A row helps while the fit
is unstable and costs a full evaluation. A job evaluates ``irt.probes`` first, then batches of
``irt.probe_batch`` up to ``irt.max_probes`` while both hold:

1. the batch is cheap: all probes' items stay within ``irt.probe_share`` of the items its
   search will score (candidates x subset size, summed over benchmarks), so a benchmark small
   next to the search gets more rows and a large one keeps the first batch;
2. the last batch helped: on the earlier probe rows, the leave-one-out CAT errors with item
   parameters fitted with the batch are lower than without it by more than one standard error
   of the paired differences (`probe_gain`), on at least one benchmark. Item parameters from a
   leaderboard or a file are not refitted, so probes cannot improve them and the growth stops.

The measured learning curve behind the defaults: bench/fitness_probes.py (bench/README.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .adaptive import DEFAULT_ROUND, CatCheck, Prior, loo_cats
from .irt import ItemParams


@dataclass(frozen=True)
class ProbeGain:
    """What the last batch of probe rows did to the CAT on the earlier probe rows: the mean of
    d_r = |e_without,r| - |e_with,r| (accuracy; > 0: the batch lowered the errors), its standard
    error, and the number of rows compared."""

    mean: float
    se: float
    rows: int

    @property
    def helped(self) -> bool:
        return self.rows > 1 and self.mean > self.se

    def to_json(self) -> dict:
        return {"mean": self.mean, "se": self.se if np.isfinite(self.se) else None, "rows": self.rows,
                "helped": self.helped}  # JSON has no infinity


def probe_gain(rows, n_endpoints: int, new: int, fit: Callable[[np.ndarray], ItemParams],
               prior_of: Callable[[ItemParams, np.ndarray], Prior], budget: int,
               round_size: int = DEFAULT_ROUND, with_new: CatCheck | None = None) -> ProbeGain:
    """`ProbeGain` of the last ``new`` rows of ``rows`` [endpoints, probes, items]: `loo_cats` on
    all rows (``with_new`` when the caller has it) against `loo_cats` on the rows without the
    batch, compared on the probe rows both hold."""
    y = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    old = y.shape[0] - n_endpoints - new
    if new <= 0 or old < 2:
        return ProbeGain(0.0, float("inf"), max(old, 0))
    with_new = with_new if with_new is not None else loo_cats(y, n_endpoints, fit, prior_of, budget, round_size)
    without = loo_cats(y[:-new], n_endpoints, fit, prior_of, budget, round_size)
    d = np.abs(without.errors) - np.abs(with_new.errors[:old])
    return ProbeGain(float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)), int(d.size))


def probe_budget(n_probes: int, batch: int, max_probes: int, share: float, items_per_probe: int,
                 search_items: int) -> int:
    """How many probes the next batch may bring the job to: ``n_probes + batch`` (at most
    ``max_probes``) when all of them together cost at most ``share`` of the search's items, else
    ``n_probes`` (no batch)."""
    nxt = min(n_probes + batch, max_probes)
    return nxt if nxt > n_probes and nxt * items_per_probe <= share * search_items else n_probes

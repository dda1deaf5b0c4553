"""Out-of-sample scores: raw against calibrated forecasts on held-out races.

The kernels behind ``calq evaluate``. Each scored row is one (race, driver)
of one event, with the raw forecast ``p``, the calibrated probability ``q``
(the posterior mean of a fit that saw only earlier races) and the outcome
``y``. Rows of one race are dependent (one driver's top-5 is another's
miss), so uncertainty is measured by resampling *races*, never rows.

The improvement of calibration on a score S (Brier, log loss) is::

    Δ = (Σ_r Σ_i∈r S(p_i, y_i) − Σ_r Σ_i∈r S(q_i, y_i)) / Σ_r n_r

raw minus calibrated per row, positive when calibration helped. Its
interval comes from :func:`race_bootstrap`: the same ratio of sums over races
drawn with replacement, and the percentile interval of the draws.

No JAX here: the posterior has already been applied by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from shared.stats import metrics
from shared.stats.evaluation import forecast_scores

#: Central level of the bootstrap interval (5th to 95th percentile).
LEVEL = 0.9
#: Bootstrap resamples of the races.
N_BOOT = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval."""

    mean: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def race_bootstrap(
    differences: ArrayLike,
    rows: ArrayLike,
    *,
    level: float = LEVEL,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Interval:
    r"""Per-row mean of race-level sums, with a percentile bootstrap over races.

    ``differences[r]`` is race r's *sum* over its rows of a per-row quantity
    (e.g. raw minus calibrated log loss), ``rows[r]`` its number of rows. The
    estimate is :math:`\sum_r d_r / \sum_r n_r`. Each of ``n_boot`` resamples
    draws R races with replacement (:math:`c_r` times race r) and
    computes :math:`\sum_r c_r d_r / \sum_r c_r n_r`; ``low``/``high`` are the
    :math:`(1-\text{level})/2` and :math:`(1+\text{level})/2` quantiles of
    those. With one race the interval is the point. NaN for no races.
    """
    if not 0.0 < level < 1.0:
        raise ValueError("level must lie in (0, 1)")
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    d = np.asarray(differences, dtype=np.float64).ravel()
    n = np.asarray(rows, dtype=np.float64).ravel()
    if d.shape != n.shape:
        raise ValueError("differences and rows need one entry per race")
    if np.any(n <= 0) or not np.all(np.isfinite(d)):
        raise ValueError("every race needs at least one row and a finite score")
    if d.size == 0:
        nan = float("nan")
        return Interval(nan, nan, nan)
    mean = float(d.sum() / n.sum())
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, d.size, size=(n_boot, d.size))
    counts = np.bincount((picks + d.size * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * d.size)
    counts = counts.reshape(n_boot, d.size).astype(np.float64)
    draws = (counts @ d) / (counts @ n)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return Interval(mean, float(low), float(high))


def per_race_sums(p: np.ndarray, q: np.ndarray, y: np.ndarray, race: np.ndarray) -> dict[str, np.ndarray]:
    """Per race (in order of first appearance): rows, and the raw and calibrated Brier and log-loss sums.

    The per-row scores are those of :func:`metrics.brier_score` and
    :func:`metrics.log_loss` (their mean over a race times its rows).
    """
    races, first, inverse = np.unique(race, return_index=True, return_inverse=True)
    order = np.argsort(first)
    out = {k: np.empty(races.size) for k in ("rows", "raw_brier", "cal_brier", "raw_log_loss", "cal_log_loss")}
    for slot, r in enumerate(order):
        sel = inverse == r
        n = int(sel.sum())
        out["rows"][slot] = n
        out["raw_brier"][slot] = metrics.brier_score(p[sel], y[sel]) * n
        out["cal_brier"][slot] = metrics.brier_score(q[sel], y[sel]) * n
        out["raw_log_loss"][slot] = metrics.log_loss(p[sel], y[sel]) * n
        out["cal_log_loss"][slot] = metrics.log_loss(q[sel], y[sel]) * n
    out["race"] = races[order]
    return out


def compare(
    p: ArrayLike,
    q: ArrayLike,
    y: ArrayLike,
    race: Sequence[Any] | np.ndarray,
    *,
    level: float = LEVEL,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Raw ``p`` against calibrated ``q`` on outcomes ``y``, rows grouped by ``race``.

    Returns ``races``, ``rows``, ``raw`` and ``calibrated``
    (:func:`~shared.stats.evaluation.forecast_scores` as dicts), and ``log_loss_improvement`` and ``brier_improvement``
    (:class:`Interval` dicts: raw minus calibrated per row, with the
    bootstrap over races of :func:`race_bootstrap`).
    """
    p_arr, q_arr = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    y_arr = np.asarray(y, dtype=np.float64)
    race_arr = np.asarray(race)
    if not (p_arr.shape == q_arr.shape == y_arr.shape == race_arr.shape) or p_arr.ndim != 1:
        raise ValueError("p, q, y and race need one entry per row")
    sums = per_race_sums(p_arr, q_arr, y_arr, race_arr)
    return {
        "races": int(sums["race"].size),
        "rows": int(p_arr.size),
        "raw": forecast_scores(p_arr, y_arr).model_dump(),
        "calibrated": forecast_scores(q_arr, y_arr).model_dump(),
        "log_loss_improvement": race_bootstrap(
            sums["raw_log_loss"] - sums["cal_log_loss"], sums["rows"], level=level, n_boot=n_boot, seed=seed
        ).to_dict(),
        "brier_improvement": race_bootstrap(
            sums["raw_brier"] - sums["cal_brier"], sums["rows"], level=level, n_boot=n_boot, seed=seed
        ).to_dict(),
    }


__all__ = ["LEVEL", "N_BOOT", "Interval", "compare", "per_race_sums", "race_bootstrap"]

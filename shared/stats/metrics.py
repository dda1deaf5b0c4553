"""Forecast-verification metrics: array kernels over ensembles and probabilities.

Two families of forecasts are scored here.

*Ensembles* — the upstream simulator's scenarios, e.g. ``sim_points[race,
scenario, driver]`` against ``points[race, driver]``. The ensemble functions
(:func:`crps_ensemble`, :func:`log_score`, :func:`coverage`,
:func:`pit_values`) take ``observations`` of some shape ``S`` and
``forecasts`` whose member axis is ``axis`` (last by default) and whose other
axes broadcast against ``S``.

*Event probabilities* — ``p`` in [0, 1] against binary outcomes ``y``
(:func:`brier_score`, :func:`log_loss`, :func:`reliability_curve`,
:func:`expected_calibration_error`), and the pairwise co-hit check
:func:`joint_event_validation`.

Conventions shared by every function:

- NaN means *absent* (a driver not entered, a scenario not simulated). An
  absent member is dropped from its ensemble, an absent observation or
  probability is dropped from every average; neither is ever treated as 0.
  An element whose observation is NaN, or whose members are all NaN, scores
  NaN.
- Averages over nothing are NaN, not 0.
- Options are keyword-only.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import special, stats

__all__ = [
    "JointEventResult",
    "RaceCache",
    "ReliabilityCurve",
    "brier_score",
    "coverage",
    "coverage_hits",
    "coverage_of_hits",
    "crps_ensemble",
    "expected_calibration_error",
    "joint_event_validation",
    "log_loss",
    "log_score",
    "pit_histogram",
    "pit_uniformity_pvalue",
    "pit_values",
    "reliability_curve",
]

T = TypeVar("T")

#: Seed of the generator :func:`pit_values` uses when given none, so that a
#: randomised PIT is reproducible by default.
DEFAULT_PIT_SEED = 20090101

#: Floor of the rule-of-thumb bandwidth in :func:`log_score`, in the
#: outcome's units.
DEFAULT_MIN_BANDWIDTH = 1e-3

_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


# --------------------------------------------------------------------------
# private helpers: NaN masking and sorted ensembles
# --------------------------------------------------------------------------


def _members(forecasts: ArrayLike, axis: int) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Forecasts as floats with the member axis last, and the count of non-NaN members."""
    x = np.moveaxis(np.asarray(forecasts, dtype=np.float64), axis, -1)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError("forecasts need a non-empty member axis")
    return x, np.count_nonzero(~np.isnan(x), axis=-1)


def _observations(observations: ArrayLike, x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Observations as floats, broadcast to the ensemble's element shape."""
    y = np.asarray(observations, dtype=np.float64)
    try:
        shape = np.broadcast_shapes(y.shape, x.shape[:-1])
    except ValueError:
        raise ValueError(
            f"observations of shape {y.shape} do not match forecasts with element shape {x.shape[:-1]}"
        ) from None
    return np.broadcast_to(y, shape)


def _absent(y: NDArray[np.float64], count: NDArray[np.int64]) -> NDArray[np.bool_]:
    """Elements that cannot be scored: NaN observation or no members."""
    return np.isnan(y) | (count == 0)


def _finite_pairs(p: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Flattened (p, y) over the positions where both are present, range-checked."""
    p_arr, y_arr = np.broadcast_arrays(np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64))
    keep = ~(np.isnan(p_arr) | np.isnan(y_arr))
    p_arr, y_arr = p_arr[keep], y_arr[keep]
    if np.any((p_arr < 0.0) | (p_arr > 1.0)):
        raise ValueError("probabilities must lie in [0, 1]")
    if np.any((y_arr < 0.0) | (y_arr > 1.0)):
        raise ValueError("outcomes must lie in [0, 1] (1 = the event happened)")
    return p_arr, y_arr


def _sorted_quantiles(
    sorted_x: NDArray[np.float64], count: NDArray[np.int64], probs: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Linear-interpolation quantiles (NumPy's default) of ensembles sorted with NaN last.

    ``sorted_x`` has members on the last axis, the ``count[...]`` present ones
    first; the result has shape ``count.shape + probs.shape``. Rows without
    members give NaN.
    """
    last = np.maximum(count - 1, 0)[..., None]
    pos = probs * last
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, last)
    x_lo = np.take_along_axis(sorted_x, lo, axis=-1)
    x_hi = np.take_along_axis(sorted_x, hi, axis=-1)
    return x_lo + (pos - lo) * (x_hi - x_lo)


def _scalar_or_array(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """A 0-d result as a NumPy scalar, anything else unchanged."""
    return a[()] if a.ndim == 0 else a


def _mean_or_nan(a: NDArray[np.float64]) -> float:
    return float(a.mean()) if a.size else float("nan")


def _json_float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _json_list(a: NDArray[Any]) -> list[float | None]:
    return [_json_float(v) for v in np.asarray(a, dtype=np.float64)]


def _readonly(a: ArrayLike, dtype: Any = np.float64) -> NDArray[Any]:
    out = np.array(a, dtype=dtype)
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------
# ensembles
# --------------------------------------------------------------------------


def crps_ensemble(observations: ArrayLike, forecasts: ArrayLike, *, axis: int = -1) -> NDArray[np.float64]:
    r"""Continuous ranked probability score of an ensemble forecast (lower is better).

    The energy form, with the ensemble's empirical distribution as the
    forecast (properscoring's convention, *not* the "fair" estimator):

    .. math::

        \mathrm{CRPS}(X, y) = \frac1M \sum_i |x_i - y|
            - \frac1{2M^2} \sum_{i,j} |x_i - x_j| .

    The double sum is computed in :math:`O(M \log M)` by sorting:
    for :math:`x_{(1)} \le \dots \le x_{(M)}`,
    :math:`\frac1{M^2}\sum_{i,j}|x_i - x_j| = \frac2{M^2}\sum_i (2i - M - 1)\,x_{(i)}`.
    Members are centred on the observation first (the score is
    shift-invariant), which keeps the sums small.

    Parameters
    ----------
    observations
        Outcomes, shape ``S`` (broadcast against the forecasts' other axes).
    forecasts
        Ensemble members on ``axis``; NaN members are dropped, so each
        element may have its own member count ``M``.
    axis
        The member axis of ``forecasts``.

    Returns
    -------
    The CRPS per element, shape ``S`` (a NumPy scalar for scalar input);
    NaN where the observation is NaN or every member is.

    Examples
    --------
    >>> float(crps_ensemble(2.0, [1.0, 2.0, 3.0]))  # 2/9
    0.2222222222222222
    """
    x, count = _members(forecasts, axis)
    y = _observations(observations, x)
    diff = np.sort(x - y[..., None], axis=-1)  # NaN sorts last
    np.copyto(diff, 0.0, where=np.isnan(diff))
    rank = np.arange(1, diff.shape[-1] + 1, dtype=np.float64)
    total = diff.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_abs = np.abs(diff).sum(axis=-1) / count
        half_spread = (2.0 * (diff @ rank) - (count + 1) * total) / np.square(count, dtype=np.float64)
        crps = mean_abs - half_spread
    crps = np.where(_absent(y, count), np.nan, crps)
    return _scalar_or_array(crps)


def _silverman_bandwidth(x: NDArray[np.float64], count: NDArray[np.int64]) -> NDArray[np.float64]:
    """Silverman's rule of thumb per ensemble: sample sd (ddof=1) times (4 / 3M)^(1/5).

    This is ``scipy.stats.gaussian_kde(..., bw_method="silverman")`` in one
    dimension. Ensembles of one member have no spread: 0.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(x, axis=-1) / count
        centred = x - mean[..., None]
        var = np.nansum(np.square(centred, out=centred), axis=-1) / (count - 1)
    sd = np.where(count > 1, np.sqrt(np.maximum(var, 0.0)), 0.0)
    factor = (4.0 / (3.0 * np.maximum(count, 1))) ** 0.2
    return sd * factor


def log_score(
    observations: ArrayLike,
    forecasts: ArrayLike,
    *,
    bandwidth: ArrayLike | None = None,
    min_bandwidth: float = DEFAULT_MIN_BANDWIDTH,
    axis: int = -1,
) -> NDArray[np.float64]:
    r"""Log density of the observation under a Gaussian KDE of the ensemble (higher is better).

    .. math::

        \mathrm{LogS}(X, y) = \log \frac1M \sum_i \frac1h\,\varphi\!\left(\frac{y - x_i}h\right)
            = \operatorname{logsumexp}_i\!\left(-\tfrac12 z_i^2\right) - \log M - \log h
              - \tfrac12\log 2\pi, \quad z_i = \frac{y - x_i}h,

    evaluated with ``logsumexp``, so an observation far in the tail gives a
    large negative number rather than ``-inf``. Memory is
    :math:`O(\text{elements} \times M)`; no member-by-member matrix is built.

    Parameters
    ----------
    observations
        Outcomes, shape ``S``.
    forecasts
        Ensemble members on ``axis``; NaN members are dropped.
    bandwidth
        Kernel standard deviation ``h`` in the outcome's units, a scalar or an
        array broadcasting to ``S``; must be positive. By default Silverman's
        rule of thumb per element,
        :math:`h = \hat\sigma\,(4 / 3M)^{1/5}` with :math:`\hat\sigma` the
        members' sample standard deviation (``ddof=1``) — the same bandwidth
        as ``scipy.stats.gaussian_kde(members, bw_method="silverman")``.
    min_bandwidth
        Floor applied to the rule-of-thumb bandwidth (not to an explicit
        ``bandwidth``), in the outcome's units. A degenerate ensemble (all
        members equal, or a single member) has zero spread and would give
        ``+inf`` for a hit and ``-inf`` for a miss; with the floor it scores a
        hit at :math:`-\log h_{\min} - \tfrac12\log 2\pi` (≈ 5.99 for the
        default ``1e-3``) and a miss by ``d`` at about :math:`-d^2 / 2h_{\min}^2`.
    axis
        The member axis of ``forecasts``.

    Returns
    -------
    The log score per element, shape ``S``; NaN where the observation is NaN
    or every member is.
    """
    x, count = _members(forecasts, axis)
    y = _observations(observations, x)
    if bandwidth is None:
        if not min_bandwidth > 0.0:
            raise ValueError("min_bandwidth must be positive")
        h = np.maximum(_silverman_bandwidth(x, count), min_bandwidth)
    else:
        h = np.asarray(bandwidth, dtype=np.float64)
        if np.any(~(h > 0.0)) or np.any(np.isinf(h)):
            raise ValueError("bandwidth must be positive and finite")
    h = np.broadcast_to(h, y.shape)
    z = x - y[..., None]
    z /= h[..., None]
    np.square(z, out=z)
    z *= -0.5
    np.copyto(z, -np.inf, where=np.isnan(z))
    absent = _absent(y, count)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = special.logsumexp(z, axis=-1) - np.log(count) - np.log(h) - _LOG_SQRT_2PI
    score = np.where(absent, np.nan, score)
    return _scalar_or_array(score)


def coverage(
    observations: ArrayLike,
    forecasts: ArrayLike,
    *,
    levels: Sequence[float] = (0.5, 0.8, 0.95),
    axis: int = -1,
) -> dict[float, float]:
    r"""Share of observations inside the ensemble's central intervals.

    For level :math:`\ell` the interval is
    :math:`[q_{(1-\ell)/2},\ q_{(1+\ell)/2}]`, both ends included, with
    :math:`q` the ensemble's quantiles by linear interpolation between order
    statistics (NumPy's default ``method="linear"``) over its non-NaN members.
    A calibrated ensemble covers about :math:`\ell`; an over-confident
    (too narrow) one covers less. Elements whose observation is NaN or whose
    members are all NaN are left out of the share.

    Returns
    -------
    ``{level: share}``; a share is NaN when no element can be scored.
    """
    lv = _levels(levels)
    return coverage_of_hits(coverage_hits(observations, forecasts, levels=lv, axis=axis), levels=lv)


def coverage_of_hits(inside: NDArray[np.bool_], *, levels: Sequence[float]) -> dict[float, float]:
    """``{level: share}`` from :func:`coverage_hits`' ``[element, level]`` hits; NaN shares when none was scored."""
    lv = _levels(levels)
    share = inside.mean(axis=0) if inside.shape[0] else np.full(lv.size, np.nan)
    return {float(level): float(s) for level, s in zip(lv, share, strict=True)}


def coverage_hits(
    observations: ArrayLike,
    forecasts: ArrayLike,
    *,
    levels: Sequence[float] = (0.5, 0.8, 0.95),
    axis: int = -1,
) -> NDArray[np.bool_]:
    """Whether each scored observation lies inside each central interval: ``[element, level]``, for :func:`coverage`.

    Rows are the elements that can be scored (observation and some member
    not NaN), in C order; :func:`coverage`'s share is the mean of each column.
    """
    lv = _levels(levels)
    x, count = _members(forecasts, axis)
    y = _observations(observations, x)
    probs = np.concatenate([(1.0 - lv) / 2.0, (1.0 + lv) / 2.0])
    q = _sorted_quantiles(np.sort(x, axis=-1), count, probs)
    present = ~_absent(y, count)
    y_present = y[present][:, None]
    q_present = q[present]
    return (y_present >= q_present[:, : lv.size]) & (y_present <= q_present[:, lv.size :])


def _levels(levels: Sequence[float]) -> NDArray[np.float64]:
    lv = np.asarray(levels, dtype=np.float64).reshape(-1)
    if lv.size == 0 or np.any(~((lv > 0.0) & (lv <= 1.0))):
        raise ValueError("coverage levels must lie in (0, 1]")
    return lv


def pit_values(
    observations: ArrayLike,
    forecasts: ArrayLike,
    *,
    rng: np.random.Generator | int | None = None,
    randomized: bool = True,
    axis: int = -1,
) -> NDArray[np.float64]:
    r"""Probability integral transform of each observation within its ensemble.

    With :math:`F` the ensemble's empirical CDF over its non-NaN members,
    :math:`F(y^-) = \#\{x_i < y\}/M` and :math:`F(y) = \#\{x_i \le y\}/M`, the
    randomised PIT of Czado, Gneiting & Held (2009, *Biometrics* 65) is

    .. math::

        u = F(y^-) + V\,\bigl(F(y) - F(y^-)\bigr), \qquad V \sim U(0, 1),

    which is uniform for a calibrated forecast of an integer-valued outcome
    (finishing positions), where ties between the observation and members
    are common. Where nothing ties, :math:`u = F(y)`.

    Parameters
    ----------
    rng
        Source of :math:`V`: a ``numpy.random.Generator`` or a seed. ``None``
        seeds a generator with :data:`DEFAULT_PIT_SEED`, so the default is
        reproducible. One draw is taken per element (NaN elements included),
        so results depend only on the shape and the generator.
    randomized
        ``False`` gives the mid-PIT :math:`(F(y^-) + F(y)) / 2`, the mean of
        the randomised value, and draws nothing.
    axis
        The member axis of ``forecasts``.

    Returns
    -------
    PIT values in [0, 1], shape of the observations; NaN where the
    observation is NaN or every member is.
    """
    x, count = _members(forecasts, axis)
    y = _observations(observations, x)
    below = np.count_nonzero(x < y[..., None], axis=-1)
    at_or_below = np.count_nonzero(x <= y[..., None], axis=-1)
    if randomized:
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(
            DEFAULT_PIT_SEED if rng is None else rng
        )
        v = gen.random(y.shape)
    else:
        v = np.full(y.shape, 0.5)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (below + v * (at_or_below - below)) / count
    u = np.where(_absent(y, count), np.nan, u)
    return _scalar_or_array(u)


def pit_histogram(u: ArrayLike, *, bins: int = 10) -> NDArray[np.int64]:
    """Counts of the non-NaN PIT values in ``bins`` equal-width bins of [0, 1].

    Bins are half-open ``[k/bins, (k+1)/bins)`` except the last, which
    includes 1. A calibrated forecast gives a flat histogram; an
    over-confident one a U shape (outer bins heavy); an under-confident one a
    hump.
    """
    if bins < 1:
        raise ValueError("bins must be at least 1")
    values = np.asarray(u, dtype=np.float64).reshape(-1)
    values = values[~np.isnan(values)]
    counts, _ = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return counts.astype(np.int64)


def pit_uniformity_pvalue(u: ArrayLike, *, bins: int = 10) -> float:
    r"""p-value of Pearson's chi-square test that the PIT histogram is flat.

    :math:`\chi^2 = \sum_k (n_k - n/B)^2 / (n/B)` on ``bins - 1`` degrees of
    freedom, over the non-NaN values. A small p-value is evidence of
    miscalibration; with many values, small departures become significant, so
    read it beside the histogram. NaN when there are no values.
    """
    counts = pit_histogram(u, bins=bins)
    if counts.sum() == 0:
        return float("nan")
    return float(stats.chisquare(counts).pvalue)


# --------------------------------------------------------------------------
# event probabilities
# --------------------------------------------------------------------------


def brier_score(p: ArrayLike, y: ArrayLike) -> float:
    r"""Brier score, :math:`\frac1n \sum (p - y)^2` (lower is better).

    ``p`` are forecast probabilities in [0, 1], ``y`` outcomes (1 = the event
    happened); the pair is dropped where either is NaN. NaN when none is left.
    """
    p_arr, y_arr = _finite_pairs(p, y)
    return _mean_or_nan(np.square(p_arr - y_arr))


def log_loss(p: ArrayLike, y: ArrayLike, *, eps: float = 1e-12) -> float:
    r"""Mean negative log likelihood, :math:`-\frac1n \sum [y \log p + (1 - y) \log(1 - p)]`.

    ``p`` is clipped to ``[eps, 1 - eps]`` so a confident miss costs
    :math:`-\log \varepsilon` (≈ 27.6 for the default) rather than ``inf``.
    Pairs with a NaN are dropped; NaN when none is left. Lower is better.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError("eps must lie in (0, 0.5)")
    p_arr, y_arr = _finite_pairs(p, y)
    p_arr = np.clip(p_arr, eps, 1.0 - eps)
    return _mean_or_nan(-(y_arr * np.log(p_arr) + (1.0 - y_arr) * np.log1p(-p_arr)))


@dataclass(frozen=True, eq=False)
class ReliabilityCurve:
    """A binned reliability diagram: forecast probability against observed frequency.

    Arrays are read-only, one entry per bin; ``mean_forecast`` and
    ``observed_frequency`` are NaN for empty bins.
    """

    bin_lower: NDArray[np.float64]
    bin_upper: NDArray[np.float64]
    mean_forecast: NDArray[np.float64]
    observed_frequency: NDArray[np.float64]
    count: NDArray[np.int64]

    @property
    def n(self) -> int:
        """Number of (p, y) pairs binned."""
        return int(self.count.sum())

    @property
    def expected_calibration_error(self) -> float:
        r""":math:`\sum_k \frac{n_k}n\,|\bar p_k - \bar y_k|` over non-empty bins; NaN when empty."""
        n = self.n
        if n == 0:
            return float("nan")
        filled = self.count > 0
        gap = np.abs(self.mean_forecast[filled] - self.observed_frequency[filled])
        return float(np.sum(self.count[filled] * gap) / n)

    def to_dict(self) -> dict[str, list[float | None] | list[int]]:
        """JSON-ready lists; empty bins' mean forecast and observed frequency are ``None``."""
        return {
            "bin_lower": _json_list(self.bin_lower),
            "bin_upper": _json_list(self.bin_upper),
            "mean_forecast": _json_list(self.mean_forecast),
            "observed_frequency": _json_list(self.observed_frequency),
            "count": [int(c) for c in self.count],
        }


def _bin_index(p: NDArray[np.float64], bins: int) -> NDArray[np.intp]:
    """Equal-width bin of each probability: ``[k/bins, (k+1)/bins)``, 1 in the last bin."""
    return np.minimum((p * bins).astype(np.intp), bins - 1)


def reliability_curve(p: ArrayLike, y: ArrayLike, *, bins: int = 10) -> ReliabilityCurve:
    r"""Reliability curve of probability forecasts in ``bins`` equal-width bins of [0, 1].

    Bin :math:`k` holds the pairs with :math:`p \in [k/B, (k+1)/B)` (the last
    bin also holds :math:`p = 1`) and reports the count :math:`n_k`, the mean
    forecast :math:`\bar p_k` and the observed frequency :math:`\bar y_k`.
    A calibrated forecast has :math:`\bar y_k \approx \bar p_k`. Pairs with a
    NaN are dropped; the counts sum to the number of pairs left.
    """
    if bins < 1:
        raise ValueError("bins must be at least 1")
    p_arr, y_arr = _finite_pairs(p, y)
    k = _bin_index(p_arr, bins)
    count = np.bincount(k, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_forecast = np.bincount(k, weights=p_arr, minlength=bins) / count
        observed = np.bincount(k, weights=y_arr, minlength=bins) / count
    edges = np.arange(bins + 1) / bins
    return ReliabilityCurve(
        bin_lower=_readonly(edges[:-1]),
        bin_upper=_readonly(edges[1:]),
        mean_forecast=_readonly(mean_forecast),
        observed_frequency=_readonly(observed),
        count=_readonly(count, dtype=np.int64),
    )


def expected_calibration_error(p: ArrayLike, y: ArrayLike, *, bins: int = 10) -> float:
    r"""Expected calibration error, :math:`\sum_k \frac{n_k}n\,|\bar p_k - \bar y_k|`.

    The count-weighted gap between mean forecast and observed frequency over
    the bins of :func:`reliability_curve`. 0 is perfect; with few pairs per
    bin it is biased upwards by sampling noise. NaN when there are no pairs.
    """
    return reliability_curve(p, y, bins=bins).expected_calibration_error


# --------------------------------------------------------------------------
# joint events
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class JointEventResult:
    """Calibration of pairwise co-hit forecasts for one group and one event."""

    group: str
    threshold: int
    n_pairs: int
    mean_forecast: float
    observed_frequency: float
    brier_score: float
    expected_calibration_error: float
    reliability: ReliabilityCurve

    @property
    def event(self) -> str:
        """The event's name, ``"top_{threshold}"``."""
        return f"top_{self.threshold}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN statistics (a group without pairs) become ``None``."""
        return {
            "group": self.group,
            "event": self.event,
            "threshold": self.threshold,
            "n_pairs": self.n_pairs,
            "mean_forecast": _json_float(self.mean_forecast),
            "observed_frequency": _json_float(self.observed_frequency),
            "brier_score": _json_float(self.brier_score),
            "expected_calibration_error": _json_float(self.expected_calibration_error),
            "reliability": self.reliability.to_dict(),
        }


def _race_co_hits(
    sim: NDArray[np.float64], finish: NDArray[np.float64], threshold: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Forecast and observed co-hits of every pair of entered drivers in one race.

    ``sim`` is ``[scenario, driver]`` and ``finish`` ``[driver]``, restricted
    to the entered drivers. With ``H`` the scenario-hit indicator and ``V``
    the simulated indicator, the forecast for pair (i, j) is
    ``(HᵀH)_ij / (VᵀV)_ij``: the share of the scenarios simulating both in
    which both finish ≤ t. Upper triangle only.

    The counts are integer products: exact, and NumPy computes them without
    BLAS, whose thread pool costs more than these small products (measured on
    2 busy cores: 40 ms a race in float64 through OpenBLAS, 2 ms in int32).
    """
    simulated = (~np.isnan(sim)).astype(np.int32)
    hit = (sim <= threshold).astype(np.int32)
    both_hit = hit.T @ hit
    both_simulated = simulated.T @ simulated
    i, j = np.triu_indices(finish.size, k=1)
    keep = both_simulated[i, j] > 0
    i, j = i[keep], j[keep]
    forecast = both_hit[i, j] / both_simulated[i, j]
    finished = finish <= threshold
    observed = (finished[i] & finished[j]).astype(np.float64)
    return forecast, observed


class RaceCache:
    """What was computed from one race's arrays, kept under a SHA-256 digest of exactly those arrays.

    A backfill's windows overlap: window after window scores the same races.
    A result is kept under :meth:`digest` of the arrays it is computed from
    (their bytes, shapes and dtypes) and a tag (which computation, its
    parameters), so a hit is those arrays' result, whatever dataset, window or
    job they came from. The newest ``max_entries`` results are kept; arrays
    kept are read-only, shared by every later caller.
    """

    def __init__(self, max_entries: int = 2048) -> None:
        self.max_entries = max_entries
        self._kept: OrderedDict[tuple[bytes, Any], Any] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def digest(*arrays: NDArray[Any]) -> bytes:
        """SHA-256 of the arrays' shapes, dtypes and bytes.

        A job hashes each race of its window twice (about 150 kB a race);
        OpenSSL's SHA-256 runs on the CPU's SHA extensions where BLAKE2b has
        none: 60 digests of 147 kB took 5.3 ms against 9.1 ms, and a warm
        job's raw-forecast scores 0.0092 against 0.0118 CPU s (the 12 windows
        of a 3-season backfill, median of 7 interleaved; load 2.1).
        """
        h = hashlib.sha256()
        for a in arrays:
            h.update(repr((a.shape, a.dtype.str)).encode())
            h.update(np.ascontiguousarray(a).data)
        return h.digest()

    def get(self, digest: bytes, tag: Any, compute: Callable[[], T]) -> T:
        """The result kept under (``digest``, ``tag``), else ``compute()``'s, kept."""
        with self._lock:
            found = self._kept.get((digest, tag))
            if found is not None:
                self._kept.move_to_end((digest, tag))
                return found
        found = compute()
        for a in found if isinstance(found, tuple) else (found,):
            if isinstance(a, np.ndarray):
                a.setflags(write=False)
        with self._lock:
            self._kept[(digest, tag)] = found
            while len(self._kept) > self.max_entries:
                self._kept.popitem(last=False)
        return found


def joint_event_validation(
    sim_position: ArrayLike,
    finish_position: ArrayLike,
    *,
    thresholds: Sequence[int],
    groups: ArrayLike,
    bins: int = 10,
    cache: RaceCache | None = None,
) -> list[JointEventResult]:
    r"""Calibration of the forecast probability that *two* drivers both finish top-t.

    For every race, every unordered pair (i, j) of entered drivers and every
    threshold t:

    - forecast :math:`\hat p_{ij} = \frac1M \sum_s 1[s_i \le t]\,1[s_j \le t]`,
      the share of scenarios in which both finish ≤ t, computed for all pairs
      at once as :math:`H^\top H / M` with :math:`H` the scenario-by-driver
      hit indicator (scenarios where a driver is NaN are left out of that
      pair's share);
    - observed :math:`o_{ij} = 1[f_i \le t]\,1[f_j \le t]`.

    Pairs are pooled by the races' group (the track archetype) and scored
    with :func:`brier_score` and :func:`reliability_curve`. A lineup
    optimizer that stacks correlated drivers relies on these co-hit
    probabilities, which per-driver calibration does not check.

    Parameters
    ----------
    sim_position
        Simulated finishing positions ``[race, scenario, driver]``.
    finish_position
        Actual finishing positions ``[race, driver]``; NaN = not entered.
        A driver takes part in a race's pairs when his finish is known and he
        has at least one simulated scenario.
    thresholds
        Event thresholds t (positive integers), reported as ``"top_{t}"``.
    groups
        One label per race; results come per label, in sorted order.
    bins
        Number of equal-width bins of the reliability curves.
    cache
        Where each race's pairs are kept for later calls (:class:`RaceCache`);
        the results are the same with or without.

    Returns
    -------
    One :class:`JointEventResult` per (group, threshold), grouped by group
    then in the order of ``thresholds``.
    """
    sim = np.asarray(sim_position, dtype=np.float64)
    finish = np.asarray(finish_position, dtype=np.float64)
    labels = np.asarray(groups)
    if sim.ndim != 3 or finish.ndim != 2:
        raise ValueError("sim_position must be [race, scenario, driver] and finish_position [race, driver]")
    if finish.shape != (sim.shape[0], sim.shape[2]):
        raise ValueError(
            f"finish_position {finish.shape} does not match sim_position {sim.shape} on (race, driver)"
        )
    if labels.shape != (sim.shape[0],):
        raise ValueError(f"groups needs one label per race ({sim.shape[0]}), got shape {labels.shape}")
    ts = [int(t) for t in thresholds]
    if any(t < 1 for t in ts):
        raise ValueError("thresholds must be positive integers")

    entered = ~np.isnan(finish) & np.any(~np.isnan(sim), axis=1)
    pairs: dict[tuple[Any, int], tuple[list[NDArray[np.float64]], list[NDArray[np.float64]]]] = {
        (g, t): ([], []) for g in np.unique(labels) for t in ts
    }
    for race in range(sim.shape[0]):
        drivers = entered[race]
        if np.count_nonzero(drivers) < 2:
            continue
        race_sim, race_finish = sim[race][:, drivers], finish[race, drivers]
        digest = cache.digest(race_sim, race_finish) if cache is not None else b""
        for t in ts:
            compute = functools.partial(_race_co_hits, race_sim, race_finish, t)
            forecast, observed = cache.get(digest, ("co_hits", t), compute) if cache is not None else compute()
            bucket = pairs[(labels[race], t)]
            bucket[0].append(forecast)
            bucket[1].append(observed)

    results = []
    for (group, t), (forecasts, observations) in pairs.items():
        p = np.concatenate(forecasts) if forecasts else np.empty(0)
        y = np.concatenate(observations) if observations else np.empty(0)
        curve = reliability_curve(p, y, bins=bins)
        results.append(
            JointEventResult(
                group=str(group),
                threshold=t,
                n_pairs=int(p.size),
                mean_forecast=_mean_or_nan(p),
                observed_frequency=_mean_or_nan(y),
                brier_score=brier_score(p, y),
                expected_calibration_error=curve.expected_calibration_error,
                reliability=curve,
            )
        )
    return results

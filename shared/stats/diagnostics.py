"""MCMC diagnostics and parameter summaries, from an InferenceData.

Layers as in arviz-stats: kernels (rank-normalised split R-hat, bulk and
tail ESS, HDI; ArviZ's BFMI) → this module's records for the summary. It
takes any InferenceData with the calq posterior layout, so it is tested on
posteriors built from seeded random arrays, with no sampler in the loop.

R-hat, ESS and HDI are ArviZ's algorithms (Vehtari et al. 2021; ArviZ
0.23's ``_rhat_rank``, ``_ess_bulk``, ``_ess_tail``, ``_hdi``) step for step,
computed for every scalar parameter of a run at once, as rows of one
``(parameter, chain, draw)`` array: ``az.rhat`` and ``az.ess`` rank, z-score
and transform one parameter at a time through ``xarray.apply_ufunc``, which
cost a warm backfill job more than its NetCDF write. Only Geyer's truncation
of the autocorrelation sum stays a loop per parameter, over precomputed
autocorrelations. Tested equal to ArviZ's to float tolerance (tests/test_diagnostics.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import arviz as az
import numpy as np
from scipy import fft, special

from shared.contract.domain import PARAMETERS
from shared.contract.summary import Diagnostics, ParameterSummary

HDI_PROB = 0.94
SUMMARISED = PARAMETERS


@dataclass(frozen=True)
class Convergence:
    """R-hat and bulk ESS of every parameter of one run, and its divergent transitions.

    The arrays are in each parameter's own dimension order (chain and draw
    reduced), so they serve any InferenceData of the same draws, whatever its
    coordinates: computed once per sampler run, they are both the check between
    remedy attempts and, for the last run, the summary's R-hat and bulk ESS.
    """

    r_hat: dict[str, np.ndarray]
    ess_bulk: dict[str, np.ndarray]
    divergences: int

    def worst(self) -> tuple[float, float, int]:
        """(max R-hat, min bulk ESS, divergences): what the convergence criteria read."""
        max_rhat = _worst(float(v) for values in self.r_hat.values() for v in np.ravel(values))
        min_ess = min((float(v) for values in self.ess_bulk.values() for v in np.ravel(values)), default=math.nan)
        return max_rhat, min_ess, self.divergences


def convergence(idata: az.InferenceData, *, var_names=SUMMARISED) -> Convergence:
    """Rank-normalised split R-hat and bulk ESS of every parameter in ``var_names``, and the divergences."""
    post = idata.posterior
    return convergence_of(
        {name: post[name].values for name in var_names}, diverging=idata.sample_stats["diverging"].values
    )


def convergence_of(draws: Mapping[str, np.ndarray], *, diverging: np.ndarray) -> Convergence:
    """:func:`convergence` of raw draws: each array ``(chain, draw, ...)``, and the divergence flags."""
    rows, unstack = _rows(draws)
    rhat, ess = rank_normalised(rows)
    return Convergence(r_hat=unstack(rhat), ess_bulk=unstack(ess), divergences=int(np.sum(diverging)))


def _rows(draws: Mapping[str, np.ndarray]):
    """Every scalar parameter as a row of one ``(parameter, chain, draw)`` array, and its inverse.

    The draws keep their dtype (float32 from the sampler): ArviZ folds and
    takes quantiles in it. The inverse turns one value per row back into
    ``{name: array of the parameter's own shape}``.
    """
    shapes = {name: np.shape(values)[2:] for name, values in draws.items()}
    dtype = np.result_type(*(np.asarray(values).dtype for values in draws.values()), np.float32)
    rows = np.concatenate([
        np.moveaxis(np.asarray(values, dtype=dtype).reshape(*np.shape(values)[:2], -1), -1, 0)
        for values in draws.values()
    ])

    def unstack(values: np.ndarray) -> dict[str, np.ndarray]:
        out, start = {}, 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            out[name] = values[start : start + size].reshape(shape)
            start += size
        return out

    return np.ascontiguousarray(rows), unstack


def rank_normalised(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank-normalised split R-hat (the larger of bulk and folded) and bulk ESS of each row of ``x``.

    ``x`` is ``(parameter, chain, draw)``. The bulk ESS is the ESS of the
    rank-normalised split chains that the bulk R-hat reads. NaN for a row
    holding NaN, or with fewer than 4 draws (R-hat: or 2 chains), as ArviZ.
    """
    rhat, ess = np.full(x.shape[0], np.nan), np.full(x.shape[0], np.nan)
    ok = _usable(x, min_chains=1)
    if ok.any():
        split = _split_chains(x[ok])
        z = _z_scale(split)
        ess[ok] = _ess(z)
        if x.shape[1] >= 2:
            folded = np.abs(split - np.median(split.reshape(split.shape[0], -1), axis=1)[:, None, None])
            rhat[ok] = np.maximum(_rhat(z), _rhat(_z_scale(folded)))
    return rhat, ess


def ess_tail(
    x: np.ndarray, *, prob: tuple[float, float] = (0.05, 0.95), ordered: np.ndarray | None = None
) -> np.ndarray:
    """Tail ESS of each row of ``x``: the smaller ESS of the indicators of the 5 % and 95 % quantiles.

    ``ordered``: ``x``'s :func:`sorted_rows`, where the caller has them (the
    HDI sorts the same draws): the quantiles are read from them
    (:func:`_type7_quantiles`) instead of ``scipy.stats.mstats.mquantiles``
    sorting each row again in a Python loop. HDI and tail ESS of a warm job's
    48 parameters × 4 × 1,000 draws, CPU ms, median of 9 interleaved over 12
    jobs: 16.8 → 14.3 (load 2.5). (One :func:`_ess` over both quantiles'
    indicators, twice the rows, measured slower: 15.8.)
    """
    out = np.full(x.shape[0], np.nan)
    ok = _usable(x, min_chains=1)
    if ok.any():
        y = x[ok]
        quantiles = _type7_quantiles(sorted_rows(y) if ordered is None else ordered[ok], prob)
        low, high = (_ess(_split_chains((y <= q[:, None, None]).astype(np.float64))) for q in quantiles.T)
        out[ok] = np.minimum(low, high)
    return out


def hdi(x: np.ndarray, *, prob: float = HDI_PROB, ordered: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The narrowest interval holding ``floor(prob · n)`` + 1 of each row's ``n`` draws: (low, high).

    ``ordered``: ``x``'s :func:`sorted_rows`, where the caller has them.
    """
    ordered = sorted_rows(x) if ordered is None else ordered
    n = ordered.shape[1]
    inc = int(np.floor(prob * n))
    width = np.subtract(ordered[:, inc:], ordered[:, : n - inc], dtype=np.float64)
    first = np.argmin(width, axis=1)
    index = np.arange(ordered.shape[0])
    return ordered[index, first], ordered[index, first + inc]


def sorted_rows(x: np.ndarray) -> np.ndarray:
    """Each row's draws of ``x`` ``(parameter, chain, draw)``, chains pooled and sorted: ``(parameter, chain · draw)``."""
    return np.sort(x.reshape(x.shape[0], -1), axis=1)


def _type7_quantiles(ordered: np.ndarray, prob) -> np.ndarray:
    """R's type 7 quantiles of each sorted row, ``(row, len(prob))``: ``mquantiles(alphap=1, betap=1)``'s arithmetic.

    aleph = n·p + m with m = 1 − p; k = ⌊aleph⌋ within [1, n − 1];
    γ = aleph − k within [0, 1]; the quantile (1 − γ)·x₍ₖ₎ + γ·x₍ₖ₊₁₎.
    """
    n = ordered.shape[1]
    p = np.asarray(prob, dtype=np.float64)
    aleph = n * p + (1.0 - p)
    k = np.floor(aleph.clip(1, n - 1)).astype(int)
    gamma = (aleph - k).clip(0, 1)
    return (1.0 - gamma) * ordered[:, k - 1] + gamma * ordered[:, k]


def _usable(x: np.ndarray, *, min_chains: int) -> np.ndarray:
    """Rows ArviZ computes a value for: no NaN, at least ``min_chains`` chains and 4 draws."""
    enough = x.shape[1] >= min_chains and x.shape[2] >= 4
    return ~np.isnan(x).any(axis=(1, 2)) & enough


def _split_chains(x: np.ndarray) -> np.ndarray:
    """Each chain's first and last halves as two chains: ``(parameter, 2·chain, draw // 2)``."""
    half = x.shape[2] // 2
    return np.concatenate([x[:, :, :half], x[:, :, x.shape[2] - half :]], axis=1)


def _z_scale(x: np.ndarray) -> np.ndarray:
    """Each row's draws replaced by the normal quantile of their Blom-offset average rank, (r − 3/8) / (n + 1/4).

    A draw tied with none has its own position's rank, whose quantile is the
    same in every row: those come from one table of n quantiles, and only
    tied draws (a few hundred of a job's 48 × 4,000) go through ``ndtri``
    themselves. The same numbers: the same ``ndtri`` of the same values.
    Measured on 14 runs of warm backfill jobs (up to 48 parameters × 8 split
    chains × 500 draws), CPU ms a run, median of 9 interleaved (load 2.3):
    10.6 → 7.8; :func:`convergence_of` 33.2 → 26.7. The tied draws' ranks
    are then found from the tied draws alone (:func:`_tied_ranks`), not from
    a rank for every draw: bulk and folded z-scores of 11 warm jobs, CPU ms a
    job, median of 9 interleaved: 9.25 → 6.17 (load 3.4).
    """
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]

    def quantile(rank):
        return special.ndtri((rank - 3 / 8) / (n - 2 * 3 / 8 + 1))

    order, ranks = _sorted_ranks(flat, untied=quantile(np.arange(1.0, n + 1)), tied=quantile)
    out = np.empty(flat.shape)
    np.put_along_axis(out, order, ranks, axis=1)
    return out.reshape(x.shape)


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks along each row of the 2-D ``a``, tied values sharing their mean rank (``scipy.stats.rankdata``'s "average")."""
    order, ranks = _sorted_ranks(a, untied=np.arange(1.0, a.shape[1] + 1), tied=lambda rank: rank)
    out = np.empty(a.shape)
    np.put_along_axis(out, order, ranks, axis=1)
    return out


def _sorted_ranks(a: np.ndarray, *, untied: np.ndarray, tied) -> tuple[np.ndarray, np.ndarray]:
    """Each row's sorting order and, in that order, a function f of each draw's average rank.

    ``untied[j]`` is f(j + 1), the value at position j of a draw tied with
    none; ``tied`` is f itself, applied to the tied draws' average ranks
    (:func:`_tied_ranks`) only.
    """
    order = np.argsort(a, axis=1)
    rows, positions, rank = _tied_ranks(np.take_along_axis(a, order, axis=1))
    out = np.broadcast_to(untied, a.shape).copy()
    out[rows, positions] = tied(rank)
    return order, out


def _tied_ranks(ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, position, average rank) of every draw equal to a neighbour in the sorted rows ``ordered``.

    A run of equal draws at 0-based positions first … first + length − 1
    shares the rank first + (length + 1) / 2.
    """
    same = ordered[:, 1:] == ordered[:, :-1]
    tied = np.zeros(ordered.shape, bool)
    tied[:, 1:] = same
    tied[:, :-1] |= same
    rows, positions = np.nonzero(tied)
    starts = (positions == 0) | ~same[rows, positions - 1]  # not equal to the draw before it: a run begins
    run = np.cumsum(starts) - 1
    rank = positions[starts] + (np.bincount(run) + 1) / 2.0
    return rows, positions, rank[run]


def _rhat(x: np.ndarray) -> np.ndarray:
    """Gelman–Rubin R-hat of each row, √((B/W + n − 1) / n), B = n·var(chain means), W = mean chain variance."""
    n = x.shape[2]
    between = n * np.var(np.mean(x, axis=2), axis=1, ddof=1)
    within = np.mean(np.var(x, axis=2, ddof=1), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant parameter's R-hat is NaN, as ArviZ's
        return np.sqrt((between / within + n - 1) / n)


def _ess(x: np.ndarray) -> np.ndarray:
    """ESS of each row of ``x`` ``(parameter, chain, draw)`` from its autocorrelations (Geyer's initial sequences).

    A constant row counts every draw (as ArviZ).
    """
    rows, chains, n = x.shape
    out = np.full(rows, float(chains * n))
    varies = (x.max(axis=(1, 2)) - x.min(axis=(1, 2))) >= np.finfo(float).resolution
    if not varies.any():
        return out
    y = x[varies]
    centred = y - y.mean(axis=2, keepdims=True)
    m = fft.next_fast_len(2 * n)
    spectrum = np.fft.rfft(centred, n=m, axis=2)
    spectrum *= np.conjugate(spectrum)
    acov = np.fft.irfft(spectrum, n=m, axis=2)[..., :n] / n
    mean_var = np.mean(acov[:, :, 0], axis=1) * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if chains > 1:
        var_plus += np.var(y.mean(axis=2), axis=1, ddof=1)
    rho = 1.0 - (mean_var[:, None] - np.mean(acov, axis=1)) / var_plus[:, None]
    out[varies] = [_geyer_ess(r, chains * n) for r in rho]
    return out


def _geyer_ess(rho: np.ndarray, size: int) -> float:
    """``size`` / τ, τ the autocorrelation time summed to Geyer's initial positive, then monotone, sequence."""
    n = rho.size
    kept = np.zeros(n)
    even, odd = 1.0, float(rho[1])
    kept[0], kept[1] = even, odd
    t = 1
    while t < n - 3 and even + odd > 0.0:
        even, odd = float(rho[t + 1]), float(rho[t + 2])
        if even + odd >= 0:
            kept[t + 1], kept[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:
        kept[max_t + 1] = even
    t = 1
    while t <= max_t - 2:
        if kept[t + 1] + kept[t + 2] > kept[t - 1] + kept[t]:
            kept[t + 1] = kept[t + 2] = (kept[t - 1] + kept[t]) / 2.0
        t += 2
    tau = -1.0 + 2.0 * np.sum(kept[: max_t + 1]) + np.sum(kept[max_t + 1 : max_t + 2])
    if np.isnan(kept).any():
        return math.nan
    return size / max(tau, 1 / np.log10(size))


def parameter_summaries(
    idata: az.InferenceData, *, var_names=SUMMARISED, known: Convergence | None = None
) -> list[ParameterSummary]:
    """Mean, sd, 94 % HDI, R-hat and bulk/tail ESS of every scalar parameter.

    ``known``: the same draws' :func:`convergence`, whose R-hat and bulk ESS
    are taken rather than computed again.
    """
    post = idata.posterior
    rows, unstack = _rows({name: post[name].values for name in var_names})
    ordered = sorted_rows(rows)  # for the HDI and the tail ESS's quantiles
    low, high = hdi(rows, ordered=ordered)
    if known is None:
        rhat, ess = rank_normalised(rows)
        known = Convergence(r_hat=unstack(rhat), ess_bulk=unstack(ess), divergences=0)
    by_row = {"hdi_low": unstack(low), "hdi_high": unstack(high), "ess_tail": unstack(ess_tail(rows, ordered=ordered))}
    records = []
    for name in var_names:
        variable = post[name]
        dims = [d for d in variable.dims if d not in ("chain", "draw")]
        labels = [[str(v) for v in post[d].values] for d in dims]
        values = _moments(variable)
        values |= {key: arrays[name] for key, arrays in by_row.items()}
        values |= {"r_hat": known.r_hat[name], "ess_bulk": known.ess_bulk[name]}
        for index in np.ndindex(*[len(lab) for lab in labels]):
            coords = dict(zip(dims, (lab[i] for lab, i in zip(labels, index))))
            records.append(
                ParameterSummary(
                    name=f"{name}[{', '.join(coords.values())}]",
                    parameter=name,
                    event=coords["event"],
                    archetype=coords.get("archetype"),
                    track=coords.get("track"),
                    **{key: float(array[index]) for key, array in values.items()},
                )
            )
    return records


def _moments(variable) -> dict[str, np.ndarray]:
    """The posterior mean and sd (ddof 1) of each scalar of ``variable`` ``(chain, draw, ...)``.

    NaN-skipping, as xarray's ``mean`` and ``std`` over chain and draw, which
    call the same ``numpy.nanmean`` and ``numpy.nanstd`` on the same axes:
    the same numbers without a Dataset reduced, and transposed, per parameter.
    """
    return {"mean": np.nanmean(variable.values, axis=(0, 1)), "sd": np.nanstd(variable.values, axis=(0, 1), ddof=1)}


def sampler_diagnostics(
    idata: az.InferenceData, parameters: list[ParameterSummary],
    *,
    sample_seconds: float,
    max_tree_depth: int,
) -> Diagnostics:
    """Run-level diagnostics: worst R-hat and ESS, divergences, BFMI, tree depth."""
    stats = idata.sample_stats
    chains, draws = stats.sizes["chain"], stats.sizes["draw"]
    bfmi = [float(b) for b in np.atleast_1d(az.bfmi(idata))] if draws > 1 else [math.nan] * chains
    min_ess_bulk = min((p.ess_bulk for p in parameters), default=math.nan)
    return Diagnostics(
        chains=chains,
        draws=draws,
        max_rhat=_worst(p.r_hat for p in parameters),
        min_ess_bulk=min_ess_bulk,
        min_ess_tail=min((p.ess_tail for p in parameters), default=math.nan),
        divergences=int(stats["diverging"].sum()),
        bfmi=bfmi,
        min_bfmi=min(bfmi),
        max_tree_depth=max_tree_depth,
        tree_depth_hits=int(stats["reached_max_treedepth"].sum()),
        mean_leapfrog_steps=float(stats["n_steps"].mean()),
        ess_bulk_per_second=min_ess_bulk / sample_seconds if sample_seconds > 0 else math.nan,
    )


def _worst(values) -> float:
    """The largest R-hat; NaN (a constant chain) counts as the worst."""
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.inf
    return max(values, default=math.nan)

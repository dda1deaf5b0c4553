"""The forecast-quality sections of a summary: events, points ensemble, joint events.

Each function takes the data a job fitted and returns the summary's records;
the scoring kernels live in :mod:`shared.stats.metrics`. :func:`forecast_scores`
is the one scoring of a set of event probabilities (Brier, log loss, ECE,
reliability), in-sample here and out-of-sample in :mod:`shared.stats.oos`.
:func:`raw_forecast_scores` scores what the fit never touches, the raw
ensemble and the joint events: the jobs layer calls it, not the fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from shared.contract.domain import event_threshold
from shared.contract.summary import EnsembleScores, EventCalibration, ForecastScores
from shared.data.dataset import EventRows
from shared.stats import metrics

COVERAGE_LEVELS = (0.5, 0.8, 0.95)


def forecast_scores(p: np.ndarray, y: np.ndarray) -> ForecastScores:
    """Brier score, log loss, ECE and the 10-bin reliability curve of probabilities ``p`` against outcomes ``y``."""
    curve = metrics.reliability_curve(p, y)
    return ForecastScores(
        brier=metrics.brier_score(p, y),
        log_loss=metrics.log_loss(p, y),
        ece=curve.expected_calibration_error,
        reliability=curve.to_dict(),
    )


def event_calibration(rows: EventRows, q_mean: np.ndarray) -> list[EventCalibration]:
    """Raw forecasts p against calibrated q, per archetype and event.

    ``q_mean`` is the posterior-mean calibrated probability of each row. The
    comparison is in-sample: it shows how much the model moved the forecasts,
    not a held-out score (a backfill gives the out-of-sample view).
    """
    row_archetype = np.asarray(rows.track_archetype)[rows.track]
    records = []
    for a, archetype in enumerate(rows.archetypes):
        for e, event in enumerate(rows.events):
            sel = (row_archetype == a) & (rows.event == e)
            if not sel.any():
                continue
            y = rows.y[sel].astype(np.float64)
            records.append(
                EventCalibration(
                    event=event,
                    archetype=archetype,
                    n=int(sel.sum()),
                    base_rate=float(y.mean()),
                    raw=forecast_scores(rows.p[sel], y),
                    calibrated=forecast_scores(q_mean[sel], y),
                )
            )
    return records


def ensemble_scores(ds: xr.Dataset, archetypes: Sequence[str]) -> list[EnsembleScores]:
    """CRPS, log score and interval coverage of ``sim_points`` against ``points``.

    Empty when the dataset carries no points. Each race's per-driver scores
    are computed once per process (:data:`_RACES`): the same numbers as
    scoring all races at once, cell by cell, pooled in the same order.
    """
    if "sim_points" not in ds or "points" not in ds:
        return []
    records = []
    for archetype in archetypes:
        sub = ds.sel(race=ds["archetype"].values == archetype)
        if sub.sizes["race"] == 0:
            continue
        # members on the last axis: [race, driver, scenario]
        members = sub["sim_points"].transpose("race", "driver", "scenario").values
        observed = sub["points"].transpose("race", "driver").values
        n = int(np.isfinite(observed).sum())
        scored = [_race_ensemble(observed[r : r + 1], members[r : r + 1]) for r in range(observed.shape[0])]
        crps, log, inside = (np.concatenate(part) for part in zip(*scored, strict=True))
        records.append(
            EnsembleScores(
                archetype=archetype,
                n=n,
                crps=float(np.nanmean(crps)),
                log_score=float(np.nanmean(log)),
                coverage={f"{level:g}": value for level, value in
                          metrics.coverage_of_hits(inside, levels=COVERAGE_LEVELS).items()},
            )
        )
    return records


def _race_ensemble(observed: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One race's CRPS and log score per driver, and its coverage hits: ``[1, driver]``, ``[1, driver]``, ``[n, level]``."""
    def score():
        return (metrics.crps_ensemble(observed, members), metrics.log_score(observed, members),
                metrics.coverage_hits(observed, members, levels=COVERAGE_LEVELS))

    return _RACES.get(_RACES.digest(observed, members), "ensemble", score)


#: Each race's scores (ensemble, co-hit pairs), for the next job of the process that scores it (a backfill's next window).
_RACES = metrics.RaceCache()


def joint_events(ds: xr.Dataset, events: Sequence[str]) -> list[dict]:
    """Pairwise co-hit calibration per archetype and event (see :func:`metrics.joint_event_validation`)."""
    results = metrics.joint_event_validation(
        ds["sim_position"].transpose("race", "scenario", "driver").values,
        ds["finish_position"].transpose("race", "driver").values,
        thresholds=[event_threshold(e) for e in events],
        groups=ds["archetype"].values.astype(str),
        cache=_RACES,
    )
    return [r.to_dict() for r in results]


@dataclass(frozen=True)
class RawForecastScores:
    """The summary's sections on the raw forecasts alone: the points ensemble and the joint events."""

    ensemble: list[EnsembleScores]
    joint_events: list[dict[str, Any]]


def raw_forecast_scores(ds: xr.Dataset, *, archetypes: Sequence[str], events: Sequence[str]) -> RawForecastScores:
    """:func:`ensemble_scores` and :func:`joint_events` of the races ``ds`` holds (a job's window)."""
    return RawForecastScores(ensemble=ensemble_scores(ds, archetypes), joint_events=joint_events(ds, events))

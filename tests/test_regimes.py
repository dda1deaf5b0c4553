"""Slow: the default job converges on every harder regime (after remedies) and recovers its truth.

Each regime of :mod:`shared.data.regimes` is simulated once and fitted with
the default sampler settings (4 chains × (500 warmup + 1000 draws)) and the
default convergence criteria, remedies included. Recovery is checked as in
tests/test_statistics.py: each α and β within its 94 % interval or 3 sd of
the pseudo-true value — for the archetype, and for each track.

One documented exception: in ``track_outliers`` the two outlier tracks are
not checked at the track level. Their β differs from the archetype's by a
factor ~1.6, far outside the track-spread prior ``sigma_log_beta ~
LogNormal(log 0.09, 0.6)`` (97.5 % below a factor 1.34); four races do not overcome
it, and the posterior shrinks them to their archetype (measured: Kansas
top_5 β 0.70 ± 0.14 against a truth of 1.51). The priors stay as documented
in shared.fit.model; the archetype is still recovered.
"""

from __future__ import annotations

import numpy as np
import pytest

from shared.contract.job import CalibrationJob
from shared.data.regimes import REGIMES, synthesize_regime
from shared.data.synth import truth
from shared.fit.calibrate import calibrate
from shared.jobs.summary import summarize

pytestmark = pytest.mark.slow

#: (regime, track) pairs whose track-level recovery the prior rules out (module docstring).
SHRUNK_BY_THE_PRIOR = {("track_outliers", "Las Vegas"), ("track_outliers", "Kansas")}


@pytest.mark.parametrize("name", list(REGIMES))
def test_default_job_converges_and_recovers_the_truth(name):
    r = REGIMES[name]
    ds = synthesize_regime(name, seed=0, scenarios=500)
    job = CalibrationJob(
        archetype=r.archetype, dataset_uri=f"file:///data/{name}.nc", dataset_sha256="0" * 64, events=r.events
    )
    idata, fit = calibrate(ds, job)
    summary = summarize(fit)
    attempts = [(a.target_accept_prob, a.warmup, a.samples, a.divergences, round(a.max_rhat, 4)) for a in summary.attempts]
    assert summary.converged, (summary.convergence_issues, attempts)
    assert summary.attempts[-1].issues == []

    known = truth(ds)
    targets = []  # (parameter, event, dimension, coordinate, true value)
    for event in r.events:
        for parameter, key in (("alpha", "alpha"), ("beta", "beta")):
            targets.append((f"{parameter}_arch", event, "archetype", r.archetype, known["archetypes"][r.archetype][event][key]))
            for track, fits in known["tracks"][r.archetype].items():
                if (name, track) not in SHRUNK_BY_THE_PRIOR:
                    targets.append((f"{parameter}_track", event, "track", track, fits[event][key]))
    misses = []
    for parameter, event, dim, coord, target in targets:
        draws = idata.posterior[parameter].sel(event=event, **{dim: coord}).values.ravel()
        low, high = np.quantile(draws, [0.03, 0.97])
        z = (draws.mean() - target) / draws.std()
        if not (low <= target <= high or abs(z) <= 3):
            misses.append(f"{parameter}[{event}, {coord}] = {draws.mean():.2f} ± {draws.std():.2f}, truth {target:.2f}")
    assert not misses, misses

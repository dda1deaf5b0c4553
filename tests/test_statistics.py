"""Slow statistical checks of the engine: recovery of known truth, simulation-based calibration."""

from __future__ import annotations

import jax
import numpy as np
import numpyro
import pytest
from scipy import stats

from shared.contract.job import CalibrationJob
from shared.data.synth import synthesize, truth
from shared.fit.calibrate import calibrate
from shared.fit.model import ModelShape, calibration_model, model_data
from shared.fit.sampler import Bucket, chain_devices, chunk_length, sampler_for
from shared.jobs.summary import summarize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def five_seasons():
    return synthesize(seasons=5, scenarios=1000, seed=0, first_season=2020)  # races dated in the past


@pytest.fixture(scope="module")
def fit_all(five_seasons):
    job = CalibrationJob(
        archetype="all", dataset_uri="file:///data/five.nc", dataset_sha256="0" * 64,
        events=("top_1", "top_5", "top_10"),
    )  # default sampler settings: 4 chains × (500 warmup + 1000 draws)
    idata, fit = calibrate(five_seasons, job)
    return idata, summarize(fit)


def test_posterior_recovers_each_archetypes_pseudo_true_calibration(five_seasons, fit_all):
    idata, summary = fit_all
    known = truth(five_seasons)["archetypes"]
    misses = []
    for archetype in summary.archetypes:
        for event in summary.events:
            for name, key in (("alpha_arch", "alpha"), ("beta_arch", "beta")):
                draws = idata.posterior[name].sel(event=event, archetype=archetype).values.ravel()
                target = known[archetype][event][key]
                low, high = np.quantile(draws, [0.05, 0.95])
                z = (draws.mean() - target) / draws.std()
                if not (low <= target <= high or abs(z) <= 3):
                    misses.append(f"{name}[{event}, {archetype}] = {draws.mean():.2f} ± {draws.std():.2f}, truth {target:.2f}")
    assert not misses, misses


def test_default_settings_converge_without_divergences(fit_all):
    _, summary = fit_all
    d = summary.diagnostics
    assert d.max_rhat <= 1.01, summary.convergence_issues
    assert d.divergences == 0
    assert summary.converged


def test_calibration_improves_the_miscalibrated_archetypes(fit_all):
    _, summary = fit_all
    for c in summary.calibration:
        if c.event == "top_1":
            continue
        if c.archetype in ("superspeedway", "short_track"):
            assert c.calibrated.ece < c.raw.ece, (c.archetype, c.event)
            assert c.calibrated.brier < c.raw.brier + 0.002, (c.archetype, c.event)  # never materially worse
        if c.archetype == "superspeedway":  # strongly over-confident: a clear gain in every score
            assert c.calibrated.log_loss < c.raw.log_loss and c.calibrated.brier < c.raw.brier


def test_superspeedway_forecasts_are_found_over_confident(fit_all):
    _, summary = fit_all
    for event in ("top_5", "top_10"):
        beta = summary.parameter("beta_arch", event, archetype="superspeedway")
        assert beta.hdi_high < 1.0


# -- simulation-based calibration ------------------------------------------------------

SBC_REPLICATES = 40
SBC_ROWS, SBC_TRACKS = 600, 3
SBC_PARAMS = {"alpha_arch": (0, 0), "beta_arch": (0, 0), "alpha_track": (0, 1), "beta_track": (0, 2)}


def _simulate(shape: ModelShape, key, x, track):
    """Parameters from the prior and outcomes from the model, by running it unobserved."""
    data = model_data(
        x=x, y=None, event=np.zeros_like(track), track=track, mask=np.ones(x.shape, bool),
        track_archetype=np.zeros(shape.n_tracks, np.int32), track_real=np.arange(shape.n_tracks) < SBC_TRACKS,
        n_events=1,
    )
    tr = numpyro.handlers.trace(numpyro.handlers.seed(calibration_model, key)).get_trace(data, shape=shape)
    return {name: np.asarray(site["value"]) for name, site in tr.items()}


def test_simulation_based_calibration_ranks_are_uniform():
    """Talts et al. (2018): the rank of each prior draw among its posterior draws is uniform."""
    shape = ModelShape(n_events=1, n_archetypes=1, n_tracks=4, centered=False)
    bucket = Bucket(shape=shape, n_rows=1024, chains=2, warmup=200, chunk=chunk_length(200, 400),
                    devices=chain_devices(2))
    sampler = sampler_for(bucket)
    rng = np.random.default_rng(11)
    ranks = {name: [] for name in SBC_PARAMS}
    for r in range(SBC_REPLICATES):
        p = rng.beta(0.6, 3.0, SBC_ROWS).clip(1e-3, 1 - 1e-3)
        x = np.log(p / (1 - p)).astype(np.float32)
        track = rng.integers(0, SBC_TRACKS, SBC_ROWS).astype(np.int32)
        truth_values = _simulate(shape, jax.random.PRNGKey(r), x, track)
        pad = 1024 - SBC_ROWS
        data = model_data(  # the fit conditions on the sufficient statistics and centres of these rows
            x=np.concatenate([x, np.zeros(pad, np.float32)]),
            y=np.concatenate([truth_values["y"].astype(np.int32), np.zeros(pad, np.int32)]),
            event=np.zeros(1024, np.int32),
            track=np.concatenate([track, np.zeros(pad, np.int32)]),
            mask=np.arange(1024) < SBC_ROWS,
            track_archetype=np.zeros(4, np.int32),
            track_real=np.arange(4) < SBC_TRACKS,
            n_events=1,
        )
        draws = sampler.run(data, seed=1000 + r, samples=400)
        for name, index in SBC_PARAMS.items():
            posterior = draws.params[name][..., index[0], index[1]][:, ::8].ravel()  # thinned: 100 draws
            ranks[name].append(int((posterior < truth_values[name][index]).sum()))
    for name, values in ranks.items():
        counts = np.bincount(np.asarray(values) * 5 // 101, minlength=5)
        p_chi2 = stats.chisquare(counts).pvalue
        p_ks = stats.kstest((np.asarray(values) + 0.5) / 101, "uniform").pvalue
        assert p_chi2 > 0.001 and p_ks > 0.001, (name, counts.tolist(), p_chi2, p_ks)

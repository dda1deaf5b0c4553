"""Diagnostics on posteriors built from seeded random arrays: no sampler in the loop."""

from __future__ import annotations

import arviz as az
import numpy as np

from shared.contract.summary import ConvergenceCriteria
from shared.stats import diagnostics
from shared.stats.diagnostics import convergence, parameter_summaries, sampler_diagnostics

EVENTS, ARCHS, TRACKS = ["top_5", "top_10"], ["intermediate"], ["Kansas", "Texas", "Michigan"]


def fake_posterior(*, chains=4, draws=1000, offset=0.0, diverging=0, seed=0) -> az.InferenceData:
    rng = np.random.default_rng(seed)
    shift = (np.arange(chains) * offset)[:, None, None, None]

    def arch():
        return rng.normal(size=(chains, draws, len(EVENTS), len(ARCHS))) + shift

    def track():
        return rng.normal(size=(chains, draws, len(EVENTS), len(TRACKS))) + shift

    div = np.zeros((chains, draws), dtype=np.int8)
    div.flat[:diverging] = 1
    n_steps = np.full((chains, draws), 15)
    n_steps[0, :5] = 1023
    return az.from_dict(
        posterior={
            "alpha_arch": arch(), "beta_arch": np.exp(arch()), "sigma_alpha": np.abs(arch()),
            "sigma_log_beta": np.abs(arch()), "alpha_track": track(), "beta_track": np.exp(track()),
        },
        sample_stats={
            "diverging": div,
            "energy": rng.normal(size=(chains, draws)),
            "n_steps": n_steps,
            "reached_max_treedepth": (n_steps >= 1023).astype(np.int8),
        },
        coords={"event": EVENTS, "archetype": ARCHS, "track": TRACKS},
        dims={
            **{n: ["event", "archetype"] for n in ("alpha_arch", "beta_arch", "sigma_alpha", "sigma_log_beta")},
            **{n: ["event", "track"] for n in ("alpha_track", "beta_track")},
        },
    )


def test_a_runs_convergence_serves_any_inference_data_of_its_draws():
    """R-hat and bulk ESS computed once per run (on unnamed dimensions, between attempts) are the summary's."""
    idata = fake_posterior(offset=0.05)
    unnamed = az.from_dict(
        posterior={name: idata.posterior[name].values for name in idata.posterior.data_vars},
        sample_stats={"diverging": idata.sample_stats["diverging"].values},
    )
    known = convergence(unnamed)
    assert parameter_summaries(idata, known=known) == parameter_summaries(idata)
    max_rhat, min_ess, divergences = known.worst()
    records = parameter_summaries(idata)
    assert max_rhat == max(r.r_hat for r in records) and min_ess == min(r.ess_bulk for r in records)
    assert divergences == 0


def test_parameter_summaries_match_direct_computation():
    idata = fake_posterior()
    records = parameter_summaries(idata)
    assert len(records) == 4 * len(EVENTS) * len(ARCHS) + 2 * len(EVENTS) * len(TRACKS)
    rec = next(r for r in records if r.parameter == "alpha_track" and r.event == "top_10" and r.track == "Texas")
    values = idata.posterior["alpha_track"].sel(event="top_10", track="Texas").values
    assert rec.name == "alpha_track[top_10, Texas]"
    assert np.isclose(rec.mean, values.mean()) and np.isclose(rec.sd, values.std(ddof=1))
    # independent standard normal draws: HDI near ±1.88, R-hat near 1, ESS near the draw count
    assert -2.1 < rec.hdi_low < -1.6 and 1.6 < rec.hdi_high < 2.1
    assert abs(rec.r_hat - 1) < 0.01
    assert 3000 < rec.ess_bulk < 5000


def test_well_mixed_chains_pass_the_criteria():
    idata = fake_posterior()
    diag = sampler_diagnostics(idata, parameter_summaries(idata), sample_seconds=2.0, max_tree_depth=10)
    assert diag.divergences == 0 and diag.tree_depth_hits == 5
    assert diag.max_rhat < 1.01 and diag.min_ess_bulk > 400
    assert len(diag.bfmi) == 4 and diag.min_bfmi > 0.5
    assert np.isclose(diag.ess_bulk_per_second, diag.min_ess_bulk / 2.0)
    assert ConvergenceCriteria().issues(diag) == []


def test_chains_stuck_apart_fail_on_rhat_and_divergences_are_reasons():
    idata = fake_posterior(offset=0.5, diverging=3)
    diag = sampler_diagnostics(idata, parameter_summaries(idata), sample_seconds=1.0, max_tree_depth=10)
    assert diag.max_rhat > 1.1
    issues = ConvergenceCriteria().issues(diag)
    assert any(i.startswith("max R-hat") for i in issues)
    assert "3 divergent transitions" in issues


def test_few_draws_fail_on_ess():
    idata = fake_posterior(draws=60)
    diag = sampler_diagnostics(idata, parameter_summaries(idata), sample_seconds=1.0, max_tree_depth=10)
    assert any(i.startswith("min bulk ESS") for i in ConvergenceCriteria().issues(diag))


def _hard_posteriors():
    """Draws that exercise every branch: autocorrelated and independent chains, chains stuck apart, float32
    and float64, ties (rounded draws), a constant parameter and one holding a NaN."""
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        for case in range(5):
            draws = rng.normal(size=(4, 400, 12))
            if case == 1:  # a random walk: long autocorrelation, Geyer's sequence runs far
                draws = draws.cumsum(axis=1) * 0.05
            if case == 2:  # chains stuck apart
                draws += np.arange(4)[:, None, None] * 0.3
            if case == 3:  # ties
                draws = np.round(draws, 1)
            if case == 4:
                draws[:, :, 3] = 1.5
                draws[2, 9, 7] = np.nan
            yield draws.astype(dtype)


def test_rhat_ess_and_hdi_equal_arviz_parameter_by_parameter():
    """The kernels computed for all parameters at once are ArviZ's, each computed alone, to float tolerance."""
    for draws in _hard_posteriors():
        idata = az.from_dict(posterior={"x": draws})
        rows, unstack = diagnostics._rows({"x": draws})
        rhat, ess = (unstack(v)["x"] for v in diagnostics.rank_normalised(rows))
        low, high = (unstack(v)["x"] for v in diagnostics.hdi(rows))
        tail = unstack(diagnostics.ess_tail(rows))["x"]
        # parameter_summaries sorts the rows once, for both: the same values
        ordered = diagnostics.sorted_rows(rows)
        np.testing.assert_array_equal(diagnostics.ess_tail(rows, ordered=ordered), diagnostics.ess_tail(rows))
        for mine, alone in zip(diagnostics.hdi(rows, ordered=ordered), diagnostics.hdi(rows), strict=True):
            np.testing.assert_array_equal(mine, alone)
        expected = {
            "rhat": (rhat, az.rhat(idata, method="rank")["x"].values),
            "ess_bulk": (ess, az.ess(idata, method="bulk")["x"].values),
            "ess_tail": (tail, az.ess(idata, method="tail")["x"].values),
        }
        for what, (got, want) in expected.items():
            np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True, err_msg=what)
        interval = az.hdi(idata, hdi_prob=diagnostics.HDI_PROB)["x"].values
        usable = ~np.isnan(draws).any(axis=(0, 1))
        np.testing.assert_array_equal(low[usable], interval[usable, 0])
        np.testing.assert_array_equal(high[usable], interval[usable, 1])


def test_tail_quantiles_are_mquantiles_type_7():
    from scipy.stats.mstats import mquantiles

    for draws in _hard_posteriors():
        rows, _ = diagnostics._rows({"x": draws})
        usable = ~np.isnan(rows).any(axis=(1, 2))
        flat = rows[usable].reshape(int(usable.sum()), -1)
        expected = mquantiles(flat, (0.05, 0.95), alphap=1, betap=1, axis=1).data
        np.testing.assert_array_equal(diagnostics._type7_quantiles(np.sort(flat, axis=1), (0.05, 0.95)), expected)
    few = np.array([[3.0, 1.0, 2.0, 4.0]])  # n·p + 1 − p below 1 and above n − 1: k clipped
    np.testing.assert_array_equal(diagnostics._type7_quantiles(np.sort(few, axis=1), (0.01, 0.99)),
                                  mquantiles(few, (0.01, 0.99), alphap=1, betap=1, axis=1).data)


def test_z_scale_is_the_normal_quantile_of_every_average_rank():
    """The table of untied positions' quantiles gives the numbers ndtri gives each draw's rank (ties included)."""
    from scipy import special, stats

    for draws in _hard_posteriors():
        rows, _ = diagnostics._rows({"x": draws})
        split = diagnostics._split_chains(rows[diagnostics._usable(rows, min_chains=1)])
        flat = split.reshape(split.shape[0], -1)
        n = flat.shape[1]
        expected = special.ndtri((stats.rankdata(flat, method="average", axis=1) - 3 / 8) / (n - 2 * 3 / 8 + 1))
        np.testing.assert_array_equal(diagnostics._z_scale(split), expected.reshape(split.shape))


def test_average_ranks_are_scipys():
    from scipy import stats

    a = np.random.default_rng(3).integers(0, 6, size=(5, 40)).astype(float)
    np.testing.assert_array_equal(diagnostics._average_ranks(a), stats.rankdata(a, method="average", axis=1))


def test_means_and_sds_are_xarrays():
    """parameter_summaries' mean and sd are xarray's mean and std (ddof 1) over chain and draw, to the bit:
    float32 draws and one NaN."""
    idata = fake_posterior(seed=5)
    post = idata.posterior.astype(np.float32)
    post["beta_track"][1, 7, 0, 2] = np.nan
    idata = az.InferenceData(posterior=post, sample_stats=idata.sample_stats)
    mean, sd = post.mean(("chain", "draw")), post.std(("chain", "draw"), ddof=1)
    records = parameter_summaries(idata)
    for r in records:
        at = {"event": r.event, **({"archetype": r.archetype} if r.archetype else {"track": r.track})}
        assert r.mean == float(mean[r.parameter].sel(at)), r.name
        assert r.sd == float(sd[r.parameter].sel(at)), r.name
    assert len(records) == 4 * len(EVENTS) * len(ARCHS) + 2 * len(EVENTS) * len(TRACKS)

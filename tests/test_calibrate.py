"""shared.fit.calibrate, without Celery or Redis: small data, small sampler settings.

The posterior it fits is also used here by shared.fit.apply (one fit per module; the pure apply tests are
tests/test_apply.py) and summarised by shared.jobs.summary."""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest

from shared.contract.control import JobControl
from shared.contract.errors import InvalidDataset, JobCancelled, JobTimeLimitExceeded
from shared.contract.job import CalibrationJob
from shared.contract.summary import CalibrationSummary, ConvergenceCriteria
from shared.data.synth import synthesize
from shared.fit.calibrate import calibrate, prepare
from shared.fit.sampler import COMPILES, bucket_rows, bucket_tracks, chunk_length
from shared.jobs.summary import summarize
from shared.storage.store import Store

SMALL = {"warmup": 100, "samples": 100, "chains": 2, "seed": 7}
ONE_RUN = ConvergenceCriteria(max_attempts=1)  # no remedies: these settings are too small to converge


@pytest.fixture(scope="module")
def season():
    return synthesize(seasons=1, scenarios=200, seed=3)


def make_job(archetype="road_course", **over) -> CalibrationJob:
    fields = dict(
        archetype=archetype,
        dataset_uri="file:///data/season.nc",
        dataset_sha256="0" * 64,
        events=("top_5", "top_10"),
        sampler=SMALL,
    )
    fields.update(over)
    return CalibrationJob(**fields)


@pytest.fixture(scope="module")
def fitted(season):
    phases = []
    idata, fit = calibrate(season, make_job(), control=JobControl(on_progress=phases.append), criteria=ONE_RUN)
    summary = summarize(fit, load_s=0.25)
    return idata, summary, phases


def test_summary_is_complete_and_json_round_trips(fitted):
    _, summary, _ = fitted
    again = CalibrationSummary.model_validate_json(summary.model_dump_json())
    assert again == summary
    assert summary.archetypes == ["road_course"]
    assert summary.events == ["top_5", "top_10"]
    assert summary.n_races == 6
    assert set(summary.tracks["road_course"]) <= {
        "Sonoma", "Watkins Glen", "COTA", "Chicago Street", "Charlotte Roval", "Indianapolis Road Course", "Mexico City",
    }
    d = summary.diagnostics
    assert d.chains == 2 and d.draws == 100
    assert 1.0 <= d.max_rhat < 1.2
    assert d.min_ess_bulk > 10  # 2 × (100 + 100): a track scale (sigma_alpha) can mix slowly
    assert len(d.bfmi) == 2
    names = {p.parameter for p in summary.parameters}
    assert names == {"alpha_arch", "beta_arch", "sigma_alpha", "sigma_log_beta", "alpha_track", "beta_track"}
    for p in summary.parameters:
        assert p.hdi_low <= p.mean <= p.hdi_high
        assert p.sd > 0
    # ESS below 400 at these settings: reported as a reason, not raised
    assert not summary.converged
    assert any("ESS" in reason for reason in summary.convergence_issues)
    (attempt,) = summary.attempts
    assert (attempt.number, attempt.seed, attempt.target_accept_prob, attempt.remedy) == (1, 7, 0.8, None)
    assert attempt.issues == summary.convergence_issues
    assert attempt.divergences == d.divergences and attempt.max_rhat == pytest.approx(d.max_rhat)


def test_summary_scores_raw_and_calibrated_forecasts(fitted):
    _, summary, _ = fitted
    assert {(c.archetype, c.event) for c in summary.calibration} == {("road_course", "top_5"), ("road_course", "top_10")}
    for c in summary.calibration:
        assert c.n == 6 * 38
        assert 0 < c.raw.brier < 0.25 and 0 < c.calibrated.brier < 0.25
        assert sum(c.raw.reliability["count"]) == c.n
    (ensemble,) = summary.ensemble
    assert ensemble.crps > 0 and set(ensemble.coverage) == {"0.5", "0.8", "0.95"}
    assert {j["event"] for j in summary.joint_events} == {"top_5", "top_10"}
    t = summary.timings
    assert t.sample_s > 0 and t.diagnostics_s > 0
    assert t.load_s == 0.25 and t.sample_s == sum(a.sample_s for a in summary.attempts)  # what the run measured


def test_inference_data_has_every_group_with_named_dims(fitted):
    idata, summary, _ = fitted
    assert set(idata.groups()) >= {"posterior", "sample_stats", "observed_data", "constant_data", "posterior_predictive"}
    post = idata.posterior
    assert post["alpha_arch"].dims == ("chain", "draw", "event", "archetype")
    assert post["beta_track"].dims == ("chain", "draw", "event", "track")
    assert list(post["track"].values) == summary.tracks["road_course"]
    assert float(post["beta_track"].min()) > 0 and float(post["sigma_alpha"].min()) > 0
    assert idata.observed_data["y"].sizes["row"] == summary.n_rows
    assert set(np.unique(idata.posterior_predictive["y"].values)) <= {0, 1}
    assert int(idata.sample_stats["diverging"].sum()) == summary.diagnostics.divergences
    assert idata.posterior.attrs["job_id"] == summary.job_id


def test_posterior_round_trips_through_netcdf(fitted, tmp_path):
    idata, _, _ = fitted
    store = Store(str(tmp_path))
    uri = store.put_netcdf(idata, "posteriors/road_course/x.nc")
    back = az.from_netcdf(store.get_dataset_file(uri))
    for group in idata.groups():
        original, loaded = getattr(idata, group), getattr(back, group)
        for name in original.data_vars:
            np.testing.assert_array_equal(original[name].values, loaded[name].values)
    assert back.posterior.attrs == idata.posterior.attrs


def test_progress_runs_through_the_phases_in_order(fitted):
    _, _, phases = fitted
    names = [p.phase for p in phases]
    order = ["compile", "warmup", "sampling", "diagnostics"]
    assert [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n] == order
    sampling = [p.fraction for p in phases if p.phase == "sampling"]
    assert sampling == sorted(sampling) and sampling[-1] == 1.0


def test_same_bucket_different_rows_compiles_nothing(season, fitted):
    """A second job whose data differ in size but share the bucket must not recompile."""
    job = make_job(as_of=np.datetime64("2024-09-05", "D").astype(object))  # drops one race and its track
    first, second = prepare(season, make_job()), prepare(season, job)
    assert first.rows.n_rows != second.rows.n_rows
    assert first.bucket == second.bucket
    before = COMPILES.count
    calibrate(season, job, criteria=ONE_RUN)
    assert COMPILES.count == before


def test_time_limit_is_enforced_between_chunks(season, fitted):
    with pytest.raises(JobTimeLimitExceeded):
        calibrate(season, make_job(), control=JobControl().start(0))


def test_cancellation_is_checked_between_chunks(season, fitted):
    calls = []

    def cancelled() -> str | None:
        calls.append(1)
        return "asked to stop" if len(calls) > 3 else None

    with pytest.raises(JobCancelled, match="asked to stop"):
        calibrate(season, make_job(), control=JobControl(cancel_source=cancelled, poll_s=0))
    assert len(calls) == 4


def test_a_window_without_races_is_rejected(season):
    job = make_job(as_of=np.datetime64("2023-01-01", "D").astype(object))
    with pytest.raises(InvalidDataset, match="no races of archetype road_course before 2023-01-01"):
        calibrate(season, job)


def test_bucket_sizes():
    assert bucket_rows(1) == 2048 and bucket_rows(2048) == 2048
    ns = range(1, 200_000, 997)
    sizes = [bucket_rows(n) for n in ns]
    assert all(b >= n for b, n in zip(sizes, ns))
    assert len(set(sizes)) <= 6 * 7 + 1  # six sizes per doubling from 2k to 200k rows
    # above the smallest bucket, padding is at most ~12 % of the padded rows
    assert max((b - n) / b for b, n in zip(sizes, ns) if n > 2048) <= 0.12
    assert bucket_rows(23_760) - 23_760 < 0.12 * bucket_rows(23_760)
    # a season of any one archetype with three events fits the smallest buckets: one compile for all
    assert bucket_rows(15 * 38 * 3) == 2048
    assert [bucket_tracks(n) for n in (1, 3, 10, 16, 17)] == [16, 16, 16, 16, 32]
    assert chunk_length(500, 1000) * 20 >= 1500


# -- using a posterior ---------------------------------------------------------------


def test_calibrating_new_forecasts_at_a_known_track(fitted):
    from shared.fit.apply import calibrate_probabilities, parameter_draws

    idata, summary, _ = fitted
    track = summary.tracks["road_course"][0]
    _, _, source = parameter_draws(idata, event="top_5", track=track)
    assert source == "track"
    results = calibrate_probabilities(idata, [0.02, 0.1, 0.3, 0.6], event="top_5", track=track)
    means = [r.mean for r in results]
    assert means == sorted(means)  # β > 0: calibration keeps the order of forecasts
    for r in results:
        assert 0 < r.low <= r.mean <= r.high < 1


def test_an_unseen_track_borrows_its_archetype_with_a_wider_band(fitted):
    from shared.fit.apply import calibrate_probabilities, parameter_draws

    idata, summary, _ = fitted
    known = calibrate_probabilities(idata, [0.3], event="top_10", track=summary.tracks["road_course"][0])[0]
    unseen = calibrate_probabilities(idata, [0.3], event="top_10", track="Brand New Street Circuit", archetype="road_course")[0]
    _, _, source = parameter_draws(idata, event="top_10", track="Brand New Street Circuit", archetype="road_course")
    assert source == "archetype"
    assert unseen.high - unseen.low > known.high - known.low


def test_calibrating_for_an_event_the_posterior_lacks_is_an_error(fitted):
    from shared.fit.apply import calibrate_probabilities

    idata, _, _ = fitted
    with pytest.raises(KeyError, match="top_3"):
        calibrate_probabilities(idata, [0.3], event="top_3", archetype="road_course")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibrate_probabilities(idata, [1.5], event="top_5", archetype="road_course")


def test_chains_shared_between_devices_come_back_one_per_chain(season):
    """Four chains on two devices (two vectorised per device) give draws of shape (4, samples)."""
    import dataclasses

    from shared.fit.sampler import sampler_for

    prepared = prepare(season, make_job())
    bucket = dataclasses.replace(prepared.bucket, chains=4, devices=2)
    draws = sampler_for(bucket).run(prepared.data, seed=3, samples=40)
    assert draws.params["alpha_arch"].shape[:2] == (4, 40)
    assert draws.stats["diverging"].shape == (4, 40)
    # the chains are distinct: each started from its own key
    firsts = draws.params["alpha_arch"][:, 0].reshape(4, -1)
    assert len({tuple(np.round(row, 6)) for row in firsts}) == 4


# -- convergence remedies --------------------------------------------------------------


def test_a_failed_run_is_remedied_with_more_draws_on_the_same_compiled_sampler(season, fitted):
    """Low ESS: the second attempt draws more, with its own seed, and compiles nothing new."""
    before = COMPILES.count
    job = make_job()
    criteria = ConvergenceCriteria(max_rhat=2.0, min_ess_bulk=300, max_divergences=10_000, max_attempts=2)  # ESS only
    summary = summarize(calibrate(season, job, criteria=criteria)[1])
    assert COMPILES.count == before
    first, second = summary.attempts
    assert first.min_ess_bulk < 300 and any("ESS" in i for i in first.issues)
    assert second.number == 2 and second.seed != first.seed and second.samples > first.samples
    assert second.remedy.startswith("min bulk ESS") and second.warmup == first.warmup
    assert summary.diagnostics.draws == second.samples  # the last attempt is the one reported
    assert summary.converged == (not second.issues)
    # the same job gives the same attempts
    again = calibrate(season, job, criteria=criteria)[1]
    assert [(a.seed, a.samples, a.min_ess_bulk) for a in again.attempts] == [
        (a.seed, a.samples, a.min_ess_bulk) for a in summary.attempts
    ]


def test_target_acceptance_is_a_dynamic_argument_of_the_compiled_sampler(season, fitted):
    """A higher target adapts a smaller step size, and compiles nothing."""
    from shared.fit.sampler import sampler_for

    prepared = prepare(season, make_job())
    sampler = sampler_for(prepared.bucket)
    before = COMPILES.count
    low = sampler.run(prepared.data, seed=1, samples=20, target_accept_prob=0.6)
    high = sampler.run(prepared.data, seed=1, samples=20, target_accept_prob=0.99)
    assert COMPILES.count == before
    assert high.stats["step_size"].mean() < 0.7 * low.stats["step_size"].mean()
    assert high.stats["acceptance_rate"].mean() > low.stats["acceptance_rate"].mean()


def test_a_remedy_that_would_not_fit_in_the_time_limit_is_not_run(season, fitted):
    from shared.fit.calibrate import REMEDY_RESERVE_S

    # the clock stands still: exactly the reserve kept for diagnostics and writing is always left
    control = JobControl(clock=lambda: 0.0).start(REMEDY_RESERVE_S)
    summary = summarize(calibrate(season, make_job(), control=control)[1])
    assert len(summary.attempts) == 1 and not summary.converged
    assert any("remedy not run" in issue and "time limit" in issue for issue in summary.convergence_issues)


def test_cancellation_is_checked_between_attempts(season, fitted):
    control = JobControl()

    def progress(p):
        if p.phase == "sampling" and p.fraction == 1.0:
            control.cancel("enough")

    control.attach(on_progress=progress)
    with pytest.raises(JobCancelled, match="remedy"):
        calibrate(season, make_job(), control=control)


def test_one_compiled_sampler_serves_a_season_of_every_archetype(season):
    """calq demo's four jobs (each archetype, default events) share one bucket: one compile."""
    from shared.contract.domain import ARCHETYPES

    buckets = {prepare(season, make_job(archetype=a, events=("top_1", "top_5", "top_10"), sampler={})).bucket
               for a in ARCHETYPES}
    assert len(buckets) == 1

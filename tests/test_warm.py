"""Warm starts: a job's sampler begins where a previous fit's posterior left off.

The sampler's coordinates are recovered exactly from a stored posterior;
tracks, events and archetypes are matched by name; a warm run is recorded,
runs a shorter warmup, and is followed by a cold run when it fails the
criteria. Agreement with a cold start is checked statistically (slow).
"""

from __future__ import annotations

import dataclasses
from datetime import date, timedelta

import numpy as np
import pytest

from shared.contract.job import CalibrationJob
from shared.contract.summary import CalibrationSummary, ConvergenceCriteria
from shared.data.synth import synthesize
from shared.fit.batch import BatchKey, BatchRun, FirstRun, first_runs, sample_batch
from shared.fit.calibrate import calibrate, prepare, track_labels, warm_start_of
from shared.fit.idata import build_inference_data
from shared.fit.model import ModelShape
from shared.fit.sampler import COMPILES, sampler_for
from shared.fit.warm import (
    MIN_DRAWS_PER_COORDINATE,
    MIN_WARM_WARMUP,
    WarmSource,
    WarmStartUnusable,
    regularised_covariance,
    starting_point,
    unconstrained_draws,
    warm_warmup,
)
from shared.jobs.summary import summarize

SMALL = {"warmup": 100, "samples": 100, "chains": 2, "seed": 7}
ONE_RUN = ConvergenceCriteria(max_attempts=1)


@pytest.fixture(scope="module")
def season():
    return synthesize(seasons=1, scenarios=200, seed=3)


def make_job(archetype="road_course", **over) -> CalibrationJob:
    fields = dict(
        archetype=archetype, dataset_uri="file:///data/season.nc", dataset_sha256="0" * 64,
        events=("top_5", "top_10"), sampler=SMALL,
    )
    fields.update(over)
    return CalibrationJob(**fields)


@pytest.fixture(scope="module")
def previous(season):
    """A cold road-course fit, with the sampler's own draws (unconstrained sites included)."""
    job = make_job()
    prepared = prepare(season, job)
    draws = sampler_for(prepared.bucket).run(prepared.data, seed=3, samples=100)
    rows = dataclasses.replace(prepared.rows, tracks=tuple(track_labels(prepared.rows)))
    idata = build_inference_data(draws, rows, seed=3, attrs={"centered": 0})
    return idata, draws, prepared


def test_the_sampler_coordinates_are_recovered_from_a_stored_posterior(previous):
    idata, draws, prepared = previous
    recovered = unconstrained_draws(idata)
    n_tracks = len(prepared.rows.tracks)

    def flat(values):
        return values.reshape(-1, *values.shape[2:])

    np.testing.assert_allclose(recovered["alpha_arch"], flat(draws.params["alpha_arch"]), rtol=1e-6)
    np.testing.assert_allclose(recovered["log_beta_arch"], flat(draws.params["log_beta_arch"]), atol=1e-5)
    np.testing.assert_allclose(recovered["sigma_alpha"], np.log(flat(draws.params["sigma_alpha"])), atol=1e-5)
    for site in ("alpha_track_z", "log_beta_track_z"):
        np.testing.assert_allclose(recovered[site], flat(draws.params[site])[..., :n_tracks], atol=2e-3, rtol=1e-3)


def test_tracks_events_and_archetypes_are_matched_by_name(previous):
    idata, _, prepared = previous
    prev_tracks = list(prepared.rows.tracks)
    tracks = [prev_tracks[2], "Nowhere Speedway", prev_tracks[0]]
    shape = ModelShape(n_events=1, n_archetypes=1, n_tracks=16, centered=False)
    start = starting_point(
        idata, events=["top_10"], archetypes=["road_course"], tracks=tracks, track_archetype=[0, 0, 0],
        shape=shape, chains=4, seed=1,
    )
    assert start.positions["alpha_arch"].shape == (4, 1, 1) and start.positions["alpha_track_z"].shape == (4, 1, 16)
    prev = unconstrained_draws(idata)
    for c in range(4):
        # each chain starts at one joint draw of the previous posterior (top_10 is its event 1)
        d = int(np.argmin(np.abs(prev["alpha_arch"][:, 1, 0] - start.positions["alpha_arch"][c, 0, 0])))
        np.testing.assert_allclose(start.positions["log_beta_arch"][c, 0, 0], prev["log_beta_arch"][d, 1, 0], rtol=1e-5)
        np.testing.assert_allclose(start.positions["alpha_track_z"][c, 0, [0, 2]], prev["alpha_track_z"][d, 1, [2, 0]], rtol=1e-4)
    assert len({float(v) for v in start.positions["alpha_arch"][:, 0, 0]}) == 4  # chains start apart
    # the mass matrix: dense, flattened by sorted site name; an unseen or padding track has unit variance and
    # no correlation, a matched one the previous draws' covariance
    sizes = {"alpha_arch": 1, "alpha_track_z": 16, "log_beta_arch": 1, "log_beta_track_z": 16, "sigma_alpha": 1, "sigma_log_beta": 1}
    size = sum(sizes.values())
    inverse_mass = start.inverse_mass_matrix
    assert inverse_mass.shape == (size, size)
    np.testing.assert_allclose(inverse_mass, inverse_mass.T)
    assert np.linalg.eigvalsh(inverse_mass.astype(np.float64)).min() > 0
    z_block = np.diag(inverse_mass)[1:17]
    assert z_block[1] == 1.0 and np.all(z_block[3:] == 1.0)
    assert z_block[0] == pytest.approx(prev["alpha_track_z"][:, 1, 2].var(ddof=1), rel=0.05)
    unseen = [1 + 1, *range(1 + 3, 1 + 16)]  # alpha_track_z of "Nowhere Speedway" and the padding tracks
    off_diagonal = inverse_mass[unseen] - np.eye(size)[unseen]
    assert not off_diagonal.any()
    prev_pair = np.cov(prev["alpha_arch"][:, 1, 0], prev["alpha_track_z"][:, 1, 2])[0, 1]
    assert inverse_mass[0, 1] == pytest.approx(prev_pair, rel=0.05)  # alpha_arch with the first track's z
    assert start.step_size == pytest.approx(float(np.median(idata.sample_stats["step_size"].values[:, -1])))

    with pytest.raises(WarmStartUnusable, match="top_1"):
        starting_point(idata, events=["top_1"], archetypes=["road_course"], tracks=tracks, track_archetype=[0, 0, 0],
                       shape=shape, chains=4, seed=1)
    with pytest.raises(WarmStartUnusable, match="intermediate"):
        starting_point(idata, events=["top_5"], archetypes=["intermediate"], tracks=tracks, track_archetype=[0, 0, 0],
                       shape=shape, chains=4, seed=1)


def test_a_track_of_another_archetype_with_the_same_name_starts_from_its_prior(previous):
    import arviz as az
    import xarray as xr

    idata, _, prepared = previous
    post = idata.posterior
    level = ["alpha_arch", "beta_arch", "sigma_alpha", "sigma_log_beta"]
    both = xr.concat([post[level], post[level].assign_coords(archetype=["intermediate"])], dim="archetype")
    two = az.InferenceData(
        posterior=xr.merge([both, post[["alpha_track", "beta_track"]]]),
        sample_stats=idata.sample_stats, constant_data=idata.constant_data,
    )
    name = prepared.rows.tracks[0]  # a road course in the previous fit
    shape = ModelShape(n_events=1, n_archetypes=1, n_tracks=16, centered=False)
    kwargs = dict(events=["top_5"], tracks=[name], track_archetype=[0], shape=shape, chains=2, seed=0)
    same = starting_point(two, archetypes=["road_course"], **kwargs)
    other = starting_point(two, archetypes=["intermediate"], **kwargs)
    assert same.inverse_mass_matrix[1, 1] != 1.0  # alpha_arch, then the track's z: matched
    assert other.inverse_mass_matrix[1, 1] == 1.0  # the same name under another archetype: a new track
    assert not other.inverse_mass_matrix[1, [0, *range(2, 36)]].any()


def test_the_mass_matrix_is_the_draws_covariance_shrunk_as_stan_shrinks_it():
    rng = np.random.default_rng(0)
    draws = rng.multivariate_normal([0.0, 1.0], [[1.0, 0.8], [0.8, 2.0]], size=400)
    n = 400
    expected = n / (n + 5) * np.cov(draws, rowvar=False) + 1e-3 * 5 / (n + 5) * np.eye(2)
    np.testing.assert_allclose(regularised_covariance(draws), expected)
    few = draws[: 2 * MIN_DRAWS_PER_COORDINATE - 1]  # too few draws a coordinate: the variances alone
    assert regularised_covariance(few)[0, 1] == 0.0 and regularised_covariance(few)[1, 1] > 0.5


def test_warm_warmup_is_a_fifth_and_never_below_the_minimum():
    assert warm_warmup(500) == 100
    assert warm_warmup(100) == MIN_WARM_WARMUP
    assert warm_warmup(20) == 20  # never longer than the job's own


@pytest.fixture(scope="module")
def source(season):
    day = _race_days(season, "road_course")[-2] + timedelta(days=1)
    idata, fit = calibrate(season, make_job(as_of=day), criteria=ONE_RUN)
    return WarmSource(idata=idata, job_id=fit.job.job_id, posterior_uri="file:///store/prev.nc", data_through=fit.data_through)


def test_a_warm_run_is_shorter_and_recorded(season, source):
    idata, fit = calibrate(season, make_job(), criteria=ONE_RUN, warm=source)
    first = fit.attempts[0]
    assert first.warm_start and first.warmup == warm_warmup(SMALL["warmup"])
    assert fit.warm_start.job_id == source.job_id and fit.warm_start.data_through == source.data_through
    assert fit.warm_start.posterior_uri == "file:///store/prev.nc" and fit.warm_start.warmup == first.warmup
    assert idata.posterior.attrs["warm_start_from"] == source.job_id
    summary = summarize(fit)
    assert CalibrationSummary.model_validate_json(summary.model_dump_json()).warm_start == summary.warm_start
    assert summary.diagnostics.draws == SMALL["samples"]


def test_warm_and_cold_runs_share_one_compiled_sampler(season, source):
    calibrate(season, make_job(), criteria=ONE_RUN)  # the bucket's sampler, compiled (or found) cold
    before = COMPILES.count
    calibrate(season, make_job(), criteria=ONE_RUN, warm=source)
    assert COMPILES.count == before


def test_a_failed_warm_run_is_followed_by_a_cold_one(season, source):
    disagreeing = ConvergenceCriteria(max_rhat=0.5, max_attempts=2)  # every run's chains "disagree"
    _, fit = calibrate(season, make_job(), criteria=disagreeing, warm=source)
    warm, cold = fit.attempts
    assert warm.warm_start and not cold.warm_start
    assert cold.warmup == SMALL["warmup"] and cold.remedy.startswith("warm start failed (max R-hat")
    assert fit.warm_start.job_id == source.job_id  # the record keeps where the first run started


def test_a_warm_run_starts_at_the_target_acceptance_the_previous_fit_needed(season, source):
    idata = source.idata.copy()
    idata.posterior.attrs["target_accept_prob"] = 0.95
    needed = dataclasses.replace(source, idata=idata)
    _, fit = calibrate(season, make_job(), criteria=ONE_RUN, warm=needed)
    assert fit.attempts[0].target_accept_prob == 0.95 and fit.warm_start.target_accept_prob == 0.95
    idata.posterior.attrs["target_accept_prob"] = "garbage"
    _, fit = calibrate(season, make_job(), criteria=ONE_RUN, warm=needed)
    assert fit.attempts[0].target_accept_prob == 0.8


def test_a_fit_that_cannot_seed_the_job_leaves_it_cold(season, source, caplog):
    job = make_job(events=("top_1", "top_5"))
    _, fit = calibrate(season, job, criteria=ONE_RUN, warm=source)
    assert fit.warm_start is None and not fit.attempts[0].warm_start
    assert fit.attempts[0].warmup == SMALL["warmup"]
    assert "starting cold" in caplog.text and "top_1" in caplog.text


def _race_days(ds, archetype: str) -> list[date]:
    days = ds["race_date"].values.astype("datetime64[D]").astype(object)
    return sorted({d for d, a in zip(days, ds["archetype"].values) if a == archetype})


# -- warm against a long cold reference, alone and batched (slow) ----------------------------------


@dataclasses.dataclass(frozen=True)
class Windows:
    """Two windows of intermediate races one race apart, the first's fit (the warm source), the second's reference."""

    ds: object
    after: date
    previous: object  # Fit of the first window
    source: WarmSource
    reference: dict  # parameter name -> ParameterSummary of a long cold run of the second window

    def job(self, seed: int, warmup: int = 400, samples: int = 800) -> CalibrationJob:
        """A job of the second window."""
        return window_job(self.after, seed, warmup=warmup, samples=samples)

    def z_scores(self, fit) -> list[float]:
        """z = Δmean / √(mcse_fit² + mcse_ref²) of every parameter against the reference (mcse = sd/√ESS)."""
        ref = self.reference
        return [(p.mean - ref[p.name].mean)
                / np.hypot(p.sd / np.sqrt(p.ess_bulk), ref[p.name].sd / np.sqrt(ref[p.name].ess_bulk))
                for p in fit.parameters]


def window_job(as_of: date, seed: int, *, warmup: int = 400, samples: int = 800) -> CalibrationJob:
    return make_job("intermediate", as_of=as_of, sampler={"warmup": warmup, "samples": samples, "chains": 4, "seed": seed})


@pytest.fixture(scope="module")
def windows() -> Windows:
    """Fit as of one race cold (more draws: its own Monte Carlo error then hides less of its distance to the
    reference), and the next window long and cold: the reference both slow tests compare with."""
    ds = synthesize(seasons=2, scenarios=300, seed=11)
    days = _race_days(ds, "intermediate")
    before, after = days[-3] + timedelta(days=1), days[-2] + timedelta(days=1)
    prev_idata, prev = calibrate(ds, window_job(before, 99, samples=2000))
    source = WarmSource(prev_idata, prev.job.job_id, None, prev.data_through)
    _, reference = calibrate(ds, window_job(after, 1234, warmup=1000, samples=8000))
    found = Windows(ds, after, prev, source, {p.name: p for p in reference.parameters})
    # the test can tell posteriors apart: the previous window's (one race fewer) is far from the reference
    assert np.abs(found.z_scores(prev)).max() > 4.5
    return found


def assert_like_the_reference(z: dict[str, list[float]]) -> None:
    """Each kind's |z| looks like a standard normal's: none beyond 4.5, under 15 % beyond 2 (4.6 % for N(0, 1))."""
    for kind, values in z.items():
        values = np.abs(np.asarray(values))
        assert values.size > 100
        assert values.max() < 4.5, (kind, values.max())
        assert (values > 2).mean() < 0.15, (kind, (values > 2).mean())


@pytest.mark.slow
def test_warm_starts_sample_the_same_posterior_as_cold_ones(windows):
    """As of the second window, warm from the first window's fit and cold, over six seeds.

    Every run is compared with the long cold reference run of the second
    window. A warm run that had not left the previous posterior (one race
    fewer) would sit several Monte Carlo errors away; one that samples the
    same posterior gives z about standard normal, as the cold runs do.

    Six seeds, not three: a run's parameters share its Monte Carlo error, so
    one run's share of |z| > 2 ranges widely. Cold runs of seeds 1-12 against
    the reference, measured: 0 to 23 % (mean 5.9 %, mean z² 1.02); seeds 1
    and 3 gave 23 and 21 %, and three seeds together 16 %, over the 15 % bound.
    """
    z = {"warm": [], "cold": []}
    for seed in range(1, 7):
        _, cold = calibrate(windows.ds, windows.job(seed))
        _, warm = calibrate(windows.ds, windows.job(seed), warm=windows.source)
        assert cold.converged and warm.converged, (cold.convergence_issues, warm.convergence_issues)
        assert len(warm.attempts) == 1 and warm.attempts[0].warm_start and warm.attempts[0].warmup == 80
        z["warm"] += windows.z_scores(warm)
        z["cold"] += windows.z_scores(cold)
    assert_like_the_reference(z)


@pytest.mark.slow
def test_batched_warm_and_cold_runs_sample_the_same_posterior(windows):
    """The same comparison on the batched path: the three seeds' warm jobs as one batch, their cold jobs as another.

    Each batch is one program (shared.fit.batch, chains on the host devices,
    jobs vmapped); each job's first run is handed to calibrate() by
    first_runs, so the fit judged and compared is the one a batch delivery
    records.
    """
    ds, seeds = windows.ds, (1, 2, 3)
    jobs = [windows.job(seed) for seed in seeds]
    prepared = [prepare(ds, job) for job in jobs]
    z = {}
    for kind, warm in (("warm", windows.source), ("cold", None)):
        seeded = [warm_start_of(p, job, warm) for p, job in zip(prepared, jobs)]
        assert all((s is not None) == (warm is not None) for s in seeded)
        key = BatchKey.first_run(prepared[0].bucket, jobs[0].sampler.samples, seeded[0][1] if warm else None)
        runs = [BatchRun(p.data, job.sampler.seed, s[0] if s else None) for p, job, s in zip(prepared, jobs, seeded)]
        draws = sample_batch(runs, key=key)
        handed = {job.job_id: FirstRun(key=key, seed=job.sampler.seed, seeded=s, draws=d)
                  for job, s, d in zip(jobs, seeded, draws)}
        z[kind] = []
        with first_runs(handed):
            for job, d in zip(jobs, draws):
                _, fit = calibrate(ds, job, warm=warm)
                assert fit.converged, fit.convergence_issues
                first = fit.attempts[0]
                assert len(fit.attempts) == 1 and first.sample_s == d.sample_s  # judged from the batch's draws
                assert first.warm_start == (warm is not None) and first.warmup == (80 if warm else 400)
                z[kind] += windows.z_scores(fit)
    assert_like_the_reference(z)

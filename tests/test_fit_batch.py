"""Several jobs in one compiled program (shared.fit.batch), without Celery or Redis: small data and settings."""

from __future__ import annotations

import numpy as np
import pytest

from shared.contract.control import JobControl
from shared.contract.errors import JobCancelled
from shared.contract.job import CalibrationJob
from shared.contract.summary import ConvergenceCriteria
from shared.data.synth import synthesize
from shared.fit.batch import JOB_LADDER, BatchKey, BatchRun, FirstRun, batch_size, first_runs, sample_batch
from shared.fit.calibrate import calibrate, prepare
from shared.fit.remedy import TARGET_ACCEPT
from shared.fit.sampler import sampler_for

SETTINGS = {"warmup": 150, "samples": 300, "chains": 2}
#: |z| of two runs' posterior means beyond this fails (several parameters per job: a wide bound).
MAX_Z = 4.5


@pytest.fixture(scope="module")
def season():
    return synthesize(seasons=1, scenarios=200, seed=3)


def make_job(archetype: str, seed: int) -> CalibrationJob:
    return CalibrationJob(archetype=archetype, dataset_uri="file:///data/season.nc", dataset_sha256="0" * 64,
                          events=("top_5", "top_10"), sampler={**SETTINGS, "seed": seed})


@pytest.fixture(scope="module")
def three(season):
    """Three jobs of one bucket (two archetypes, three seeds), prepared, and the batch key they share."""
    jobs = [make_job("road_course", 7), make_job("short_track", 8), make_job("road_course", 9)]
    prepared = [prepare(season, job) for job in jobs]
    bucket = prepared[0].bucket
    assert all(p.bucket == bucket for p in prepared)
    key = BatchKey.first_run(bucket, SETTINGS["samples"])
    return jobs, prepared, key


@pytest.fixture(scope="module")
def batched(three):
    jobs, prepared, key = three
    return sample_batch([BatchRun(p.data, job.sampler.seed) for job, p in zip(jobs, prepared)], key=key)


def mc_z(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """z of the difference of two runs' means per coordinate, each with its naive Monte Carlo error."""
    a, b = a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:])
    se = np.hypot(a.std(axis=0) / np.sqrt(a.shape[0] / 4), b.std(axis=0) / np.sqrt(b.shape[0] / 4))  # ~ESS of n/4
    return (a.mean(axis=0) - b.mean(axis=0)) / se


def test_a_job_in_a_batch_of_three_gives_its_answer_alone_within_monte_carlo_error(three, batched):
    """Same seed, same starts: vmap over jobs rounds differently, so draws part after a few steps; the answers agree."""
    jobs, prepared, key = three
    for job, p, draws in zip(jobs, prepared, batched):
        alone = sampler_for(key.bucket).run(p.data, seed=job.sampler.seed, samples=key.samples)
        assert draws.params["alpha_arch"].shape == alone.params["alpha_arch"].shape == (2, 300, 2, 1)
        for name in ("alpha_arch", "beta_arch"):
            z = mc_z(draws.params[name], alone.params[name])
            assert np.abs(z).max() < MAX_Z, (job.archetype, name, z)
        assert draws.stats["diverging"].shape == (2, 300)


def test_jobs_of_a_batch_answer_for_their_own_data(three, batched):
    """The road-course and short-track jobs differ; the two road-course seeds agree within Monte Carlo error."""
    first, second, third = (d.params["alpha_arch"] for d in batched)
    assert np.abs(mc_z(first, third)).max() < MAX_Z
    assert np.abs(mc_z(first, second)).max() > MAX_Z


def test_a_job_cancelled_mid_batch_is_dropped_and_the_others_keep_their_draws(three, batched):
    jobs, prepared, key = three
    checks = []

    def cancel_after_three() -> str | None:
        checks.append(1)
        return "asked to stop" if len(checks) > 3 else None

    controls = [None, JobControl(cancel_source=cancel_after_three, poll_s=0), None]
    runs = [BatchRun(p.data, job.sampler.seed, control=c) for job, p, c in zip(jobs, prepared, controls)]
    results = sample_batch(runs, key=key)
    assert isinstance(results[1], JobCancelled) and "asked to stop" in str(results[1])
    assert len(checks) == 4  # stopped at the check that saw the cancellation, not at the end
    for kept, before in ((results[0], batched[0]), (results[2], batched[2])):
        for name, values in before.params.items():  # the same program, the same lanes: the same numbers
            np.testing.assert_array_equal(kept.params[name], values)


def test_every_job_cancelled_stops_the_batch(three):
    jobs, prepared, key = three
    control = JobControl(cancel_source=lambda: "stop", poll_s=0)
    results = sample_batch([BatchRun(p.data, j.sampler.seed, control=control) for j, p in zip(jobs, prepared)], key=key)
    assert all(isinstance(r, JobCancelled) for r in results)


def test_calibrate_takes_a_batched_first_run_and_judges_it(season, three, batched):
    """Handed over by first_runs, the batched draws are the job's first attempt: nothing is sampled again."""
    jobs, _, key = three
    job, draws = jobs[0], batched[0]
    with first_runs({job.job_id: FirstRun(key=key, seed=job.sampler.seed, seeded=None, draws=draws)}):
        idata, fit = calibrate(season, job, criteria=ConvergenceCriteria(max_attempts=1))
    np.testing.assert_array_equal(idata.posterior["alpha_arch"].values, draws.params["alpha_arch"])
    assert len(fit.attempts) == 1 and fit.attempts[0].sample_s == draws.sample_s
    # another plan (here: another seed) is not the batch's run: sampled alone
    other = make_job("road_course", 70)
    with first_runs({other.job_id: FirstRun(key=key, seed=7, seeded=None, draws=draws)}):
        idata, _ = calibrate(season, other, criteria=ConvergenceCriteria(max_attempts=1))
    assert not np.array_equal(idata.posterior["alpha_arch"].values, draws.params["alpha_arch"])


def test_batch_sizes_follow_the_ladder():
    assert [batch_size(n) for n in (1, 2, 3, 5, 9, 17, 33, 128)] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert JOB_LADDER[0] == 1
    with pytest.raises(ValueError):
        batch_size(JOB_LADDER[-1] + 1)


def test_a_batch_is_all_warm_or_all_cold(three):
    _, prepared, key = three
    warm_key = BatchKey(bucket=key.bucket, warm=True, steps=50, samples=key.samples, target_accept_prob=TARGET_ACCEPT)
    with pytest.raises(ValueError, match="warm"):
        sample_batch([BatchRun(prepared[0].data, 1)], key=warm_key)


def test_chains_shared_between_devices_come_back_one_per_chain_and_job(three):
    """Four chains on two devices (two vectorised per device), two jobs: draws of shape (4, samples) each."""
    import dataclasses

    jobs, prepared, key = three
    bucket = dataclasses.replace(key.bucket, chains=4, devices=2)
    key = dataclasses.replace(key, bucket=bucket, samples=40)
    results = sample_batch([BatchRun(p.data, j.sampler.seed) for j, p in zip(jobs[:2], prepared[:2])], key=key)
    for draws in results:
        assert draws.params["alpha_arch"].shape[:2] == (4, 40)
        assert draws.stats["diverging"].shape == (4, 40)


#: A batch run in a child process that has not finished by then hung.
HANG_S = 480

_FOUR_DEVICES = """
import jax
from shared.contract.job import CalibrationJob
from shared.data.synth import synthesize
from shared.fit.batch import BatchKey, BatchRun, batch_size, batched_sampler_for, sample_batch
from shared.fit.calibrate import prepare

assert jax.local_device_count() == 4, jax.devices()
season = synthesize(seasons=1, scenarios=100, seed=3)
jobs = [CalibrationJob(archetype="intermediate", dataset_uri="file:///data/season.nc", dataset_sha256="0" * 64,
                       events=("top_5", "top_10"), sampler={"warmup": 20, "samples": 20, "chains": 4, "seed": seed})
        for seed in range(3)]
prepared = [prepare(season, job) for job in jobs]
bucket = prepared[0].bucket
assert bucket.devices == bucket.chains == 4, bucket
key = BatchKey.first_run(bucket, 20)
runs = [BatchRun(p.data, job.sampler.seed) for job, p in zip(jobs, prepared)]
for _ in range(3):
    assert all(r.params["alpha_arch"].shape[:2] == (4, 20) for r in sample_batch(runs, key=key))
sampler = batched_sampler_for(bucket, batch_size(len(runs)))
programs = sampler.compile(sampler._inputs(runs + runs[:1]))
print("LAPACK" if any("lapack" in p.as_text() for p in programs) else "no LAPACK")
"""


def test_a_batch_of_jobs_with_one_chain_per_host_device_finishes():
    """Four chains pmapped over four host devices, three jobs vmapped: it hung at its first call.

    The metric's Cholesky factor and triangular solve, batched over jobs,
    were LAPACK calls in the program; on the CPU each fans its batch out over
    XLA's intra-op pool from a worker of that pool and waits. With four
    devices running at once every worker waited and none was left to do the
    work: no thread used the CPU, forever. The metric is factored on the host
    now (shared.fit.nuts.dense_metric) and the programs hold no LAPACK call.
    Run in a child process with a time limit, so a hang fails this test and
    not the session.
    """
    import subprocess
    import sys

    from shared.fit.device import with_host_devices
    from tests.services import ROOT, calq_environ

    environ = calq_environ(XLA_FLAGS=with_host_devices("", 4))
    try:
        result = subprocess.run([sys.executable, "-c", _FOUR_DEVICES], cwd=ROOT, env=environ, capture_output=True,
                                text=True, timeout=HANG_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the batch did not finish in {HANG_S} s: hung ({(exc.stderr or b'')[-2000:]!r})")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["no", "LAPACK"], result.stdout

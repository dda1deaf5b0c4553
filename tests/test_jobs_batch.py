"""A batch of job messages (shared.jobs.batch), embedded: no Celery, no Redis; small data and settings."""

from __future__ import annotations

from datetime import date

import pytest

from shared.contract.job import CalibrationJob, JobState
from shared.contract.summary import ConvergenceCriteria
from shared.jobs.batch import run_batch
from shared.jobs.services import Services
from shared.storage.catalog import Catalog
from tests.services import season_file

SAMPLER = {"warmup": 150, "samples": 300, "chains": 2}


@pytest.fixture
def batch_services(settings, tmp_path):
    # Two attempts, and a bulk ESS no run of these settings reaches: every job's first run (the batch's) fails,
    # so each job also runs one remedy, alone.
    settings = settings.model_copy(update={"convergence": ConvergenceCriteria(max_attempts=2, min_ess_bulk=1e6)})
    return Services.from_settings(settings)


def jobs_of(services: Services, path) -> list[CalibrationJob]:
    uri, sha = services.store.upload_dataset(path)

    def job(archetype: str, seed: int, as_of: date | None = None) -> CalibrationJob:
        return CalibrationJob(archetype=archetype, dataset_uri=uri, dataset_sha256=sha, events=("top_5", "top_10"),
                              as_of=as_of, sampler={**SAMPLER, "seed": seed})

    return [job("road_course", 7), job("short_track", 8), job("road_course", 9, date(2024, 9, 5)),
            job("road_course", 10, date(2024, 8, 1))]


def test_a_batch_fits_its_jobs_in_one_program_and_each_finishes_as_a_single_job(batch_services, tmp_path):
    services = batch_services
    jobs = jobs_of(services, season_file(tmp_path, scenarios=200, seed=3))
    for job in jobs:
        services.registry.claim(job)
    cancelled = jobs[3]
    services.registry.cancel(cancelled.job_id, "not wanted")

    results = run_batch(services, [job.to_message() for job in jobs], worker="test", batch=True)

    assert [r["state"] for r in results[3:]] == ["cancelled"]
    catalog = Catalog(services.store)
    firsts = []
    for job, result in zip(jobs[:3], results):
        record = services.registry.get(job.job_id)
        assert record.state is JobState.SUCCEEDED, record
        assert result["job_id"] == job.job_id and result["summary_uri"] == record.summary_uri
        summary = catalog.read(record.summary_uri)
        posterior = services.store.get_inference_data(summary.posterior_uri)
        assert posterior.posterior.sizes["chain"] == 2 and posterior.posterior.sizes["draw"] == summary.attempts[-1].samples
        first, remedy = summary.attempts
        assert first.remedy is None and first.samples == SAMPLER["samples"]
        assert remedy.remedy is not None and remedy.sample_s != first.sample_s  # the remedy ran alone, after
        firsts.append(first)
    # the three first runs were one program: one sampling time, shared equally
    assert len({a.sample_s for a in firsts}) == 1
    assert services.registry.get(cancelled.job_id).state is JobState.CANCELLED
    assert not services.store.list(f"posteriors/{cancelled.archetype}/{cancelled.job_id}")


def test_without_batching_each_job_is_fitted_alone(batch_services, tmp_path):
    services = batch_services
    jobs = jobs_of(services, season_file(tmp_path, scenarios=200, seed=3))[:2]
    for job in jobs:
        services.registry.claim(job)
    results = run_batch(services, [job.to_message() for job in jobs], worker="test", batch=False)
    summaries = [Catalog(services.store).read(r["summary_uri"]) for r in results]
    assert all(s.job_id == j.job_id for s, j in zip(summaries, jobs))
    assert summaries[0].attempts[0].sample_s != summaries[1].attempts[0].sample_s


def test_a_message_that_is_not_a_job_gets_the_single_paths_refusal(batch_services, tmp_path):
    services = batch_services
    job = jobs_of(services, season_file(tmp_path, scenarios=200, seed=3))[0]
    results = run_batch(services, [{"job_id": "nope", "archetype": "moon"}], worker="test", batch=True)
    assert results[0]["state"] == "rejected" and "invalid job message" in results[0]["reason"]
    assert services.registry.find(job.job_id) is None

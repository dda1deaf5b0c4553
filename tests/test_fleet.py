"""The fleet end to end: real redis-server, moto's S3 server, a real `calq worker` process.

What a newcomer does from the README: start Redis, run ``calq worker --gpus
none``, then ``calq submit`` + ``calq wait`` + ``calq latest`` with
``CALQ_BROKER_URL`` set. Storage is S3 (moto), so the claim check and the
atomic uploads run against a real endpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from producer.client import CalibrationClient, JobDidNotSucceed
from shared.contract.job import JobState
from shared.contract.settings import Settings
from shared.contract.summary import CalibrationSummary
from shared.data.dataset import open_dataset, save_dataset
from tests.services import LENIENT, calq_environ, calq_worker, convergence_environ, new_s3_store, run_calq, season_file

pytestmark = pytest.mark.integration

SAMPLER = {"warmup": 100, "samples": 150, "chains": 2}
EVENTS = "top_5,top_10"
#: tiny runs cannot reach 400 effective draws: these criteria let them count as converged
CONVERGENCE = convergence_environ()


@pytest.fixture(scope="module")
def fleet_env(redis_server, s3_server, tmp_path_factory):
    bucket = "calq-fleet"
    root = tmp_path_factory.mktemp("fleet")
    store, settings = new_s3_store(s3_server, bucket, broker_url=redis_server.url)
    return calq_environ(CALQ_BROKER_URL=redis_server.url, **store, **CONVERGENCE), settings, root


@pytest.fixture(scope="module")
def worker(fleet_env):
    environ, _, root = fleet_env
    with calq_worker(environ, root) as proc:
        yield proc
    assert proc.returncode == 0, (root / "worker.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def client(fleet_env, worker):
    return CalibrationClient(fleet_env[1])


@pytest.fixture(scope="module")
def dataset(fleet_env):
    return season_file(fleet_env[2], scenarios=200, seed=5)


def calq(fleet_env, *args, check=True):
    environ, _, root = fleet_env
    return run_calq(environ, root, *args, check=check)


def sampler_args():
    return [f"--{k}={v}" for k, v in SAMPLER.items()]


@pytest.fixture(scope="module")
def first_summary(fleet_env, worker, dataset):
    """The README's flow: submit, wait, latest — through the CLI."""
    submitted = calq(fleet_env, "submit", str(dataset), "--archetype", "intermediate", "--events", EVENTS,
                     *sampler_args(), "--json")
    job_id = json.loads(submitted.stdout)["job_id"]
    waited = calq(fleet_env, "wait", job_id, "--timeout", "300", "--json")
    return CalibrationSummary.model_validate_json(waited.stdout)


def test_submit_wait_latest_through_the_cli(fleet_env, first_summary):
    assert first_summary.archetype == "intermediate" and first_summary.converged
    assert first_summary.posterior_uri.startswith("s3://calq-fleet/calq/posteriors/intermediate/")
    latest = CalibrationSummary.model_validate_json(calq(fleet_env, "latest", "intermediate", "--json").stdout)
    assert latest.job_id == first_summary.job_id
    status = json.loads(calq(fleet_env, "status", first_summary.job_id, "--json").stdout)
    assert status["state"] == "succeeded" and status["worker"].startswith("calq-cpu0@")


def test_the_posterior_is_in_s3_and_readable(client, first_summary):
    idata = client.posterior(first_summary.job_id)
    assert idata.posterior.attrs["job_id"] == first_summary.job_id
    assert client.store.exists(first_summary.summary_uri)


def test_the_same_job_submitted_twice_is_one_job(client, dataset, first_summary):
    again = client.submit(dataset, "intermediate", events=EVENTS, **SAMPLER)
    assert again == first_summary.job_id
    record = client.status(again)
    assert record.state is JobState.SUCCEEDED and record.deliveries == 1


def test_a_bad_dataset_is_rejected_and_the_worker_goes_on(client, dataset, fleet_env, first_summary):
    ds = open_dataset(dataset)
    finish = ds["finish_position"].values.copy()
    finish[0, ~np.isnan(finish[0])] = 7.0  # everyone finished 7th
    ds["finish_position"].values = finish
    broken = fleet_env[2] / "broken.nc"
    save_dataset(ds, broken)
    bad = client.submit(broken, "intermediate", events=EVENTS, **SAMPLER)
    good = client.submit(dataset, "road_course", events=EVENTS, **SAMPLER)
    with pytest.raises(JobDidNotSucceed) as rejected:
        client.wait(bad, timeout=120)
    assert rejected.value.status.state is JobState.REJECTED
    assert "position 7" in rejected.value.status.reason
    assert rejected.value.status.deliveries == 1  # never retried
    assert client.wait(good, timeout=300).archetype == "road_course"
    # the CLI's wait says so and exits non-zero
    result = calq(fleet_env, "wait", bad, "--timeout", "10", check=False)
    assert result.returncode == 1 and "rejected" in result.stderr


def test_latest_moves_only_for_newer_converged_jobs(client, dataset, first_summary):
    from datetime import date

    older = client.submit(dataset, "intermediate", events=EVENTS, as_of=date(2024, 8, 1), **SAMPLER)
    older_summary = client.wait(older, timeout=300)
    assert older_summary.data_through < first_summary.data_through
    assert client.latest("intermediate").job_id == first_summary.job_id


def test_embedded_mode_gives_the_same_summary_as_the_fleet(first_summary, dataset, tmp_path):

    settings = Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None, convergence=LENIENT)
    here = CalibrationClient(settings)
    job = here.make_job(dataset, "intermediate", events=EVENTS, **SAMPLER)
    here.submit_job(job)
    embedded = here.result(job.job_id)
    fleet = {p.name: p for p in first_summary.parameters}
    for p in embedded.parameters:
        assert p.mean == pytest.approx(fleet[p.name].mean, abs=1e-5), p.name
    assert embedded.diagnostics.divergences == first_summary.diagnostics.divergences
    assert embedded.n_rows == first_summary.n_rows


def test_the_client_calibrates_new_forecasts_with_the_latest_posterior(client, first_summary):
    track = first_summary.tracks["intermediate"][0]
    known = client.calibrate("intermediate", track, "top_5", [0.1, 0.3])
    unseen = client.calibrate("intermediate", "Brand New Speedway", "top_5", [0.1, 0.3])
    assert [r.p for r in known] == [0.1, 0.3] and known[0].mean < known[1].mean
    assert unseen[0].high - unseen[0].low > known[0].high - known[0].low


def test_reindex_rebuilds_latest_after_redis_is_flushed(fleet_env, redis_server, first_summary):
    """A flushed Redis, seen through an empty database of the same server, so no other test loses its records."""
    import redis

    environ, settings, root = fleet_env
    empty = redis_server.url.rsplit("/", 1)[0] + "/15"
    redis.Redis.from_url(empty).flushdb()
    flushed = (dict(environ, CALQ_BROKER_URL=empty), settings, root)
    # One store, one truth: latest answers from the store's fits even before a reindex, and writes them back
    learnt = CalibrationSummary.model_validate_json(calq(flushed, "latest", "intermediate", "--json").stdout)
    assert learnt.job_id == first_summary.job_id
    assert redis.Redis.from_url(empty).hlen("calq:latest") >= len(first_summary.events)
    redis.Redis.from_url(empty).flushdb()
    rebuilt = json.loads(calq(flushed, "reindex", "--json").stdout)
    assert rebuilt["pointers"] >= len(first_summary.events)
    latest = CalibrationSummary.model_validate_json(calq(flushed, "latest", "intermediate", "--json").stdout)
    assert latest.job_id == first_summary.job_id

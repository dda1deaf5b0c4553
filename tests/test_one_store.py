"""One store, one truth, whatever the mode (issue 22).

A job fitted in embedded mode writes its summary to the store; the same
store then serves a fleet (a real Redis). Submitting the same job on the
fleet must not run it again nor overwrite its result: its record is repaired
from the store and nothing is queued; ``latest`` gives the same answer in both
modes; and a message for the job that reaches a worker anyway is answered
from the store without sampling.
"""

from __future__ import annotations

import pytest
import redis

from producer.client import CalibrationClient
from shared.contract.job import JobState
from shared.contract.settings import Settings
from shared.contract.summary import ConvergenceCriteria
from shared.data.dataset import save_dataset
from shared.data.synth import synthesize
from shared.jobs.celery_app import CPU_QUEUE
from shared.jobs.handle import Delivery, process
from shared.jobs.services import Services
from shared.storage.store import summary_key

pytestmark = pytest.mark.integration

#: Tiny runs that count as converged, so the fit moves ``latest``.
LOOSE = ConvergenceCriteria(max_rhat=10.0, min_ess_bulk=1.0, max_divergences=10_000, max_attempts=1)
SMALL = {"warmup": 30, "samples": 30, "chains": 2}


@pytest.fixture
def fitted_embedded(tmp_path):
    """A store holding one job fitted in embedded mode, and that job's submission arguments."""
    store = str(tmp_path / "store")
    dataset = save_dataset(synthesize(seasons=1, scenarios=40, seed=4, drivers_per_race=10, pool_size=12),
                           tmp_path / "season.nc")
    embedded = CalibrationClient(Settings(storage_url=store, compile_cache_dir=None, convergence=LOOSE,
                                          warm_start=False))
    job_id = embedded.submit(dataset, "intermediate", **SMALL)
    record = embedded.status(job_id)
    assert record.state is JobState.SUCCEEDED
    return store, dataset, job_id, embedded


def _stored_summary_bytes(client: CalibrationClient, job_id: str) -> bytes:
    return client.store.get_bytes(summary_key("intermediate", job_id))


def test_the_fleet_neither_reruns_nor_overwrites_a_job_fitted_embedded(fitted_embedded, redis_url):
    store, dataset, job_id, embedded = fitted_embedded
    before = _stored_summary_bytes(embedded, job_id)
    fleet = CalibrationClient(Settings(storage_url=store, broker_url=redis_url, compile_cache_dir=None,
                                       convergence=LOOSE, warm_start=False))
    assert fleet.submit(dataset, "intermediate", **SMALL) == job_id
    record = fleet.status(job_id)
    assert record.state is JobState.SUCCEEDED  # repaired from the store
    assert record.summary_uri == fleet.store.uri(summary_key("intermediate", job_id))
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen(CPU_QUEUE) == 0  # nothing was queued for a worker
    assert _stored_summary_bytes(fleet, job_id) == before
    assert fleet.result(job_id).job_id == job_id


def test_latest_gives_the_same_answer_in_both_modes(fitted_embedded, redis_url):
    store, _, job_id, embedded = fitted_embedded
    fleet = CalibrationClient(Settings(storage_url=store, broker_url=redis_url, compile_cache_dir=None))
    assert embedded.latest("intermediate").job_id == job_id
    assert fleet.latest("intermediate").job_id == job_id  # the registry learnt the store's fits
    assert fleet.latest("intermediate", "top_5").job_id == job_id
    assert set(fleet.latest_pointers(["intermediate"])) == set(embedded.latest_pointers(["intermediate"]))
    with pytest.raises(Exception, match="no converged calibration"):
        fleet.latest("road_course")


def test_a_message_that_reaches_a_worker_anyway_is_answered_from_the_store(fitted_embedded, redis_url):
    store, dataset, job_id, _ = fitted_embedded
    settings = Settings(storage_url=store, broker_url=redis_url, compile_cache_dir=None, warm_start=False)
    fleet = CalibrationClient(settings)
    job = fleet.make_job(dataset, "intermediate", **SMALL)
    assert job.job_id == job_id
    before = _stored_summary_bytes(fleet, job_id)
    heard = []
    result = process(Services(settings, fleet.store, fleet.registry),
                     Delivery(job.to_message(), worker="w@test", on_progress=heard.append))
    assert result["job_id"] == job_id and "diagnostics" in result  # the stored summary, as a finished job returns it
    assert heard == []  # no phase began: nothing was loaded, compiled or sampled
    assert fleet.status(job_id).state is JobState.SUCCEEDED
    assert _stored_summary_bytes(fleet, job_id) == before

"""CalibrationClient: waiting rides through outages, cancel and jobs, on a real store's records.

The registry is the real StoreRegistry on a tmp folder; an outage is a
registry whose reads fail for a while, as a Redis client's do when the
server is down (the subprocess tests in test_exit_codes.py use a real one).
"""

from __future__ import annotations

import threading
import time

import pytest

from producer.client import CalibrationClient, JobDidNotSucceed
from shared.contract.errors import BrokerUnavailable, NotFound
from shared.contract.job import JobState
from shared.jobs.registry import StoreRegistry, WaitTimeout
from shared.storage.store import Store
from tests.test_catalog import make_summary
from tests.test_registry import make_job


class FlakyRegistry(StoreRegistry):
    """A StoreRegistry whose reads fail while ``down`` is set."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.down_until = 0.0
        self.failures = 0

    def find(self, job_id: str):
        if time.monotonic() < self.down_until:
            self.failures += 1
            raise BrokerUnavailable("Redis unavailable at redis://127.0.0.1:1/0: ConnectionError")
        return super().find(job_id)


@pytest.fixture
def client(settings) -> CalibrationClient:
    store = Store.from_settings(settings)
    return CalibrationClient(settings, store=store, registry=FlakyRegistry(store))


def test_wait_rides_through_an_outage_and_says_so(client):
    job = make_job()
    client.registry.claim(job)
    client.registry.mark_running(job.job_id, worker="w")
    client.registry.down_until = time.monotonic() + 1.5
    heard: list[tuple[str, float]] = []

    def finish() -> None:  # the worker's write, once Redis is back
        time.sleep(2.0)
        client.registry.succeed(job.job_id, make_summary(job.job_id, store=client.store))

    threading.Thread(target=finish).start()
    summary = client.wait(job.job_id, timeout=30, on_outage=lambda exc, left: heard.append((str(exc), left)))
    assert summary.job_id == job.job_id
    assert heard and all("Redis unavailable" in text and 0 < left <= 30 for text, left in heard)
    assert client.registry.failures == len(heard)


def test_wait_gives_up_with_the_outage_when_it_lasts_the_whole_timeout(client):
    job = make_job()
    client.registry.claim(job)
    client.registry.down_until = time.monotonic() + 3600
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        client.wait(job.job_id, timeout=1.5, on_outage=lambda *_: None)
    assert 1.5 <= time.monotonic() - start < 5


def test_wait_times_out_when_the_fleet_answers_and_the_job_runs_on(client):
    job = make_job()
    client.registry.claim(job)
    client.registry.mark_running(job.job_id, worker="w")
    with pytest.raises(WaitTimeout):
        client.wait(job.job_id, timeout=0.5)


def test_cancel_jobs_and_a_cancelled_wait(client):
    queued, running = make_job(seed=1), make_job(seed=2)
    for job in (queued, running):
        client.registry.claim(job)
    client.registry.mark_running(running.job_id, worker="w")

    record, changed = client.cancel(queued.job_id, reason="wrong window")
    assert changed and record.state is JobState.CANCELLED
    with pytest.raises(JobDidNotSucceed) as info:
        client.wait(queued.job_id, timeout=5)
    assert info.value.status.state is JobState.CANCELLED and "wrong window" in str(info.value)
    with pytest.raises(JobDidNotSucceed):
        client.result(queued.job_id)

    record, changed = client.cancel(running.job_id)
    assert changed and record.state is JobState.RUNNING and record.cancel_requested
    assert [r.job_id for r in client.jobs(state="running")] == [running.job_id]
    assert [r.job_id for r in client.jobs()] == [running.job_id, queued.job_id]
    with pytest.raises(NotFound):
        client.cancel("cj-000000000000000000000000")

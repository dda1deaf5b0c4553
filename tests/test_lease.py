"""shared.jobs.lease against a real redis-server: leases, claims, the heartbeat, the reaper's lock."""

from __future__ import annotations

import time

import pytest
import redis

from shared.jobs.lease import Heartbeat, Leases

pytestmark = pytest.mark.integration

MESSAGE = {"job_id": "cj-1", "archetype": "intermediate"}


@pytest.fixture
def leases(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield Leases(client, lease_s=0.5)
    client.close()


def test_one_lease_per_job(leases):
    first = leases.acquire("cj-1", "w0", message=MESSAGE, attempt=2, queue="calq.cpu")
    assert first is not None and leases.holder("cj-1") == "w0"
    assert leases.acquire("cj-1", "w1", message=MESSAGE) is None  # a duplicate delivery is not run
    assert leases.resend_info("cj-1") == {"message": MESSAGE, "attempt": 2, "queue": "calq.cpu"}
    assert leases.release(first)
    second = leases.acquire("cj-1", "w1", message=MESSAGE)
    assert second is not None and second.token > first.token  # fencing tokens only grow


def test_a_renewed_lease_outlives_its_term_and_a_lapsed_one_is_claimed_once(leases):
    lease = leases.acquire("cj-1", "w0", message=MESSAGE)
    for _ in range(4):
        time.sleep(0.2)
        assert leases.renew(lease)
    assert leases.lapsed() == []
    time.sleep(0.7)  # no renewal: it lapses
    assert leases.holder("cj-1") is None
    assert leases.lapsed() == ["cj-1"]
    assert leases.lapsed() == []  # claimed once: a second reaper finds nothing
    assert not leases.renew(lease)  # the worker learns it lost the job
    assert not leases.release(lease)


def test_a_lapsed_lease_nobody_claimed_is_taken_again_by_its_worker(leases):
    lease = leases.acquire("cj-1", "w0", message=MESSAGE)
    time.sleep(0.7)  # e.g. Redis was out for longer than the lease
    assert leases.renew(lease)
    assert leases.holder("cj-1") == "w0" and leases.lapsed() == []


def test_another_workers_lease_is_never_touched(leases):
    old = leases.acquire("cj-1", "w0", message=MESSAGE)
    time.sleep(0.7)
    assert leases.lapsed() == ["cj-1"]
    new = leases.acquire("cj-1", "w1", message=MESSAGE)
    assert not leases.renew(old) and not leases.release(old)
    assert leases.holder("cj-1") == "w1"
    assert leases.renew(new)


def test_the_supervisor_claims_what_its_dead_child_held(leases):
    assert leases.claim_held("w0") is None
    lease = leases.acquire("cj-1", "w0", message=MESSAGE)
    assert leases.claim_held("w0") == "cj-1"
    assert leases.holder("cj-1") is None
    assert leases.claim_held("w0") is None and leases.lapsed() == []  # claimed once
    assert not leases.renew(lease)
    # a child that released its job holds nothing
    other = leases.acquire("cj-2", "w1", message=MESSAGE)
    leases.release(other)
    assert leases.claim_held("w1") is None


def test_the_heartbeat_keeps_the_lease_and_reports_its_loss(leases):
    lease = leases.acquire("cj-1", "w0", message=MESSAGE)
    with Heartbeat(leases, lease, interval_s=0.1) as beat:
        time.sleep(1.2)
        assert leases.holder("cj-1") == "w0" and not beat.lost.is_set()
        assert leases.claim_held("w0") == "cj-1"  # the job was handed back behind its back
        assert beat.lost.wait(2)


def test_the_reaper_lock_has_one_holder_per_period(leases):
    assert leases.try_lock("reaper", 0.3)
    assert not leases.try_lock("reaper", 0.3)
    time.sleep(0.4)
    assert leases.try_lock("reaper", 0.3)

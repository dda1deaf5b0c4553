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


# -- handing back, with the real registry and a local store ---------------------------------


@pytest.fixture
def fleet(redis_url, tmp_path):
    from shared.contract.settings import Settings
    from shared.jobs.registry import RedisRegistry
    from shared.jobs.services import Services
    from shared.storage.store import Store

    client = redis.Redis.from_url(redis_url)
    sent: list[tuple[dict, int, str | None]] = []
    services = Services(Settings(storage_url=f"file://{tmp_path}"), Store(f"file://{tmp_path}"), RedisRegistry(client),
                        Leases(client, lease_s=0.6),
                        lambda message, *, attempt=0, queue=None: sent.append((message, attempt, queue)))
    yield {"registry": services.registry, "leases": services.leases, "store": services.store, "sent": sent,
           "services": services}
    client.close()


def running_job(fleet, seed: int = 0):
    from shared.contract.job import Progress
    from tests.test_registry import make_job

    job = make_job(seed)
    reg = fleet["registry"]
    reg.claim(job)
    reg.record_delivery(job.job_id, 0)
    reg.mark_running(job.job_id, worker="w0")
    reg.progress(job.job_id, Progress(phase="sampling", fraction=0.4))
    lease = fleet["leases"].acquire(job.job_id, "w0", message=job.to_message(), attempt=0, queue="calq.cpu")
    return job, lease


def back(fleet, job_id, *, count_delivery):
    from shared.jobs.lease import hand_back

    return hand_back(job_id, services=fleet["services"], reason="test", count_delivery=count_delivery)


@pytest.mark.parametrize("count_delivery", [True, False])
def test_a_dead_childs_job_is_requeued_and_published_again(fleet, count_delivery):
    from shared.contract.job import JobState

    job, _ = running_job(fleet)
    assert fleet["leases"].claim_held("w0") == job.job_id
    assert back(fleet, job.job_id, count_delivery=count_delivery) == "requeued"
    record = fleet["registry"].get(job.job_id)
    assert record.state is JobState.QUEUED and record.progress is None and record.worker is None
    assert record.deliveries == (1 if count_delivery else 0)  # a shutdown's hand-back does not count
    assert fleet["sent"] == [(job.to_message(), 0, "calq.cpu")]


def test_a_finished_job_is_repaired_from_the_store_never_run_again(fleet):
    from shared.contract.job import JobState
    from tests.test_catalog import make_summary

    job, _ = running_job(fleet)
    make_summary(job.job_id, store=fleet["store"])  # the worker wrote it, then died before recording it
    assert fleet["leases"].claim_held("w0") == job.job_id
    assert back(fleet, job.job_id, count_delivery=True) == "repaired"
    record = fleet["registry"].get(job.job_id)
    assert record.state is JobState.SUCCEEDED and record.summary_uri
    assert fleet["sent"] == []
    assert fleet["registry"].latest("intermediate", "top_5").job_id == job.job_id


def test_the_reaper_hands_back_lapsed_leases_once_and_counts_the_delivery(fleet):
    from shared.contract.job import JobState
    from shared.jobs.lease import Reaper

    job, _ = running_job(fleet)
    other, lease = running_job(fleet, seed=1)
    reaper = Reaper(fleet["services"], interval_s=0.2)
    assert reaper.run_once() == {}  # leases still live
    time.sleep(0.8)
    fleet["leases"].renew(lease)  # the other job's worker is alive: it took its lapsed lease again
    assert reaper.run_once() == {job.job_id: "requeued"}
    assert fleet["registry"].get(job.job_id).state is JobState.QUEUED
    assert fleet["registry"].get(job.job_id).deliveries == 1
    assert fleet["registry"].get(other.job_id).state is JobState.RUNNING
    time.sleep(0.2)  # the lock's period
    fleet["leases"].renew(lease)
    assert reaper.run_once() == {}  # handed back once
    assert len(fleet["sent"]) == 1


def test_a_failed_record_keeps_no_stale_progress(fleet):
    job, _ = running_job(fleet)
    fleet["registry"].fail(job.job_id, "boom")
    assert fleet["registry"].get(job.job_id).progress is None


def test_reindex_repairs_every_record_the_store_proves_finished(fleet):
    from shared.contract.job import JobState
    from shared.jobs.submissions import repair_from_store
    from shared.storage.catalog import Catalog
    from tests.test_catalog import make_summary
    from tests.test_registry import make_job

    reg, store = fleet["registry"], fleet["store"]
    running, _ = running_job(fleet)
    flushed, done, pending = make_job(1), make_job(2), make_job(3)
    reg.claim(done)
    reg.mark_running(done.job_id, worker="w0")
    reg.claim(pending)
    for job in (running, flushed, done):
        summary = make_summary(job.job_id, store=store)
        if job is done:
            reg.succeed(done.job_id, summary)
    before = reg.get(done.job_id)
    repaired = repair_from_store(reg, Catalog(store))
    assert sorted(repaired) == sorted([running.job_id, flushed.job_id])
    assert reg.get(running.job_id).state is JobState.SUCCEEDED
    assert reg.get(flushed.job_id).state is JobState.SUCCEEDED  # the record came back after a flush
    assert reg.get(done.job_id) == before  # left alone
    assert reg.get(pending.job_id).state is JobState.QUEUED  # nothing in the store: nothing to repair


def test_the_record_counts_sampler_runs_across_deliveries(fleet):
    job, _ = running_job(fleet)
    reg = fleet["registry"]
    assert reg.get(job.job_id).sampler_runs == 0
    reg.count_sampler_run(job.job_id)
    fleet["leases"].claim_held("w0")
    back(fleet, job.job_id, count_delivery=True)
    reg.mark_running(job.job_id, worker="w1")
    reg.count_sampler_run(job.job_id)
    assert reg.get(job.job_id).sampler_runs == 2  # re-queueing keeps the count


# -- planted leases: a lease lives by its renewal time, never by its key's TTL (issue 16) ------------------

TEN_YEARS_S = 10 * 365 * 24 * 3600


def server_ms(client) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


@pytest.mark.parametrize("planted", [
    "deadworker|999",  # the old format: no renewal time
    "deadworker|999|0",  # renewed in 1970
    "deadworker|999|99999999999999",  # "renewed" in the year 5138
    "\x00\xff garbage",
])
def test_a_planted_lease_with_a_ten_year_ttl_never_blocks_a_delivery(leases, planted):
    leases.redis.set(leases.lease_key("cj-1"), planted.encode("latin-1"), ex=TEN_YEARS_S)
    assert leases.holder("cj-1") is None
    lease = leases.acquire("cj-1", "w1", message=MESSAGE)
    assert lease is not None and leases.holder("cj-1") == "w1"  # the delivery runs
    assert 0 < leases.redis.pttl(leases.lease_key("cj-1")) <= 500  # the TTL is the lease code's, bounded
    assert leases.renew(lease) and leases.release(lease)


def test_a_lease_key_of_another_type_is_taken_over(leases):
    leases.redis.hset(leases.lease_key("cj-1"), "x", "y")
    leases.redis.expire(leases.lease_key("cj-1"), TEN_YEARS_S)
    lease = leases.acquire("cj-1", "w1", message=MESSAGE)
    assert lease is not None and leases.holder("cj-1") == "w1"


def test_a_lease_not_renewed_is_reaped_whatever_its_ttl(fleet):
    from shared.contract.job import JobState
    from shared.jobs.lease import Reaper

    leases, client = fleet["leases"], fleet["registry"].redis
    job, lease = running_job(fleet)
    stale = f"w0|{lease.token}|{server_ms(client) - 5_000}"  # last renewed 5 s ago; the lease is 0.6 s
    client.set(leases.lease_key(job.job_id), stale, ex=TEN_YEARS_S)
    garbage, _ = running_job(fleet, seed=1)
    client.set(leases.lease_key(garbage.job_id), b"\x1b[2J not a lease", ex=TEN_YEARS_S)
    reaper = Reaper(fleet["services"], interval_s=0.2)
    assert reaper.run_once() == {job.job_id: "requeued", garbage.job_id: "requeued"}
    for job_id in (job.job_id, garbage.job_id):
        assert fleet["registry"].get(job_id).state is JobState.QUEUED
        assert client.exists(leases.lease_key(job_id)) == 0  # the stale key went with the claim
    assert not leases.renew(lease)  # the worker that held it has lost it
    again = leases.acquire(job.job_id, "w1", message=job.to_message())
    assert again is not None and again.token > lease.token  # the re-published delivery runs
    assert {m["job_id"] for m, _, _ in fleet["sent"]} == {job.job_id, garbage.job_id}


def test_a_renewed_lease_is_never_reaped_or_taken(fleet):
    from shared.jobs.lease import Reaper

    leases = fleet["leases"]
    job, lease = running_job(fleet)
    reaper = Reaper(fleet["services"], interval_s=0.1)
    with Heartbeat(leases, lease, interval_s=0.1) as beat:
        for _ in range(8):  # 1.6 s: well past the 0.6 s lease
            time.sleep(0.2)
            assert reaper.run_once() == {}
            assert leases.acquire(job.job_id, "w1", message=job.to_message()) is None
        assert not beat.lost.is_set() and leases.holder(job.job_id) == "w0"
    assert fleet["sent"] == []


def test_a_reaper_that_lost_redis_gives_every_holder_a_lease_to_renew_before_judging(fleet):
    """Through a Redis outage nobody could renew: a lease's age is no evidence until each holder had lease_s again."""
    from shared.contract.job import JobState
    from shared.jobs.lease import Reaper

    leases, client = fleet["leases"], fleet["registry"].redis
    job, lease = running_job(fleet)
    client.set(leases.lease_key(job.job_id), f"w0|{lease.token}|{server_ms(client) - 5_000}")  # 5 s without renewal
    reaper = Reaper(fleet["services"], interval_s=0.1)
    real_try_lock = leases.try_lock
    leases.try_lock = lambda *a, **k: (_ for _ in ()).throw(redis.ConnectionError("Redis is restarting"))
    with pytest.raises(redis.ConnectionError):
        reaper.run_once()
    leases.try_lock = real_try_lock
    assert reaper.run_once() == {}  # back, with a lease 5 s stale: within the grace it is not judged
    with Heartbeat(leases, lease, interval_s=0.1) as beat:  # the holder renews again
        time.sleep(0.7)  # the grace (0.6 s) is over; the lease is live
        assert reaper.run_once() == {}
        assert not beat.lost.is_set()
    assert fleet["registry"].get(job.job_id).state is JobState.RUNNING and fleet["sent"] == []
    time.sleep(0.7)  # now it stops renewing: reaped as usual
    assert reaper.run_once() == {job.job_id: "requeued"}

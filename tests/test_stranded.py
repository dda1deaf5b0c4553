"""shared.jobs.stranded against a real redis-server: a queued record whose message was lost is sent again by reindex.

The messages are Celery's own (sent by the client on the broker the tests'
redis-server is), so the check reads what kombu really writes.
"""

from __future__ import annotations

import json

import pytest

from shared.jobs.stranded import named_jobs
from tests.test_registry import make_job

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_url, tmp_path):
    from producer.client import CalibrationClient
    from shared.contract.settings import Settings

    return CalibrationClient(Settings(broker_url=redis_url, storage_url=str(tmp_path / "store"), compile_cache_dir=None))


def submit(client, seed, *, queue="calq.cpu", send=True):
    """A job as the client records one: a queued record, its submission, and (``send``) its message on ``queue``."""
    from shared.jobs.submissions import record_submission

    job = make_job(seed)
    client.registry.claim(job)
    record_submission(client.store, job, queue=queue)
    if send:
        client.send(job.to_message(), queue)
    return job


def reindex(client, **options):
    from shared.jobs.submissions import reindex as rebuild

    return rebuild(registry=client.registry, store=client.store, publish=client.send, leases=client.services.leases,
                   **options)


def queued_ids(redis, queue):
    return [job_id for raw in redis.lrange(queue, 0, -1) for job_id in named_jobs(raw)]


def test_reindex_sends_again_only_the_queued_jobs_whose_message_is_nowhere(client):
    from shared.jobs.celery_app import make_app
    from shared.jobs.lanes import BatchLanes

    redis, leases = client.registry.redis, client.services.leases
    purged = submit(client, 0)
    redis.delete("calq.cpu")  # `celery purge`, or a flush that the record outlived
    delivered = submit(client, 2)  # a worker has its message, unacknowledged (kombu's unacked hash), and no lease yet
    redis.hset("unacked", "tag-1", json.dumps([json.loads(redis.rpop("calq.cpu")), "", "calq.cpu"]))
    waiting = submit(client, 1)
    in_a_batch = submit(client, 3, send=False)
    batch = make_app(client.settings).send_task("calq.calibrate_batch", args=[[in_a_batch.to_message()]], queue="calq.cpu")
    held = submit(client, 4, send=False)
    BatchLanes(redis, prefix=client.registry.prefix).hold("owner", held.to_message(), "calq.cpu.batch")
    running = submit(client, 5, send=False)  # its worker took the message and holds the lease
    leases.acquire(running.job_id, "w0", message=running.to_message(), queue="calq.cpu")
    redis.rpush("calq.cpu", b"\x00 not a message")
    from_its_lease = make_job(6)  # submitted before submissions were recorded: its last lease kept its message
    client.registry.claim(from_its_lease)
    leases.release(leases.acquire(from_its_lease.job_id, "w1", message=from_its_lease.to_message(), queue="calq.gpu"))
    forgotten = make_job(7)  # neither a submission nor a lease kept it: logged, left queued
    client.registry.claim(forgotten)

    assert reindex(client, grace_s=3600)["resent"] == 0  # every record is younger than the grace
    assert redis.llen("calq.cpu") == 3 and redis.llen("calq.gpu") == 0
    done = reindex(client, grace_s=0)
    assert done == {"pointers": 0, "repaired": 0, "requeued": 0, "resent": 2}
    assert sorted(queued_ids(redis, "calq.cpu")) == sorted([waiting.job_id, batch.id, in_a_batch.job_id, purged.job_id])
    assert queued_ids(redis, "calq.gpu") == [from_its_lease.job_id]  # the queue its lease kept
    assert redis.hlen("unacked") == 1 and BatchLanes(redis, prefix=client.registry.prefix).held() == {"owner": 1}
    jobs = (purged, waiting, delivered, in_a_batch, held, running, from_its_lease, forgotten)
    assert all(client.registry.get(j.job_id).state.value == "queued" for j in jobs)
    assert reindex(client, grace_s=0)["resent"] == 0  # sent once: now their messages are in their queues


def test_a_message_that_does_not_parse_names_no_job():
    assert named_jobs(b"") == set() and named_jobs(b"[1, 2]") == set() and named_jobs(b'{"body": 3}') == set()
    forged = json.dumps({"headers": {"id": ["x"]}, "body": "bm90IGpzb24=", "properties": {"body_encoding": "base64"}})
    assert named_jobs(forged) == set()

"""Hostile messages against a real worker, and no secret anywhere (issue 8).

A real ``calq worker --gpus none`` serves a password-protected redis-server
and moto's S3 server. Malformed messages are sent as a careless or hostile
producer would (straight through Celery, not through the client): one that
fails to parse, or whose content does not give its job id, changes no record
(it is counted in ``calq:invalid``); a well-formed job that reaches for data
outside the store, or above the worker's caps, ends ``rejected`` with the
specific reason. Afterwards no secret from the settings (the Redis password,
the S3 secret key) is in any log line of the worker, any record, any reason,
``calq config`` or ``calq status``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shared.contract.errors import AuthenticationFailed, DatasetNotAllowed
from shared.contract.job import CalibrationJob, JobState, JobStatus, SamplerSettings, utcnow
from shared.contract.settings import S3Settings, Settings
from shared.jobs.celery_app import TASK_NAME, make_app, queue_for
from shared.jobs.registry import RedisRegistry
from shared.storage.store import Store, dataset_key
from tests.services import S3_REGION, _stop, free_port, s3_client

pytestmark = pytest.mark.integration

REDIS_PASSWORD = "rp-" + secrets.token_hex(16)
S3_KEY_ID = "calq-worker"
S3_SECRET = "s3-" + secrets.token_hex(16)
SAMPLER = SamplerSettings(warmup=10, samples=10, chains=1)
MARKUP = "r[/red][link=x]x[/link][/]"


@pytest.fixture(scope="module")
def fleet(s3_server, tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH") if not os.environ.get("CI") else pytest.fail("no redis-server")
    root = tmp_path_factory.mktemp("hostile-fleet")
    port = free_port()
    redis_proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--requirepass", REDIS_PASSWORD, "--dir", str(root)],
        stdout=open(root / "redis.log", "wb"), stderr=subprocess.STDOUT,
    )
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
    bucket = "calq-hostile"
    import boto3

    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET,
                 region_name=S3_REGION).create_bucket(Bucket=bucket)
    s3_client(s3_server).create_bucket(Bucket="another-bucket")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CALQ_")}
    environ.update(
        CALQ_BROKER_URL=url,
        CALQ_STORAGE_URL=f"s3://{bucket}/calq",
        CALQ_S3__ENDPOINT_URL=s3_server,
        CALQ_S3__ACCESS_KEY_ID=S3_KEY_ID,
        CALQ_S3__SECRET_ACCESS_KEY=S3_SECRET,
        CALQ_S3__REGION=S3_REGION,
        CALQ_COMPILE_CACHE_DIR="",
        CALQ_LOG_LEVEL="DEBUG",
    )
    settings = Settings(
        broker_url=url, storage_url=f"s3://{bucket}/calq", compile_cache_dir=None,
        s3=S3Settings(endpoint_url=s3_server, access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET, region=S3_REGION),
    )
    registry = RedisRegistry.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            registry.redis.ping()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    log = open(root / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--gpus", "none"],
                              env=environ, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    yield {"environ": environ, "settings": settings, "registry": registry, "root": root,
           "store": Store.from_settings(settings, cache_dir=root / "cache"), "app": make_app(settings)}
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()
        _stop(redis_proc)


def send(fleet, *args: Any, task_id: str | None = None) -> None:
    fleet["app"].send_task(TASK_NAME, args=list(args), task_id=task_id or secrets.token_hex(8),
                           queue=queue_for("calq.cpu"))


def wait_for(predicate, *, timeout: float = 120, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def a_job(**over: Any) -> CalibrationJob:
    sha = over.pop("sha", hashlib.sha256(b"x").hexdigest())
    fields: dict[str, Any] = {"archetype": "superspeedway", "dataset_uri": f"s3://calq-hostile/calq/datasets/{sha}.nc",
                              "dataset_sha256": sha, "sampler": SAMPLER}
    return CalibrationJob(**{**fields, **over})


def test_hostile_messages_change_no_record_and_hostile_jobs_are_rejected(fleet):
    registry: RedisRegistry = fleet["registry"]
    store: Store = fleet["store"]

    # A job that succeeded earlier (its record as the fleet left it).
    done = a_job(events="top_3,top_7")
    record = JobStatus(job_id=done.job_id, archetype=done.archetype, state=JobState.SUCCEEDED,
                       submitted_at=utcnow(), finished_at=utcnow(), summary_uri="s3://calq-hostile/calq/x.json",
                       posterior_uri="s3://calq-hostile/calq/x.nc")
    registry.redis.set(f"{registry.prefix}:job:{done.job_id}", record.model_dump_json())
    before = registry.get(done.job_id)
    good = done.to_message()

    invalid_messages: dict[str, Any] = {
        "only a job_id": {"job_id": done.job_id},
        "a bad hash": {**good, "dataset_sha256": "zz"},
        "content that gives another id": {**good, "events": ["top_4"]},
        "an extra field": {**good, "evil": True},
        "an unknown model version": {**good, "model_version": "logit-hier/999"},
        "an unknown archetype": {**good, "archetype": "dirt_track"},
        "a 10 kB dataset URI": {**good, "dataset_uri": "s3://calq-hostile/" + "a" * 10_000},
        "an unknown event": {**good, "events": ["bottom_5"]},
        "a negative window": {**good, "window_days": -1},
        "no job_id at all": {k: v for k, v in good.items() if k != "job_id"},
        "a markup job_id": {**good, "job_id": MARKUP},
        "a list": [good],
        "a string": json.dumps(good),
        "a number": 42,
        "null": None,
    }
    count0 = registry.invalid_count()
    for message in invalid_messages.values():
        send(fleet, message)
    # Two positional arguments: the task's signature refuses it (on_failure must not touch the record).
    send(fleet, good, "surplus")

    # Well-formed jobs that reach for what is not theirs, or ask too much: rejected, each with its reason.
    hostile_jobs = {
        "file:///proc/self/environ": (a_job(dataset_uri="file:///proc/self/environ"), DatasetNotAllowed.MESSAGE),
        "file:///etc/passwd": (a_job(dataset_uri="file:///etc/passwd"), DatasetNotAllowed.MESSAGE),
        "another bucket": (a_job(dataset_uri="s3://another-bucket/calq/datasets/" + "a" * 64 + ".nc",
                                 sha="a" * 64), DatasetNotAllowed.MESSAGE),
        "dot-dot in the key": (a_job(dataset_uri="s3://calq-hostile/calq/datasets/../../another-bucket/x.nc"),
                               DatasetNotAllowed.MESSAGE),
        "64 chains": (a_job(sampler=SamplerSettings(warmup=10, samples=10, chains=64)), "limits.max_chains"),
        "200k draws": (a_job(sampler=SamplerSettings(warmup=100_000, samples=100_000, chains=1)),
                       "limits.max_draws_per_chain"),
    }
    junk = b"this is not a NetCDF file"
    junk_sha = hashlib.sha256(junk).hexdigest()
    store.put_bytes(dataset_key(junk_sha), junk)
    hostile_jobs["junk at its content address"] = (a_job(sha=junk_sha), "the file is not NetCDF")
    for job, _ in hostile_jobs.values():
        send(fleet, job.to_message(), task_id=job.job_id)  # no record first: as if sent around the producer

    for name, (job, reason) in hostile_jobs.items():
        status = wait_for(lambda job=job: (r := registry.find(job.job_id)) and r.state.finished and r,
                          what=name)
        assert status.state is JobState.REJECTED, (name, status)
        assert reason in (status.reason or ""), (name, status.reason)
        assert "Traceback" not in (status.reason or "")
        if reason == DatasetNotAllowed.MESSAGE:
            assert status.reason == reason, name  # the same one message, nothing from the target
    assert not store.exists(dataset_key(junk_sha))  # its own bytes failed: deleted from the store

    wait_for(lambda: registry.invalid_count() >= count0 + len(invalid_messages), what="invalid messages counted")
    time.sleep(2)  # the surplus-argument message, after the others
    assert registry.get(done.job_id) == before, "a malformed message changed an existing record"
    reasons = [entry.get("reason", "") for entry in registry.invalid_messages(limit=200)]
    assert any("job_id" in r for r in reasons)

    check_no_secret_anywhere(fleet, [job.job_id for job, _ in hostile_jobs.values()] + [done.job_id])


def check_no_secret_anywhere(fleet, job_ids: list[str]) -> None:
    registry: RedisRegistry = fleet["registry"]
    texts = {"worker log": (fleet["root"] / "worker.log").read_text()}
    for job_id in job_ids:
        texts[f"record {job_id}"] = registry.get(job_id).model_dump_json()
    texts["invalid stream"] = json.dumps(registry.invalid_messages(limit=500))
    env = fleet["environ"]
    for command in (["config"], ["status", job_ids[0]], ["status", "cj-000000000000000000000000"]):
        done = subprocess.run([sys.executable, "-m", "producer.cli", *command], env=env, capture_output=True,
                              text=True, timeout=120, cwd=fleet["root"])
        texts[f"calq {' '.join(command)}"] = done.stdout + done.stderr
    config = json.loads(texts["calq config"][texts["calq config"].index("{"):])
    assert config["s3"]["secret_access_key"] == "***" and "***" in config["broker_url"]
    assert "Traceback" not in texts["calq status cj-000000000000000000000000"]
    for where, text in texts.items():
        assert REDIS_PASSWORD not in text, f"the Redis password is in {where}"
        assert S3_SECRET not in text, f"the S3 secret is in {where}"
    assert len(texts["worker log"]) > 1000  # the worker did log: the check looked at something


def test_a_wrong_redis_password_is_authentication_failed(fleet):
    """Permanent, saying so, with the password out of the message (it was a retryable "unavailable")."""
    good = fleet["settings"].broker()
    wrong = good.replace(REDIS_PASSWORD, "not-the-password")
    with pytest.raises(AuthenticationFailed, match="authentication failed") as info:
        RedisRegistry.from_url(wrong).find("cj-000000000000000000000000")
    assert "not-the-password" not in str(info.value) and REDIS_PASSWORD not in str(info.value)
    env = {**fleet["environ"], "CALQ_BROKER_URL": wrong}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "status", "cj-000000000000000000000000"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=fleet["root"])
    assert done.returncode == 1 and "authentication failed" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "not-the-password" not in done.stderr
    # A worker stops at once, saying so, instead of Celery's reconnect loop (100 tries, as "Cannot connect").
    worker = subprocess.run([sys.executable, "-m", "producer.cli", "worker", "--gpus", "none"], env=env,
                            capture_output=True, text=True, timeout=120, cwd=fleet["root"])
    assert worker.returncode == 78 and "authentication failed" in worker.stderr, worker.stderr[-2000:]
    assert "not-the-password" not in worker.stderr + worker.stdout


def test_a_wrong_s3_secret_is_authentication_failed(fleet, tmp_path):
    """moto checks no signature, so the error is the one botocore raises for a refused key."""
    from botocore.exceptions import ClientError

    from shared.storage.store import storage_errors

    refused = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "no such key"},
                           "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    with pytest.raises(AuthenticationFailed, match="authentication failed at s3://b/k"):
        with storage_errors("s3://b/k"):
            raise PermissionError("denied") from refused
    assert Path(tmp_path).exists()  # (classify's answer to a refused key: tests/test_errors.py)


# -- bodies Celery cannot decode, messages asking to wait, the exact cap on calq:invalid (issue 16, part C) --------


def publish_raw(fleet, body: bytes, *, task_id: str) -> None:
    """A calibrate message with Celery's own headers and ``body`` as it is (declared JSON)."""
    app = fleet["app"]
    headers = app.amqp.as_task_v2(task_id, TASK_NAME, args=[{}]).headers
    with app.connection_for_write() as connection:
        connection.Producer().publish(
            body, exchange="calq", routing_key=queue_for("calq.cpu"), headers=headers,
            content_type="application/json", content_encoding="utf-8",
            declare=[app.amqp.queues[queue_for("calq.cpu")]],  # routed even before the worker declared it
        )


def newest_reasons(registry: RedisRegistry, n: int) -> list[str]:
    return [entry.get("reason", "") for entry in registry.invalid_messages(limit=n)]


def test_undecodable_bodies_are_counted_and_the_worker_carries_on(fleet):
    registry: RedisRegistry = fleet["registry"]
    count0 = registry.invalid_count()  # far below the cap here
    bodies = {
        "a JSON body nested 200k deep": b"[" * 200_000 + b"]" * 200_000,
        "not JSON": b"\x1b[2J{{{ not json",
        "not UTF-8": b'[[{"job_id": "\xff\xfe"}], {}, {}]',
    }
    for body in bodies.values():
        publish_raw(fleet, body, task_id=secrets.token_hex(8))
    wait_for(lambda: registry.invalid_count() >= count0 + len(bodies), what="every undecodable body counted")
    reasons = newest_reasons(registry, len(bodies))
    assert all(r.startswith("invalid job message: undecodable body (") for r in reasons), reasons
    assert "invalid job message: undecodable body (RecursionError)" in reasons
    assert not any("\x1b" in r or "not json" in r for r in reasons)  # nothing of the body is quoted
    send(fleet, {"job_id": "cj-after"})  # the worker is alive and refuses the next message as usual
    wait_for(lambda: registry.invalid_messages(limit=1)[0].get("job_id") == "cj-after",
             what="the worker refused the next message")


def test_messages_asking_to_wait_a_day_are_refused_never_parked(fleet):
    registry: RedisRegistry = fleet["registry"]
    n = 200
    for _ in range(n):
        fleet["app"].send_task(TASK_NAME, args=[a_job().to_message()], task_id=secrets.token_hex(8),
                               queue=queue_for("calq.cpu"), countdown=24 * 3600)
    wait_for(lambda: all("ETA or countdown lies more than max_eta_s" in r for r in newest_reasons(registry, n)),
             timeout=180, what="every message with a one-day ETA refused")
    redis_client = registry.redis
    wait_for(lambda: redis_client.llen(queue_for("calq.cpu")) == 0 and redis_client.hlen("unacked") == 0,
             what="nothing parked in the worker")  # all were acknowledged, none reserved for tomorrow
    assert registry.find(a_job().job_id) is None  # refused before the handler: no record


def test_calq_invalid_is_capped_exactly_after_a_worker_write(fleet):
    from shared.jobs.registry.base import INVALID_KEEP

    registry: RedisRegistry = fleet["registry"]
    key = f"{registry.prefix}:invalid"
    pipe = registry.redis.pipeline(transaction=False)
    for i in range(200_000):
        pipe.xadd(key, {"at": "planted", "job_id": "", "reason": f"planted {i}"})
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    assert registry.invalid_count() >= 200_000
    send(fleet, {"job_id": "cj-capped"})
    wait_for(lambda: registry.invalid_messages(limit=1)[0].get("job_id") == "cj-capped", what="the worker's write")
    assert registry.invalid_count() == INVALID_KEEP


def test_the_eta_bound_lets_calqs_own_retries_through_and_nothing_far_ahead():
    import datetime as dt

    from shared.contract.retry import TASK_RETRY_BACKOFF_MAX_S as RETRY_BACKOFF_MAX_S
    from worker.tasks import eta_refusal

    bound = Settings().max_eta_s
    assert bound >= RETRY_BACKOFF_MAX_S  # a retry's countdown is never refused
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert eta_refusal(None, max_eta_s=bound, now=now) is None
    assert eta_refusal((now + dt.timedelta(seconds=RETRY_BACKOFF_MAX_S)).isoformat(), max_eta_s=bound, now=now) is None
    assert "max_eta_s = 0 s" in eta_refusal(now + dt.timedelta(seconds=1), max_eta_s=0, now=now)
    assert "ETA or countdown" in eta_refusal(now + dt.timedelta(days=1), max_eta_s=bound, now=now)
    assert eta_refusal("\x1b[2J tomorrow", max_eta_s=bound, now=now) == "invalid job message: its ETA is not a date"

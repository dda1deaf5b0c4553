"""Hostile cases of issue 18, "Exactly once under partitions", that need no worker process.

A Redis that refuses writes (out of memory, cannot persist), dead
connections, a stale worker that lost its lease, a flushed Redis, a full
disk. The cases with real workers and supervisors are in the fault suite
(tests/test_faults.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.exceptions as rex

from shared.contract.errors import BrokerUnavailable, Outcome, classify, redis_refusing_writes
from shared.contract.settings import RecoverySettings, Settings
from shared.jobs.celery_app import celery_config
from shared.jobs.registry import RedisRegistry
from tests.test_registry import make_job

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def out_of_memory(url: str) -> Iterator[None]:
    """Redis at ``url`` refuses every write (``maxmemory 1`` under ``noeviction``) inside the block."""
    client = redis.Redis.from_url(url)
    before = client.config_get("maxmemory")["maxmemory"], client.config_get("maxmemory-policy")["maxmemory-policy"]
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    try:
        yield
    finally:
        client.config_set("maxmemory", before[0])
        client.config_set("maxmemory-policy", before[1])
        client.close()


# -- Redis refusing writes ------------------------------------------------------------------


@pytest.mark.parametrize("error", [
    rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    rex.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist"),
    rex.ReadOnlyError("You can't write against a read only replica."),
], ids=["oom", "misconf", "readonly"])
def test_a_redis_that_refuses_writes_for_now_is_transient(error):
    assert classify(error) is Outcome.RETRY
    why = redis_refusing_writes(RuntimeError("wrapped")) or redis_refusing_writes(error)
    assert why is not None and "refuses writes" in why and str(error) not in why  # calq's words, not the server's


def test_other_redis_answers_are_not_a_refusal_to_write():
    assert redis_refusing_writes(rex.ResponseError("ERR unknown command")) is None
    assert classify(rex.ResponseError("ERR unknown command")) is Outcome.FAIL


@pytest.mark.integration
def test_a_claim_on_a_redis_out_of_memory_is_broker_unavailable(redis_url):
    registry = RedisRegistry.from_url(redis_url)
    with out_of_memory(redis_url), pytest.raises(BrokerUnavailable, match="refuses writes: Redis is out of memory"):
        registry.claim(make_job())
    assert registry.find(make_job().job_id) is None  # nothing half-written


@pytest.mark.integration
def test_calq_submit_on_a_redis_out_of_memory_exits_5_with_one_line(redis_url, tmp_path):
    from shared.data.dataset import save_dataset
    from shared.data.synth import synthesize

    dataset = tmp_path / "season.nc"
    save_dataset(synthesize(seasons=1, scenarios=50, seed=3), dataset)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALQ_")}
    env.update(CALQ_BROKER_URL=redis_url, CALQ_STORAGE_URL=str(tmp_path / "store"), PYTHONPATH=str(ROOT))
    with out_of_memory(redis_url):
        done = subprocess.run([sys.executable, "-m", "producer.cli", "submit", str(dataset), "--archetype", "intermediate",
                               "--events", "top_5", "--warmup", "10", "--samples", "10", "--chains", "1"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 5, done.stderr[-2000:]
    assert "refuses writes: Redis is out of memory" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


# -- dead connections noticed in seconds ------------------------------------------------------


def test_every_redis_client_has_timeouts_keepalive_and_a_health_check(redis_url):
    recovery = RecoverySettings(redis_timeout_s=3, redis_keepalive_s=7, redis_health_check_s=9)
    registry = RedisRegistry.from_url(redis_url, recovery=recovery)
    kwargs = registry.redis.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 3 and kwargs["socket_connect_timeout"] == 3
    assert kwargs["socket_keepalive"] is True and kwargs["health_check_interval"] == 9
    assert set(kwargs["socket_keepalive_options"].values()) <= {7, 3}

    conf = celery_config(Settings(broker_url=redis_url, recovery=recovery))
    broker = conf["broker_transport_options"]
    assert broker["socket_timeout"] == 3 and broker["socket_keepalive"] is True and broker["health_check_interval"] == 9
    assert conf["redis_socket_timeout"] == 3 and conf["redis_socket_keepalive"] is True
    assert conf["redis_backend_health_check_interval"] == 9


# -- a worker that lost its lease writes nothing ------------------------------------------------


@pytest.fixture
def fleet(redis_url, tmp_path):
    """A registry, leases (0.6 s) and a file store on one real Redis; spooling under tmp_path/spool."""
    from shared.jobs.lease import Leases
    from shared.storage.store import Store

    client = redis.Redis.from_url(redis_url)
    settings = Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None,
                        recovery=RecoverySettings(spool_dir=tmp_path / "spool", lease_s=0.6, heartbeat_s=0.2))
    yield {"registry": RedisRegistry(client), "leases": Leases(client, lease_s=0.6), "client": client,
           "store": Store.from_settings(settings), "settings": settings}
    client.close()


def taken_over(fleet, job):
    """Worker A's lease lapses and is reaped; worker B takes the job: ``(lease_a, lease_b)``."""
    import time

    from shared.contract.job import Progress

    registry, leases = fleet["registry"], fleet["leases"]
    registry.claim(job)
    registry.mark_running(job.job_id, worker="a#1")
    lease_a = leases.acquire(job.job_id, "a#1", message=job.to_message())
    time.sleep(0.8)  # A is frozen: its lease lapses
    assert leases.lapsed() == [job.job_id]
    registry.requeue_abandoned(job.job_id, reason="lapsed", count_delivery=True)
    lease_b = leases.acquire(job.job_id, "b#2", message=job.to_message())
    registry.mark_running(job.job_id, worker="b#2")
    registry.progress(job.job_id, Progress(phase="sampling", fraction=0.69))
    return lease_a, lease_b


def spool_results(fleet, job):
    """Finished draws of ``job`` waiting in the spool (as a run leaves them before the store write)."""
    from shared.jobs.spool import spool_paths
    from shared.storage.store import summary_key
    from tests.test_catalog import make_summary

    posterior, summary = spool_paths(fleet["settings"].recovery, job.job_id)
    posterior.parent.mkdir(parents=True, exist_ok=True)
    posterior.write_bytes(os.urandom(256))
    summary.write_text(make_summary(job.job_id).model_copy(update={
        "dataset_sha256": job.dataset_sha256, "posterior_uri": None,
        "summary_uri": fleet["store"].uri(summary_key(job.archetype, job.job_id))}).model_dump_json())
    return posterior, summary


def resume(fleet, job, fence):
    from shared.jobs.spool import resume_spooled

    return resume_spooled(job, store=fleet["store"], settings=fleet["settings"], notify=lambda p: None, fence=fence)


def stored(fleet, job) -> list[str]:
    return sorted(fleet["store"].key_of(u) for u in fleet["store"].list("posteriors") if job.job_id in u)


@pytest.mark.integration
def test_a_stale_worker_changes_no_record_not_even_its_progress(fleet):
    from shared.contract.job import JobState, Progress
    from shared.jobs.lease import Fence, LeaseLost

    job = make_job(1)
    lease_a, lease_b = taken_over(fleet, job)
    stale = fleet["registry"].fenced(Fence(fleet["leases"], lease_a))
    with pytest.raises(LeaseLost, match="lease was lost before a record change"):
        stale.progress(job.job_id, Progress(phase="sampling", fraction=0.38))
    with pytest.raises(LeaseLost):
        stale.fail(job.job_id, "stale")
    record = fleet["registry"].get(job.job_id)
    assert record.state is JobState.RUNNING and record.worker == "b#2" and record.progress.fraction == 0.69
    owner = fleet["registry"].fenced(Fence(fleet["leases"], lease_b))
    assert owner.progress(job.job_id, Progress(phase="sampling", fraction=0.8)).progress.fraction == 0.8


@pytest.mark.integration
def test_a_stale_worker_writes_nothing_to_the_store_and_drops_its_spool(fleet):
    from shared.jobs.lease import Fence, LeaseLost

    job = make_job(2)
    lease_a, _ = taken_over(fleet, job)
    posterior, summary = spool_results(fleet, job)
    with pytest.raises(LeaseLost, match="before the posterior's upload"):
        resume(fleet, job, Fence(fleet["leases"], lease_a))
    assert stored(fleet, job) == []
    assert not posterior.exists() and not summary.exists()


class _Frozen:
    """A fence whose check passed just before the worker froze (the window between the check and the write)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def check(self, what: str) -> None:
        return None


@pytest.mark.integration
def test_of_two_runs_of_one_job_exactly_one_publishes_and_the_other_keeps_it(fleet):
    from shared.jobs.lease import Fence
    from shared.storage.catalog import Catalog

    job = make_job(3)
    lease_a, lease_b = taken_over(fleet, job)
    spool_results(fleet, job)
    published = resume(fleet, job, Fence(fleet["leases"], lease_b))  # B, the owner, publishes
    assert published.posterior_uri.endswith(f"{job.job_id}.t{lease_b.token}.nc")
    spool_results(fleet, job)
    kept = resume(fleet, job, _Frozen(lease_a.token))  # A wakes past its check: its conditional put loses
    assert kept == published
    keys = stored(fleet, job)
    assert keys == [f"posteriors/intermediate/{job.job_id}.json", f"posteriors/intermediate/{job.job_id}.t{lease_b.token}.nc"]
    assert Catalog(fleet["store"]).summary(job.job_id) == published  # the summary names the posterior in the store


@pytest.mark.integration
def test_a_summary_naming_another_jobs_fenced_posterior_is_refused(fleet):
    from shared.contract.errors import Unverified
    from shared.storage.catalog import Catalog
    from shared.storage.store import posterior_key, summary_key
    from tests.test_catalog import make_summary

    store = fleet["store"]
    job_id, other = "cj-000000000000000000000011", "cj-000000000000000000000012"
    for posterior, ok in [(posterior_key("intermediate", job_id, 7), True), (posterior_key("intermediate", other, 7), False),
                          (f"posteriors/intermediate/{job_id}.t7.nc.json", False)]:
        summary = make_summary(job_id).model_copy(update={"posterior_uri": store.uri(posterior), "summary_uri": None})
        store.put_bytes(summary_key("intermediate", job_id), summary.model_dump_json().encode())
        if ok:
            assert Catalog(store).read(store.uri(summary_key("intermediate", job_id))).posterior_uri == store.uri(posterior)
        else:
            with pytest.raises(Unverified):
                Catalog(store).read(store.uri(summary_key("intermediate", job_id)))


# -- a flushed Redis -----------------------------------------------------------------------


@pytest.mark.integration
def test_a_lease_lost_with_a_flushed_redis_is_reasserted_not_abandoned(fleet):
    from shared.contract.job import Progress
    from shared.jobs.lease import Fence

    leases, client = fleet["leases"], fleet["client"]
    for _ in range(5):
        client.incr(leases.token_key)  # tokens handed out before
    job = make_job(4)
    lease = leases.acquire(job.job_id, "a#1", message=job.to_message())
    client.flushall()
    fenced = fleet["registry"].fenced(Fence(leases, lease))
    assert fenced.progress(job.job_id, Progress(phase="sampling", fraction=0.5)) is None  # no record, but no LeaseLost
    assert leases.holder(job.job_id) == "a#1"  # re-asserted by the fence
    assert client.sismember(leases.leased_key, job.job_id)
    assert int(client.get(leases.token_key)) >= lease.token  # tokens keep growing after the flush
    assert leases.acquire(job.job_id, "b#2", message=job.to_message()) is None  # a redelivery is not run twice
    assert leases.renew(lease)


@pytest.mark.integration
def test_a_lease_handed_back_is_not_reasserted(fleet):
    job = make_job(5)
    lease_a, _ = taken_over(fleet, job)
    assert not fleet["leases"].renew(lease_a)
    assert fleet["leases"].holder(job.job_id) == "b#2"


@pytest.mark.integration
@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_conditional_put_lets_exactly_one_writer_win(where, tmp_path, request):
    from shared.storage.store import Store

    store = (Store.from_settings(request.getfixturevalue("s3_settings")) if where == "s3"
             else Store(str(tmp_path / "store")))
    uri = store.create_bytes("posteriors/intermediate/cj-1.json", b"first")
    with pytest.raises(FileExistsError):
        store.create_bytes("posteriors/intermediate/cj-1.json", b"second")
    assert store.get_bytes(uri) == b"first"
    assert store.list("posteriors") == [uri]  # no temporary left behind


@pytest.mark.integration
def test_the_final_record_change_waits_through_a_redis_out_of_memory(redis_url, tmp_path):
    from shared.jobs.registry.patient import PatientRegistry
    from tests.test_catalog import make_summary

    registry = RedisRegistry.from_url(redis_url)
    job = make_job(6)
    registry.claim(job)
    registry.mark_running(job.job_id, worker="a#1")
    client = redis.Redis.from_url(redis_url)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    pauses = []

    def freed(seconds):  # memory is freed while the worker waits
        pauses.append(seconds)
        client.config_set("maxmemory", "0")

    try:
        patient = PatientRegistry(registry, Settings(recovery=RecoverySettings(retry_first_s=1, retry_max_s=2)), sleep=freed)
        after = patient.succeed(job.job_id, make_summary(job.job_id).model_copy(update={"archetype": "intermediate"}))
    finally:
        client.config_set("maxmemory", "0")
        client.close()
    assert pauses == [1] and after is not None and after.state.value == "succeeded"


# -- submissions a flush cannot lose ------------------------------------------------------------


@pytest.mark.integration
def test_reindex_queues_again_every_submitted_job_the_registry_lost_and_only_those(fleet):
    from shared.jobs.submissions import record_submission, reindex
    from tests.test_catalog import make_summary

    store, registry = fleet["store"], fleet["registry"]
    finished, lost_job, queued = make_job(7), make_job(8), make_job(9, archetype="road_course")
    for job in (finished, lost_job, queued):
        record_submission(store, job, queue="calq.cpu")
    make_summary(finished.job_id, store=store)
    fleet["client"].flushall()  # the records and the queue list are gone
    registry.claim(queued)  # this one was submitted again meanwhile
    sent = []
    done = reindex(registry=registry, store=store, publish=lambda message, queue: sent.append((message["job_id"], queue)))
    assert sent == [(lost_job.job_id, "calq.cpu")]
    assert done == {"pointers": 1, "repaired": 1, "requeued": 1, "resent": 0}
    assert registry.get(lost_job.job_id).state.value == "queued"
    assert registry.get(finished.job_id).state.value == "succeeded"
    sent.clear()
    assert reindex(registry=registry, store=store, publish=lambda m, q: sent.append(m))["requeued"] == 0 and sent == []


@pytest.mark.integration
@pytest.mark.parametrize("planted", ["garbage", "another job's key", "unknown queue", "huge"])
def test_a_planted_submission_is_skipped_naming_its_key_never_its_content(fleet, planted, caplog):
    from shared.jobs.submissions import requeue_lost, submission_key

    store = fleet["store"]
    job, other = make_job(10), make_job(11)
    body = {"message": job.to_message(), "queue": "calq.cpu"}
    key = submission_key(job.job_id)
    if planted == "garbage":
        data = b'{"message": "SECRET-CONTENT'
    elif planted == "another job's key":
        key, data = submission_key(other.job_id), json_bytes(body)
    elif planted == "unknown queue":
        data = json_bytes({**body, "queue": "SECRET-CONTENT"})
    else:
        data = json_bytes({**body, "pad": "SECRET-CONTENT" * 10_000})
    store.put_bytes(key, data)
    sent = []
    assert requeue_lost(fleet["registry"], store, lambda m, q: sent.append(m)) == [] and sent == []
    assert f"skipping submission {store.uri(key)}" in caplog.text and "SECRET" not in caplog.text


def json_bytes(obj) -> bytes:
    import json

    return json.dumps(obj).encode()


@pytest.mark.integration
def test_wait_on_a_job_the_registry_lost_says_so_and_what_to_run(fleet, redis_url):
    from producer.client import CalibrationClient
    from shared.contract.errors import NotFound
    from shared.jobs.submissions import record_submission

    client = CalibrationClient(Settings(broker_url=redis_url, storage_url=str(fleet["store"].url), compile_cache_dir=None))
    job = make_job(12)
    record_submission(client.store, job, queue="calq.cpu")
    for read in (lambda: client.status(job.job_id), lambda: client.wait(job.job_id, timeout=1)):
        with pytest.raises(NotFound, match=r"the registry has no record of it: Redis lost it .* run 'calq reindex'"):
            read()
    with pytest.raises(NotFound, match="never submitted"):  # a job never submitted still says that
        client.status(make_job(13).job_id)


# -- a full disk is a wait, not a loss ---------------------------------------------------------


class _FullStore:
    """A file store whose disk is full for the first ``times`` uploads (ENOSPC inside the store's own error mapping)."""

    def __new__(cls, root: str, times: int):
        from shared.storage.store import Store, storage_errors

        class FullStore(Store):
            calls = 0

            def put_file(self, local_path, key):
                FullStore.calls += 1
                if FullStore.calls <= times:
                    with storage_errors(self.uri(key), missing=None):
                        raise OSError(errno.ENOSPC, "No space left on device")
                return super().put_file(local_path, key)

        return FullStore(root)


@pytest.mark.integration
def test_a_full_store_disk_is_waited_for_with_the_draws_kept_in_the_spool(fleet, tmp_path):
    from shared.jobs.lease import Fence
    from shared.jobs.spool import resume_spooled

    job = make_job(14)
    fleet["registry"].claim(job)
    lease = fleet["leases"].acquire(job.job_id, "a#1", message=job.to_message())
    posterior, _ = spool_results(fleet, job)
    store = _FullStore(str(tmp_path / "store"), times=2)
    settings = fleet["settings"].model_copy(update={"recovery": RecoverySettings(
        spool_dir=tmp_path / "spool", retry_first_s=0.05, retry_max_s=0.1, lease_s=10, heartbeat_s=1)})
    phases = []
    summary = resume_spooled(job, store=store, settings=settings, notify=lambda p: phases.append(p.phase),
                             fence=Fence(fleet["leases"], lease))
    assert phases.count("waiting for storage") == 2 and summary.posterior_uri.endswith(f".t{lease.token}.nc")
    assert store.exists(summary.posterior_uri) and not posterior.exists()


@pytest.mark.integration
def test_a_store_full_past_the_budget_fails_clearly_and_keeps_the_spool(fleet, tmp_path):
    from shared.contract.errors import JobFailed
    from shared.jobs.spool import resume_spooled

    job = make_job(15)
    posterior, summary_file = spool_results(fleet, job)
    settings = fleet["settings"].model_copy(update={"recovery": RecoverySettings(
        spool_dir=tmp_path / "spool", retry_first_s=0.05, retry_max_s=0.1, write_budget_s=0.2)})
    with pytest.raises(JobFailed, match=r"no space left in the store at .*: its disk is full"):
        resume_spooled(job, store=_FullStore(str(tmp_path / "store"), times=1000), settings=settings,
                       notify=lambda p: None)
    assert posterior.is_file() and summary_file.is_file()  # the next run here writes them, never fits again


@pytest.fixture
def full_spool(tmp_path):
    """A 1 MiB tmpfs, filled: a spool folder on a full disk (skipped where tmpfs cannot be mounted)."""
    folder = tmp_path / "spool"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        with contextlib.suppress(OSError):
            (folder / "filler").write_bytes(b"\0" * (2 << 20))
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("fenced", [True, False], ids=["fleet: handed back", "embedded: failed"])
def test_a_spool_on_a_full_disk_says_no_space_in_it(full_spool, fenced):
    import numpy as np
    import xarray as xr

    from shared.contract.errors import JobFailed
    from shared.jobs.lease import HandBack
    from shared.jobs.spool import _spooling
    from shared.storage.netcdf import write_netcdf

    data = xr.Dataset({"x": ("draw", np.random.default_rng(0).normal(size=100_000))})
    with pytest.raises(HandBack if fenced else JobFailed) as raised:
        _spooling(full_spool / "cj-1.nc", lambda path: write_netcdf(data, path), fence=_Frozen(1) if fenced else None)
    assert str(raised.value).startswith(f"no space in {full_spool} ")
    assert "HDF" not in str(raised.value)
    if fenced:
        assert raised.value.requeue  # handed back to the queue, not failed
    assert [p.name for p in full_spool.iterdir()] == ["filler"]  # no partial file left


# -- a child that stops beating is restarted -----------------------------------------------------

HUNG_CHILD = """
import os, signal, sys, time
log = sys.argv[1]
starts = sum(1 for line in open(log)) if os.path.exists(log) else 0
open(log, "a").write(f"start {os.getpid()}\\n")
signal.signal(signal.SIGTERM, lambda *_: open(log, "a").write(f"term {os.getpid()}\\n"))  # a hung loop ignores it
beats = 5 if starts == 0 else 10**9  # the first process hangs after five beats; the next one keeps beating
while True:
    if beats > 0:
        beats -= 1
        open(os.environ["CALQ_BEAT_FILE"], "a").close()
        os.utime(os.environ["CALQ_BEAT_FILE"])
    time.sleep(0.1)
"""


def test_a_child_that_stops_beating_gets_sigterm_then_sigkill_and_is_restarted(tmp_path):
    import threading
    import time

    from worker.supervisor import Supervisor, WorkerSpec

    log = tmp_path / "child.log"
    spec = WorkerSpec("w0", None, ("calq.cpu",), {}, (sys.executable, "-c", HUNG_CHILD, str(log)))
    sup = Supervisor([spec], restart_backoff_s=(0.05, 0.2), poll_s=0.02, kill_after_s=0.5, silent_after_s=1.0)
    thread = threading.Thread(target=sup.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while sup.children[0].restarts < 1:
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no child started"
            time.sleep(0.05)
        time.sleep(2.5)  # the new process beats: it is left alone
        assert sup.children[0].restarts == 1 and sup.children[0].alive
        events = [tuple(line.split()) for line in log.read_text().splitlines()]
    finally:
        sup.stop(force=True)
        thread.join(20)
    (start, hung), (term, termed), (restart, new) = events[:3]
    # SIGTERM first; the hung process ignored it and was killed (no more lines from it); a new one started
    assert (start, term, restart) == ("start", "term", "start") and hung == termed != new
    assert all(pid != hung for _, pid in events[2:])

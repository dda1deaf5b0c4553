"""Job records and latest pointers: one set of semantics over every backend.

Each test runs on RedisRegistry over fakeredis (fast), on RedisRegistry over
a real redis-server (``integration``) and on StoreRegistry over a folder.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta

import pytest

from shared.contract.errors import BrokerUnavailable, NotFound
from shared.contract.job import CalibrationJob, JobState, JobStatus, Progress
from shared.contract.summary import CalibrationSummary
from shared.jobs.registry import JobRegistry, RedisRegistry, StoreRegistry, WaitTimeout
from shared.storage.catalog import Catalog
from shared.storage.store import Store, posterior_key, summary_key
from tests.test_catalog import T0
from tests.test_catalog import make_summary as _make_summary


def make_summary(job_id: str, *, store: Store | None = None, **options: object) -> CalibrationSummary:
    """A summary naming its own posterior and summary (a pointer naming anything else is corrupt)."""
    summary = _make_summary(job_id, store=store, **options)
    if store is None:
        summary = summary.model_copy(update={
            "summary_uri": f"file:///s/{summary_key(summary.archetype, job_id)}",
            "posterior_uri": f"file:///s/{posterior_key(summary.archetype, job_id)}",
        })
    return summary


@dataclass
class Backend:
    kind: str
    registry: JobRegistry
    flush: Callable[[], None]  # lose every record and pointer (Redis FLUSHALL)
    client: object = None


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "store"), cache_dir=tmp_path / "cache")


def _open(kind: str, request: pytest.FixtureRequest, store: Store) -> Iterator[Backend]:
    if kind == "store":

        def flush() -> None:
            for uri in store.list("jobs") + store.list("latest"):
                store.delete(uri)

        yield Backend(kind, StoreRegistry(store), flush)
        return
    if kind == "fakeredis":
        import fakeredis

        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    else:
        import redis

        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    try:
        yield Backend(kind, RedisRegistry(client, prefix="t"), client.flushall, client)
    finally:
        client.close()


REAL_REDIS = pytest.param("redis", marks=pytest.mark.integration)


@pytest.fixture(params=["fakeredis", REAL_REDIS, "store"])
def backend(request: pytest.FixtureRequest, store: Store) -> Iterator[Backend]:
    yield from _open(request.param, request, store)


@pytest.fixture(params=["fakeredis", REAL_REDIS])
def redis_backend(request: pytest.FixtureRequest, store: Store) -> Iterator[Backend]:
    yield from _open(request.param, request, store)


def make_job(seed: int = 0, archetype: str = "intermediate") -> CalibrationJob:
    return CalibrationJob(
        archetype=archetype,
        dataset_uri="file:///data/races.nc",
        dataset_sha256="ab" * 32,
        events=("top_5",),
        sampler={"warmup": 10, "samples": 10, "chains": 1, "seed": seed},
    )


# -- claim ---------------------------------------------------------------------


def test_claim_creates_once_and_deduplicates(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    first, created = reg.claim(job)
    assert created and first.state is JobState.QUEUED and first.job_id == job.job_id
    assert first.archetype == "intermediate" and first.submitted_at is not None
    again, created_again = reg.claim(job)
    assert not created_again and again == first
    assert reg.get(job.job_id) == first


def test_claim_of_a_running_or_succeeded_job_is_not_repeated(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    reg.mark_running(job.job_id, worker="w1")
    status, created = reg.claim(job)
    assert not created and status.state is JobState.RUNNING
    reg.succeed(job.job_id, make_summary(job.job_id))
    status, created = reg.claim(job)
    assert not created and status.state is JobState.SUCCEEDED


def test_rejected_stays_rejected(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    reg.mark_running(job.job_id, worker="w")
    reg.reject(job.job_id, "dataset hash mismatch")
    status, created = reg.claim(job)
    assert not created
    assert status.state is JobState.REJECTED and status.reason == "dataset hash mismatch"


def test_failed_is_requeued_with_reason_and_deliveries_reset(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    reg.mark_running(job.job_id, worker="w1")
    assert reg.record_delivery(job.job_id) == 1
    assert reg.record_delivery(job.job_id) == 2
    reg.fail(job.job_id, "time limit of 60 s exceeded")
    failed = reg.get(job.job_id)
    assert failed.state is JobState.FAILED and failed.deliveries == 2

    status, created = reg.claim(job)
    assert created
    assert status.state is JobState.QUEUED
    assert status.reason is None and status.deliveries == 0 and status.worker is None
    assert status.finished_at is None and status.started_at is None
    assert reg.get(job.job_id) == status
    assert reg.record_delivery(job.job_id) == 1  # counting starts over
    assert reg.claim(job)[1] is False  # and it is queued once, not twice


def test_get_unknown_raises_not_found_and_find_returns_none(backend: Backend) -> None:
    reg = backend.registry
    with pytest.raises(NotFound, match="cj-unknown"):
        reg.get("cj-unknown")
    assert reg.find("cj-unknown") is None
    assert reg.find("../../etc/passwd") is None


# -- transitions ---------------------------------------------------------------


def test_life_of_a_job(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    running = reg.mark_running(job.job_id, worker="worker-1@host")
    assert running is not None and running.state is JobState.RUNNING
    assert running.worker == "worker-1@host" and running.started_at is not None and running.finished_at is None

    step = Progress(phase="sampling", fraction=0.5, draws_done=5, draws_total=10)
    reg.progress(job.job_id, step)
    status = reg.get(job.job_id)
    assert status.progress == step and status.state is JobState.RUNNING and status.worker == "worker-1@host"

    summary = make_summary(job.job_id)
    done = reg.succeed(job.job_id, summary)
    assert done.state is JobState.SUCCEEDED and done.finished_at is not None
    assert done.summary_uri == summary.summary_uri and done.posterior_uri == summary.posterior_uri
    assert done.progress == step and done.started_at == running.started_at  # untouched fields stay
    assert reg.get(job.job_id) == done
    assert reg.latest("intermediate", "top_5").job_id == job.job_id


@pytest.mark.parametrize("finish", ["fail", "reject"])
def test_finishing_with_a_reason(backend: Backend, finish: str) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    reg.mark_running(job.job_id, worker="w")
    getattr(reg, finish)(job.job_id, "it broke")
    status = reg.get(job.job_id)
    assert status.state is (JobState.FAILED if finish == "fail" else JobState.REJECTED)
    assert status.reason == "it broke" and status.finished_at is not None and status.worker == "w"


def test_a_refused_transition_is_logged_and_never_written(backend: Backend, caplog) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    reg.mark_running(job.job_id, worker="w")
    rejected = reg.reject(job.job_id, "bad input")
    with caplog.at_level("WARNING", logger="shared.jobs.registry"):
        assert reg.succeed(job.job_id, make_summary(job.job_id)) is None
        assert reg.mark_running(job.job_id, worker="w2") is None
    assert reg.get(job.job_id) == rejected
    assert "may not move job" in caplog.text and "from rejected to succeeded" in caplog.text
    assert reg.latest_all() == {}  # a refused success moves no pointer


def test_updates_without_a_record_never_raise(backend: Backend, caplog) -> None:
    reg = backend.registry
    with caplog.at_level("WARNING", logger="shared.jobs.registry"):
        assert reg.mark_running("cj-ghost", worker="w") is None
        assert reg.progress("cj-ghost", Progress(phase="load")) is None
        assert reg.fail("cj-ghost", "x") is None
    assert "cj-ghost" in caplog.text
    assert reg.find("cj-ghost") is None
    # A success without a record still counts: the record is created from the summary.
    status = reg.succeed("cj-ghost", make_summary("cj-ghost"))
    assert status.state is JobState.SUCCEEDED and reg.get("cj-ghost").archetype == "intermediate"
    assert reg.latest("intermediate", "top_5").job_id == "cj-ghost"


def test_record_delivery_counts_per_attempt(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    assert [reg.record_delivery(job.job_id) for _ in range(3)] == [1, 2, 3]
    assert reg.get(job.job_id).deliveries == 3
    assert reg.record_delivery(job.job_id, attempt=1) == 1
    assert reg.get(job.job_id).deliveries == 1
    assert reg.record_delivery("cj-no-record") == 1  # counted even without a record


# -- latest pointers -----------------------------------------------------------


def test_latest_moves_only_forward_and_only_when_converged(backend: Backend) -> None:
    reg = backend.registry
    assert reg.latest("intermediate", "top_5") is None
    base = make_summary("cj-base", data_through=date(2024, 5, 8))
    assert [p.job_id for p in reg.update_latest(base)] == ["cj-base"]

    older = make_summary("cj-older", data_through=date(2024, 5, 1), created_at=T0 + timedelta(days=1))
    assert reg.update_latest(older) == []
    diverged = make_summary("cj-diverged", data_through=date(2024, 5, 15), converged=False)
    assert reg.update_latest(diverged) == []
    assert reg.latest("intermediate", "top_5").job_id == "cj-base"

    rerun = make_summary("cj-rerun", data_through=date(2024, 5, 8), created_at=T0 + timedelta(hours=1))
    assert len(reg.update_latest(rerun)) == 1
    assert reg.latest("intermediate", "top_5").job_id == "cj-rerun"


def test_an_all_summary_moves_every_archetype_it_fitted(backend: Backend) -> None:
    reg = backend.registry
    newer_intermediate = make_summary("cj-int", data_through=date(2024, 6, 1))
    reg.update_latest(newer_intermediate)
    everything = make_summary("cj-all", archetype="all", events=("top_1", "top_5"), data_through=date(2024, 5, 1))
    moved = reg.update_latest(everything)
    assert len(moved) == 7  # 4 archetypes x 2 events, less intermediate/top_5
    latest = reg.latest_all()
    assert len(latest) == 8
    assert latest[("intermediate", "top_5")].job_id == "cj-int"
    assert latest[("intermediate", "top_1")].job_id == "cj-all"
    assert latest[("road_course", "top_5")].job_id == "cj-all"
    assert latest[("road_course", "top_5")] == reg.latest("road_course", "top_5")


def test_succeed_of_a_non_converged_job_leaves_latest_alone(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    reg.succeed(job.job_id, make_summary(job.job_id, converged=False))
    assert reg.get(job.job_id).state is JobState.SUCCEEDED
    assert reg.latest_all() == {}


def test_rebuild_latest_after_a_flush_restores_pointers_from_the_store(backend: Backend, store: Store) -> None:
    reg = backend.registry
    for summary in (
        make_summary("cj-old", data_through=date(2024, 5, 1), store=store),
        make_summary("cj-new", data_through=date(2024, 5, 8), store=store),
        make_summary("cj-bad", data_through=date(2024, 5, 9), converged=False, store=store),
        make_summary("cj-all", archetype="all", data_through=date(2024, 5, 2), store=store),
    ):
        reg.update_latest(summary)
    before = reg.latest_all()
    assert before[("intermediate", "top_5")].job_id == "cj-new" and len(before) == 4

    backend.flush()
    assert reg.latest_all() == {}
    assert reg.rebuild_latest(Catalog(store)) == 4
    assert reg.latest_all() == before


def test_rebuild_latest_drops_pointers_the_store_does_not_back(backend: Backend, store: Store) -> None:
    reg = backend.registry
    reg.update_latest(make_summary("cj-gone", data_through=date(2025, 1, 1)))  # not in the store
    kept = make_summary("cj-kept", store=store)
    assert reg.rebuild_latest(Catalog(store)) == 1
    assert reg.latest("intermediate", "top_5").job_id == kept.job_id


# -- waiting -------------------------------------------------------------------


def test_wait_returns_when_the_job_finishes_and_reports_changes(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)

    def work() -> None:
        time.sleep(0.1)
        reg.mark_running(job.job_id, worker="w")
        time.sleep(0.2)
        reg.succeed(job.job_id, make_summary(job.job_id))

    seen: list[JobStatus] = []
    worker = threading.Thread(target=work)
    start = time.monotonic()
    worker.start()
    try:
        final = reg.wait(job.job_id, timeout=5, on_update=seen.append, poll_s=2.0)
    finally:
        worker.join()
    elapsed = time.monotonic() - start
    assert final.state is JobState.SUCCEEDED
    assert [s.state for s in seen] == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    # poll_s is 2 s: finishing well before that means the change woke the wait.
    assert elapsed < 1.5


def test_wait_polls_when_no_message_comes(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    if isinstance(reg, RedisRegistry):  # finish it behind the registry's back: no message
        key = f"{reg.prefix}:job:{job.job_id}"
        done = reg.get(job.job_id).model_copy(update={"state": JobState.FAILED, "reason": "x"})
        threading.Timer(0.2, lambda: backend.client.set(key, done.model_dump_json())).start()
    else:  # what another process does: write the file, with no notification in this one
        done = reg.get(job.job_id).model_copy(update={"state": JobState.FAILED, "reason": "x"})
        other = Store(reg.store.url)
        threading.Timer(0.2, lambda: other.put_bytes(f"jobs/{job.job_id}.json", done.model_dump_json().encode())).start()
    start = time.monotonic()
    final = reg.wait(job.job_id, timeout=5, poll_s=0.3)
    elapsed = time.monotonic() - start
    assert final.state is JobState.FAILED
    # Nothing woke the wait: it saw the change by reading again, one poll after the write.
    assert 0.3 <= elapsed < 2


def test_wait_times_out_with_the_last_state(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    reg.mark_running(job.job_id, worker="w")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="still running") as info:
        reg.wait(job.job_id, timeout=0.3, poll_s=0.1)
    assert 0.25 < time.monotonic() - start < 2
    assert isinstance(info.value, WaitTimeout) and info.value.status.state is JobState.RUNNING


def test_wait_on_an_unknown_job_raises_not_found(backend: Backend) -> None:
    with pytest.raises(NotFound):
        backend.registry.wait("cj-unknown", timeout=1)


# -- concurrency ---------------------------------------------------------------


def claim_at_once(reg, job, threads: int = 8) -> list[bool]:
    """``created`` of ``threads`` claims of one job released together."""
    barrier = threading.Barrier(threads)
    results: list[bool] = []

    def claim() -> None:
        barrier.wait()
        results.append(reg.claim(job)[1])

    workers = [threading.Thread(target=claim) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return results


def test_concurrent_claims_create_exactly_one_record(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    assert sorted(claim_at_once(reg, job)) == [False] * 7 + [True]


def test_concurrent_requeue_of_a_failed_job_happens_once(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    reg.fail(job.job_id, "worker lost")
    assert sorted(claim_at_once(reg, job)) == [False] * 7 + [True]
    assert reg.get(job.job_id).state is JobState.QUEUED


def test_concurrent_latest_updates_keep_the_newest(backend: Backend) -> None:
    reg = backend.registry
    summaries = [
        make_summary(f"cj-{i:02d}", archetype="all", data_through=date(2024, 5, 1) + timedelta(days=i % 5),
                     created_at=T0 + timedelta(seconds=i))
        for i in range(16)
    ]
    newest = max(summaries, key=lambda s: (s.data_through, s.created_at))
    for _ in range(3):
        backend.flush()
        barrier = threading.Barrier(len(summaries))

        def update(summary: CalibrationSummary, barrier=barrier) -> None:
            barrier.wait()
            reg.update_latest(summary)

        threads = [threading.Thread(target=update, args=(s,)) for s in reversed(summaries)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {p.job_id for p in reg.latest_all().values()} == {newest.job_id}
        assert len(reg.latest_all()) == 4


# -- Redis only ----------------------------------------------------------------


def test_state_changes_are_published(redis_backend: Backend) -> None:
    reg, job = redis_backend.registry, make_job()
    pubsub = reg.subscribe()
    try:
        reg.claim(job)
        reg.mark_running(job.job_id, worker="w")
        reg.progress(job.job_id, Progress(phase="warmup", fraction=0.25))
        reg.fail(job.job_id, "boom")
        messages = []
        deadline = time.monotonic() + 2
        while len(messages) < 4 and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.5)
            if message and message["type"] == "message":
                assert message["channel"] in (b"t:jobs", "t:jobs")
                messages.append(json.loads(message["data"]))
    finally:
        pubsub.close()
    assert [m["state"] for m in messages] == ["queued", "running", "running", "failed"]
    assert {m["job_id"] for m in messages} == {job.job_id}
    assert "progress" not in messages[0]
    assert messages[2]["progress"]["phase"] == "warmup" and messages[2]["progress"]["fraction"] == 0.25


def test_records_and_delivery_counters_expire(redis_backend: Backend) -> None:
    reg, job, client = redis_backend.registry, make_job(), redis_backend.client
    reg.claim(job)
    reg.mark_running(job.job_id, worker="w")
    reg.record_delivery(job.job_id, attempt=2)
    assert 0 < client.ttl(f"t:job:{job.job_id}") <= reg.record_ttl_s
    assert 0 < client.ttl(f"t:deliveries:{job.job_id}:2") <= reg.record_ttl_s
    assert json.loads(client.get(f"t:job:{job.job_id}"))["state"] == "running"


def test_unreachable_redis_is_broker_unavailable_without_the_password() -> None:
    import redis

    from tests.services import free_port

    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    reg = RedisRegistry(redis.Redis.from_url(url, socket_connect_timeout=0.5), url=url)
    for call in (lambda: reg.find("cj-x"), lambda: reg.claim(make_job()), lambda: reg.latest_all()):
        with pytest.raises(BrokerUnavailable) as info:
            call()
        assert "hunter2" not in str(info.value) and "127.0.0.1" in str(info.value)
    assert "hunter2" not in repr(reg)
    described = RedisRegistry(redis.Redis.from_url(url, socket_connect_timeout=0.5))
    with pytest.raises(BrokerUnavailable) as info:
        described.get("cj-x")
    assert "hunter2" not in str(info.value)


# -- the transition table --------------------------------------------------------

NONE, Q, R, S, F, X, C = (None, JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED,
                          JobState.REJECTED, JobState.CANCELLED)
FROM = [NONE, Q, R, S, F, X, C]


def put_in(reg: JobRegistry, job: CalibrationJob, state: JobState | None) -> None:
    """Bring ``job``'s record to ``state`` through allowed moves only."""
    if state is None:
        return
    reg.claim(job)
    if state is C:
        reg.cancel(job.job_id, "not wanted")
    elif state is not Q:
        reg.mark_running(job.job_id, worker="w1")
        {S: lambda: reg.succeed(job.job_id, make_summary(job.job_id)),
         F: lambda: reg.fail(job.job_id, "broke"),
         X: lambda: reg.reject(job.job_id, "bad input"),
         R: lambda: None}[state]()
    assert reg.get(job.job_id).state is state


def _operations(store: Store):
    """Each registry method that changes a record, and the state it leads to from each state (None: refused)."""
    summary = make_summary
    return {
        # method: (call, {from: to})
        "claim": (lambda r, j: r.claim(j), {NONE: Q, F: Q, C: Q}),
        "cancel": (lambda r, j: r.cancel(j.job_id, "stop"), {Q: C, R: R}),
        "mark_running": (lambda r, j: r.mark_running(j.job_id, worker="w2"), {Q: R, R: R}),
        "progress": (lambda r, j: r.progress(j.job_id, Progress(phase="load")), {R: R}),
        "record_delivery": (lambda r, j: r.record_delivery(j.job_id), {Q: Q, R: R}),
        "succeed": (lambda r, j: r.succeed(j.job_id, summary(j.job_id)), {NONE: S, Q: S, R: S, F: S}),
        "fail": (lambda r, j: r.fail(j.job_id, "x"), {Q: F, R: F}),
        "reject": (lambda r, j: r.reject(j.job_id, "x"), {R: X}),
        "finish_cancelled": (lambda r, j: r.finish_cancelled(j.job_id, "x"), {R: C}),
        "requeue_abandoned": (lambda r, j: r.requeue_abandoned(j.job_id, reason="lease lapsed", count_delivery=True),
                              {R: Q}),
        "repair": (lambda r, j: r.repair(j.job_id, Catalog(store)), {NONE: S, Q: S, R: S, F: S}),
    }


OPERATIONS = list(_operations(None))  # names only


@pytest.mark.parametrize("start", FROM, ids=lambda s: "none" if s is None else s.value)
@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_transition_in_the_table(backend: Backend, store: Store, operation: str, start) -> None:
    """Each method from each state: the table's move is applied; anything else leaves the record alone."""
    reg, job = backend.registry, make_job()
    call, moves = _operations(store)[operation]
    put_in(reg, job, start)
    if operation == "repair":
        make_summary(job.job_id, store=store)  # the summary is in the store: repair may apply
    before = reg.find(job.job_id)
    if operation == "cancel" and start is None:
        with pytest.raises(NotFound):
            call(reg, job)
        return
    call(reg, job)
    after = reg.find(job.job_id)
    expected = moves.get(start)
    if expected is None:
        assert after == before, f"{operation} from {start} changed the record"
    else:
        assert after is not None and after.state is expected
        if before is not None and operation not in ("claim",):
            assert after.submitted_at == before.submitted_at  # the same record, changed


def test_the_table_in_the_docstring_is_the_one_enforced() -> None:
    import re

    from shared.jobs.registry import base

    documented = set()
    actors = {a.value: a for a in base.Actor}
    for line in base.__doc__.splitlines():
        columns = re.split(r"\s{2,}", line.strip())
        if len(columns) >= 3 and columns[0] in actors:
            for before in columns[1].split(", "):
                documented.add((actors[columns[0]], None if before == "(none)" else JobState(before),
                                JobState(columns[2])))
    assert documented == set(base.TRANSITIONS)


def test_repair_needs_the_summary_in_the_store(backend: Backend, store: Store) -> None:
    reg, job = backend.registry, make_job()
    put_in(reg, job, R)
    assert reg.repair(job.job_id, Catalog(store)) is None
    assert reg.get(job.job_id).state is R
    make_summary(job.job_id, store=store)
    repaired = reg.repair(job.job_id, Catalog(store))
    assert repaired is not None and repaired.state is S and repaired.summary_uri.endswith(f"{job.job_id}.json")
    assert reg.latest("intermediate", "top_5").job_id == job.job_id


# -- cancellation ------------------------------------------------------------------


def test_cancel_a_queued_job_ends_it_with_when_and_why(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    status, changed = reg.cancel(job.job_id, "wrong window")
    assert changed and status.state is C and status.finished_at is not None
    assert status.reason == "cancelled: wrong window" and status.cancel_reason == "wrong window"
    assert reg.mark_running(job.job_id, worker="w") is None  # it never starts
    assert reg.get(job.job_id).state is C


def test_cancel_a_running_job_flags_it_for_its_worker(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    reg.mark_running(job.job_id, worker="w")
    status, changed = reg.cancel(job.job_id, "not needed")
    assert changed and status.state is R and status.cancel_requested and status.cancel_reason == "not needed"
    again, changed_again = reg.cancel(job.job_id, "twice")
    assert not changed_again and again.cancel_reason == "not needed"
    done = reg.finish_cancelled(job.job_id, "cancelled during sampling: not needed")
    assert done.state is C and done.finished_at is not None


def test_cancel_a_finished_job_changes_nothing(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    put_in(reg, job, S)
    before = reg.get(job.job_id)
    status, changed = reg.cancel(job.job_id)
    assert not changed and status == before == reg.get(job.job_id)


def test_cancel_an_unknown_job_is_not_found(backend: Backend) -> None:
    with pytest.raises(NotFound):
        backend.registry.cancel("cj-unknown")


def test_a_cancelled_job_can_be_submitted_again(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    reg.cancel(job.job_id)
    status, enqueue = reg.claim(job)
    assert enqueue and status.state is Q and not status.cancel_requested and status.reason is None
    assert reg.mark_running(job.job_id, worker="w").state is R


def test_wait_returns_a_cancelled_job(backend: Backend) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    threading.Timer(0.1, lambda: reg.cancel(job.job_id)).start()
    assert reg.wait(job.job_id, timeout=5, poll_s=0.2).state is C


# -- the reaper's move -----------------------------------------------------------------


@pytest.mark.parametrize("count", [True, False])
def test_requeue_abandoned_returns_a_running_job_to_the_queue(backend: Backend, count: bool) -> None:
    reg, job = backend.registry, make_job()
    reg.claim(job)
    assert reg.record_delivery(job.job_id) == 1
    reg.mark_running(job.job_id, worker="w")
    reg.progress(job.job_id, Progress(phase="sampling", fraction=0.3))
    requeued = reg.requeue_abandoned(job.job_id, reason="lease lapsed", count_delivery=count)
    assert requeued.state is Q and requeued.worker is None and requeued.progress is None
    assert requeued.reason == "lease lapsed"
    assert requeued.deliveries == (1 if count else 0)
    assert reg.record_delivery(job.job_id) == (2 if count else 1)
    assert [s.job_id for s in reg.running()] == []


def test_running_lists_every_running_job(backend: Backend) -> None:
    reg = backend.registry
    jobs = [make_job(seed=i) for i in range(4)]
    for j in jobs:
        reg.claim(j)
    for j in jobs[:3]:
        reg.mark_running(j.job_id, worker="w")
    reg.fail(jobs[0].job_id, "x")
    assert {s.job_id for s in reg.running()} == {jobs[1].job_id, jobs[2].job_id}


# -- listing -----------------------------------------------------------------------------


def test_jobs_lists_the_newest_first_with_filters(backend: Backend) -> None:
    reg = backend.registry
    jobs = [make_job(seed=i, archetype="intermediate" if i % 2 else "road_course") for i in range(6)]
    for j in jobs:
        reg.claim(j)
        time.sleep(0.002)
    reg.mark_running(jobs[0].job_id, worker="w")  # the oldest, updated last
    listed = reg.jobs(limit=None)
    assert [s.job_id for s in listed] == [jobs[0].job_id] + [j.job_id for j in reversed(jobs[1:])]
    assert [s.job_id for s in reg.jobs(limit=2)] == [jobs[0].job_id, jobs[5].job_id]
    assert [s.job_id for s in reg.jobs(state="running")] == [jobs[0].job_id]
    assert {s.archetype for s in reg.jobs(archetype="intermediate")} == {"intermediate"}
    assert len(reg.jobs(archetype="intermediate", state=Q)) == 3


def test_an_expired_record_leaves_the_listing(redis_backend: Backend) -> None:
    reg, client = redis_backend.registry, redis_backend.client
    a, b = make_job(seed=1), make_job(seed=2)
    reg.claim(a)
    reg.claim(b)
    client.delete(f"t:job:{a.job_id}")  # what its TTL does
    assert [s.job_id for s in reg.jobs()] == [b.job_id]
    assert client.zscore("t:index", a.job_id) is None


# -- invalid messages ---------------------------------------------------------------------


def test_invalid_messages_are_kept_capped_and_change_no_record(backend: Backend) -> None:
    from shared.jobs.registry.base import INVALID_KEEP, MAX_INVALID_REASON_CHARS

    reg, job = backend.registry, make_job()
    put_in(reg, job, S)
    before = reg.get(job.job_id)
    reg.record_invalid("sampler.warmup: too small", job_id=job.job_id)
    reg.record_invalid("x" * 10_000)
    newest, older = reg.invalid_messages(limit=2)
    assert len(newest["reason"]) <= MAX_INVALID_REASON_CHARS and newest["job_id"] == ""
    assert older == {"at": older["at"], "job_id": job.job_id, "reason": "sampler.warmup: too small"}
    assert reg.get(job.job_id) == before
    for i in range(INVALID_KEEP + 20):
        reg.record_invalid(f"r{i}")
    assert reg.invalid_count() == INVALID_KEEP  # trimmed exactly
    assert reg.invalid_messages(limit=1)[0]["reason"] == f"r{INVALID_KEEP + 19}"

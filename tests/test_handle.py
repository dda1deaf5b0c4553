"""shared.jobs.handle.process without Celery: every outcome of a delivery, cancellation, progress.

The registry is the real RedisRegistry over fakeredis, noting the calls the
handler makes; the store is a real local Store in a tmp folder; ``shared.jobs.run.run_job`` is
replaced by a fake that writes a prepared summary (or raises), so no JAX runs.
These fakes serve tests/test_tasks.py too.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions

import shared.jobs.run
from shared.contract.control import JobControl
from shared.contract.errors import (
    InvalidDataset,
    JobTimeLimitExceeded,
    RetryableError,
    StorageUnavailable,
)
from shared.contract.job import CalibrationJob, JobState, JobStatus, Progress, SamplerSettings
from shared.contract.settings import Settings
from shared.contract.summary import CalibrationSummary, Diagnostics, Timings
from shared.jobs.handle import Delivery, JobIdFilter, ProgressThrottle, process, status_dict
from shared.jobs.registry import RedisRegistry
from shared.jobs.services import Services
from shared.storage.store import Store, posterior_key, summary_key

SHA = "ab" * 32


# -- fakes -----------------------------------------------------------------------


def _noted(name: str, job_id_of: Any = lambda first, _: first) -> Any:
    """A registry method that notes ``(name, job id)`` in ``self.calls``, then does what RedisRegistry does."""

    def method(self: RecordingRegistry, first: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((name, job_id_of(first, kwargs)))
        return getattr(super(RecordingRegistry, self), name)(first, *args, **kwargs)

    return method


class RecordingRegistry(RedisRegistry):
    """The real RedisRegistry (transition table and all) over fakeredis, noting what the handler asked of it."""

    def __init__(self) -> None:
        import fakeredis

        super().__init__(fakeredis.FakeRedis(server=fakeredis.FakeServer()), prefix="t")
        self.progress_seen: list[Progress] = []
        self.calls: list[tuple[str, str]] = []

    claim = _noted("claim", lambda job, _: job.job_id)
    mark_running = _noted("mark_running")
    succeed = _noted("succeed")
    fail = _noted("fail")
    reject = _noted("reject")
    finish_cancelled = _noted("finish_cancelled")
    record_invalid = _noted("record_invalid", lambda _reason, kwargs: kwargs.get("job_id") or "")

    def progress(self, job_id: str, progress: Progress) -> JobStatus | None:
        self.progress_seen.append(progress)
        return super().progress(job_id, progress)


def make_job(**over: Any) -> CalibrationJob:
    fields = {
        "archetype": "superspeedway",
        "dataset_uri": f"file:///data/datasets/{SHA}.nc",
        "dataset_sha256": SHA,
        "sampler": SamplerSettings(warmup=10, samples=10, chains=1),
    }
    return CalibrationJob(**{**fields, **over})


def make_summary(job: CalibrationJob, store: Store) -> CalibrationSummary:
    return CalibrationSummary(
        job_id=job.job_id,
        archetype=job.archetype,
        archetypes=[job.archetype],
        events=list(job.events),
        model_version=job.model_version,
        dataset_uri=job.dataset_uri,
        dataset_sha256=job.dataset_sha256,
        data_through=date(2024, 2, 19),
        sampler=job.sampler,
        centered=True,
        n_rows=120,
        n_races=3,
        tracks={job.archetype: ["Daytona"]},
        converged=True,
        diagnostics=Diagnostics(
            chains=1, draws=10, max_rhat=1.0, min_ess_bulk=400.0, min_ess_tail=400.0, divergences=0,
            bfmi=[1.0], min_bfmi=1.0, max_tree_depth=10, tree_depth_hits=0, mean_leapfrog_steps=7.0,
            ess_bulk_per_second=100.0,
        ),
        parameters=[],
        calibration=[],
        timings=Timings(total_s=1.0),
        posterior_uri=store.uri(posterior_key(job.archetype, job.job_id)),
        summary_uri=store.uri(summary_key(job.archetype, job.job_id)),
        created_at=datetime(2024, 3, 1, tzinfo=UTC),
        calq_version="test",
    )


class FakeRunJob:
    """Stands in for shared.jobs.run.run_job: reports progress, writes the summary, or raises."""

    def __init__(self, *, raises: BaseException | None = None, on_chunk: Any = None) -> None:
        self.raises = raises
        self.on_chunk = on_chunk  # called before each chunk's check, as a test's hook
        self.calls: list[str] = []

    def __call__(self, job, *, store, settings, control=None, **_):
        self.calls.append(job.job_id)
        control = (control or JobControl()).start(job.time_limit_s or settings.job_time_limit_s)
        control.check("fetch")
        control.progress(Progress(phase="load"))
        for i in range(50):  # a burst within one phase: throttled
            if self.on_chunk is not None:
                self.on_chunk(i)
            control.check("warmup")
            control.progress(Progress(phase="warmup", fraction=i / 50))
        control.progress(Progress(phase="sampling", fraction=0.0))
        if self.raises is not None:
            raise self.raises
        summary = make_summary(job, store)
        store.put_bytes(summary_key(job.archetype, job.job_id), summary.model_dump_json().encode())
        return summary


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"), cache_dir=tmp_path / "cache")


@pytest.fixture
def registry() -> RecordingRegistry:
    return RecordingRegistry()


@pytest.fixture
def job(registry: RecordingRegistry) -> CalibrationJob:
    job = make_job()
    registry.claim(job)  # what the producer does before sending
    return job


def install(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> FakeRunJob:
    fake = FakeRunJob(**kwargs)
    monkeypatch.setattr(shared.jobs.run, "run_job", fake)
    return fake


def run(message: Any, registry: RecordingRegistry, store: Store, settings: Settings, **kw: Any) -> dict[str, Any]:
    return process(Services(settings, store, registry), Delivery(message, worker="calq-cpu0@test", **kw))


# -- process ---------------------------------------------------------------------


def test_success_records_summary_and_returns_it(monkeypatch, job, registry, store, settings):
    fake = install(monkeypatch)
    observed: list[str] = []
    result = run(job.to_message(), registry, store, settings, on_progress=lambda p: observed.append(p.phase))

    assert fake.calls == [job.job_id]
    record = registry.get(job.job_id)
    assert record.state is JobState.SUCCEEDED
    assert record.worker == "calq-cpu0@test"
    assert record.summary_uri == store.uri(summary_key(job.archetype, job.job_id))
    assert result == make_summary(job, store).model_dump(mode="json")
    assert result["job_id"] == job.job_id and result["converged"] is True
    assert [c[0] for c in registry.calls] == ["claim", "mark_running", "succeed"]
    # Phase changes all reach the registry; the burst of 50 warmup updates does not.
    phases = [p.phase for p in registry.progress_seen]
    assert phases[0] == "load" and phases[-1] == "sampling" and "warmup" in phases
    assert len(phases) < 10
    assert observed == phases  # the caller's observer sees what the registry recorded


def test_invalid_dataset_is_rejected_without_raising(monkeypatch, job, registry, store, settings):
    install(monkeypatch, raises=InvalidDataset(["race r1 has no finish_position"]))
    result = run(job.to_message(), registry, store, settings)

    assert result["state"] == "rejected" and result["job_id"] == job.job_id
    assert "race r1 has no finish_position" in result["reason"]
    record = registry.get(job.job_id)
    assert record.state is JobState.REJECTED and record.reason == result["reason"]


def test_storage_outage_is_raised_for_retry(monkeypatch, job, registry, store, settings):
    install(monkeypatch, raises=StorageUnavailable("s3://bucket unreachable"))
    with pytest.raises(StorageUnavailable):
        run(job.to_message(), registry, store, settings)
    assert registry.get(job.job_id).state is JobState.RUNNING  # neither failed nor rejected


def test_foreign_transient_error_becomes_retryable(monkeypatch, job, registry, store, settings):
    install(monkeypatch, raises=redis.exceptions.ConnectionError("redis went away"))
    with pytest.raises(RetryableError) as info:
        run(job.to_message(), registry, store, settings)
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)


def test_unexpected_error_fails_with_reason(monkeypatch, job, registry, store, settings, caplog):
    install(monkeypatch, raises=RuntimeError("NaN in the log density"))
    caplog.handler.addFilter(JobIdFilter())  # as the worker's log handler does
    with caplog.at_level(logging.ERROR, logger="shared.jobs.handle"):
        result = run(job.to_message(), registry, store, settings)

    reason = "RuntimeError: NaN in the log density"
    assert result == status_dict(job.job_id, "failed", reason)
    record = registry.get(job.job_id)
    assert record.state is JobState.FAILED and record.reason == reason
    # The job id is bound to the handler's log lines.
    assert any(getattr(r, "job_id", None) == job.job_id for r in caplog.records)


def test_time_limit_fails_the_job(monkeypatch, job, registry, store, settings):
    install(monkeypatch, raises=JobTimeLimitExceeded("ran past 60 s during warmup"))
    result = run(job.to_message(), registry, store, settings)
    assert result["state"] == "failed"
    assert result["reason"] == "JobTimeLimitExceeded: ran past 60 s during warmup"


def test_too_many_deliveries_dead_letters_without_running(monkeypatch, job, registry, store, settings):
    fake = install(monkeypatch)
    for _ in range(settings.max_deliveries):  # the worker died this many times already
        registry.record_delivery(job.job_id, 0)

    result = run(job.to_message(), registry, store, settings)

    assert fake.calls == []
    assert result["state"] == "failed"
    assert result["reason"].startswith(f"dead-lettered after {settings.max_deliveries} deliveries")
    assert registry.get(job.job_id).state is JobState.FAILED


def test_deliveries_up_to_the_limit_still_run(monkeypatch, job, registry, store, settings):
    fake = install(monkeypatch)
    for _ in range(settings.max_deliveries - 1):
        registry.record_delivery(job.job_id, 0)
    assert run(job.to_message(), registry, store, settings)["job_id"] == job.job_id
    assert fake.calls == [job.job_id]
    assert registry.get(job.job_id).state is JobState.SUCCEEDED


def test_duplicate_delivery_of_succeeded_job_is_not_rerun(monkeypatch, job, registry, store, settings):
    fake = install(monkeypatch)
    first = run(job.to_message(), registry, store, settings)
    # Delivered again, more often than max_deliveries: still the stored summary, never a dead letter.
    for _ in range(settings.max_deliveries + 1):
        again = run(job.to_message(), registry, store, settings)
        assert again == first
    assert fake.calls == [job.job_id]
    assert registry.get(job.job_id).state is JobState.SUCCEEDED


def test_succeeded_job_whose_summary_is_gone_is_not_rerun_by_a_redelivery(monkeypatch, job, registry, store, settings):
    fake = install(monkeypatch)
    run(job.to_message(), registry, store, settings)
    done = registry.get(job.job_id)
    store.delete(summary_key(job.archetype, job.job_id))
    again = run(job.to_message(), registry, store, settings)
    assert fake.calls == [job.job_id]  # succeeded is final: the table never moves it back to running
    assert again["state"] == "succeeded" and "could not be read" in again["reason"]
    assert registry.get(job.job_id) == done


def test_message_without_record_gets_one(monkeypatch, registry, store, settings):
    fake = install(monkeypatch)
    job = make_job(archetype="road_course")
    result = run(job.to_message(), registry, store, settings)
    assert fake.calls == [job.job_id] and result["archetype"] == "road_course"
    assert registry.get(job.job_id).state is JobState.SUCCEEDED


def test_invalid_message_is_rejected(monkeypatch, job, registry, store, settings):
    fake = install(monkeypatch)
    message = job.to_message()
    del message["dataset_sha256"]
    message["sampler"] = {"warmup": 0}

    result = run(message, registry, store, settings)

    assert fake.calls == []
    assert result["state"] == "rejected" and result["job_id"] == job.job_id
    assert "dataset_sha256" in result["reason"] and "sampler.warmup" in result["reason"]
    assert "\n" not in result["reason"]  # compact: one line
    assert registry.get(job.job_id).state is JobState.QUEUED  # no record changes
    assert registry.invalid_messages(limit=1)[0] == {
        "at": registry.invalid_messages(limit=1)[0]["at"], "job_id": job.job_id, "reason": result["reason"],
    }


def test_message_whose_id_disagrees_with_content_is_rejected(monkeypatch, job, registry, store, settings):
    install(monkeypatch)
    message = {**job.to_message(), "archetype": "intermediate"}  # id of a superspeedway job
    result = run(message, registry, store, settings)
    assert result["state"] == "rejected" and "does not match" in result["reason"]
    assert registry.get(job.job_id).state is JobState.QUEUED
    assert registry.invalid_count() == 1


@pytest.mark.parametrize("poison", [
    {"archetype": "intermediate"},  # valid content, but not the content this id names
    {"sampler": {"warmup": 0}},  # fails to parse
    {"dataset_sha256": "not a hash", "archetype": "oval"},
])
def test_a_malformed_message_never_rewrites_a_finished_job(monkeypatch, job, registry, store, settings, poison):
    """Issue 8: a malformed message carrying a succeeded job's id made it rejected, for good."""
    fake = install(monkeypatch)
    run(job.to_message(), registry, store, settings)
    done = registry.get(job.job_id)
    assert done.state is JobState.SUCCEEDED

    result = run({**job.to_message(), **poison}, registry, store, settings)
    assert result["state"] == "rejected" and result["job_id"] == job.job_id
    assert registry.get(job.job_id) == done  # not a field changed
    assert fake.calls == [job.job_id] and registry.invalid_count() == 1
    # and the job itself still reads back, resubmits as one job, and is never run again
    assert run(job.to_message(), registry, store, settings)["job_id"] == job.job_id
    assert registry.claim(job) == (done, False) and fake.calls == [job.job_id]


def test_a_valid_job_without_its_id_changes_no_record(monkeypatch, registry, store, settings):
    fake = install(monkeypatch)
    job = make_job()
    message = job.model_dump(mode="json")  # no job_id: the content alone is not a claim
    result = run(message, registry, store, settings)
    assert result["state"] == "rejected" and "job_id" in result["reason"]
    assert fake.calls == [] and registry.find(job.job_id) is None and registry.invalid_count() == 1


@pytest.mark.parametrize("message", [{}, {"archetype": "oval"}, ["not", "a", "dict"], "text", None])
def test_garbage_never_raises(monkeypatch, registry, store, settings, message):
    fake = install(monkeypatch)
    result = run(message, registry, store, settings)
    assert result["state"] == "rejected" and result["job_id"] is None
    assert fake.calls == [] and registry.calls == [("record_invalid", "")]
    assert registry.jobs() == [] and registry.invalid_count() == 1


def test_rejecting_unknown_job_id_does_not_raise(monkeypatch, registry, store, settings):
    install(monkeypatch)
    result = run({"job_id": "cj-unknown", "archetype": "oval"}, registry, store, settings)
    assert result == {"job_id": "cj-unknown", "state": "rejected", "reason": result["reason"]}
    assert registry.find("cj-unknown") is None


def test_progress_throttle():
    now = [0.0]
    seen: list[str] = []
    throttle = ProgressThrottle(lambda p: seen.append(f"{p.phase}:{p.fraction}"), interval_s=0.5, clock=lambda: now[0])
    throttle(Progress(phase="warmup", fraction=0.0))
    now[0] = 0.2
    throttle(Progress(phase="warmup", fraction=0.1))  # too soon: dropped
    now[0] = 0.3
    throttle(Progress(phase="sampling", fraction=0.0))  # phase change: forwarded
    now[0] = 0.9
    throttle(Progress(phase="sampling", fraction=0.5))  # 0.6 s later: forwarded
    assert seen == ["warmup:0.0", "sampling:0.0", "sampling:0.5"]


# -- cancellation ----------------------------------------------------------------


def test_a_cancelled_queued_job_never_starts(monkeypatch, job, registry, store, settings):
    fake = install(monkeypatch)
    registry.cancel(job.job_id, "changed my mind")
    result = run(job.to_message(), registry, store, settings)
    assert fake.calls == [] and ("mark_running", job.job_id) not in registry.calls
    assert result["state"] == "cancelled" and result["reason"] == "cancelled: changed my mind"
    record = registry.get(job.job_id)
    assert record.state is JobState.CANCELLED and record.deliveries == 0


def test_a_running_job_stops_at_its_next_check_when_cancelled(monkeypatch, job, registry, store, settings):
    seen: list[int] = []

    def cancel_at(i: int) -> None:
        seen.append(i)
        if i == 10:
            registry.cancel(job.job_id, "wrong data")

    fake = install(monkeypatch, on_chunk=cancel_at)
    result = run(job.to_message(), registry, store, settings, control=JobControl(poll_s=0))
    assert fake.calls == [job.job_id] and seen[-1] == 10  # the check right after the request stopped it
    assert result["state"] == "cancelled" and "during warmup: wrong data" in result["reason"]
    record = registry.get(job.job_id)
    assert record.state is JobState.CANCELLED and record.finished_at is not None and "wrong data" in record.reason
    assert not store.exists(summary_key(job.archetype, job.job_id)) and registry.latest_all() == {}
    # submitted again, it runs to the end
    assert registry.claim(job)[1] is True
    install(monkeypatch)
    assert run(job.to_message(), registry, store, settings)["job_id"] == job.job_id
    assert registry.get(job.job_id).state is JobState.SUCCEEDED


def test_the_cancel_flag_is_polled_at_most_every_poll_interval(monkeypatch, job, registry, store, settings):
    reads: list[str] = []
    find = registry.find

    def counting_find(job_id: str):
        reads.append(job_id)
        return find(job_id)

    during: list[int] = []
    install(monkeypatch, on_chunk=lambda i: during.append(len(reads)))
    monkeypatch.setattr(registry, "find", counting_find)
    run(job.to_message(), registry, store, settings)  # 51 checks in well under a second
    assert during[-1] - during[0] == 0  # the first check read the flag; the next 50 did not, within 1 s
    assert during[0] >= 1


def test_a_redelivered_job_that_was_cancelled_while_running_ends_cancelled(monkeypatch, job, registry, store, settings):
    fake = install(monkeypatch)
    registry.mark_running(job.job_id, worker="lost-worker")
    registry.cancel(job.job_id, "stop it")
    result = run(job.to_message(), registry, store, settings)
    assert fake.calls == [] and result["state"] == "cancelled"
    assert registry.get(job.job_id).state is JobState.CANCELLED


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def caplog_warning():
    handler = _Capture()
    logger = logging.getLogger("shared.jobs.handle")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def test_progress_errors_never_stop_the_job():
    def broken(_: Progress) -> None:
        raise redis.exceptions.ConnectionError("down")

    calls: list[str] = []

    def counted(progress: Progress) -> None:
        calls.append(progress.phase)
        broken(progress)

    throttle = ProgressThrottle(counted)
    with caplog_warning() as records:
        throttle(Progress(phase="load"))  # raises nothing
        throttle(Progress(phase="write"))
    assert calls == ["load", "write"]  # every phase was still tried
    warned = [r for r in records if "could not record progress" in r.getMessage()]
    assert len(warned) == 1  # logged once, not on every call

"""shared.jobs.handle.process without Celery, the Celery app's configuration, and the task shell.

The registry is the real RedisRegistry over fakeredis, noting the calls the
handler makes; the store is a real local Store in a tmp folder; ``shared.jobs.run.run_job`` is
replaced by a fake that writes a prepared summary (or raises), so no JAX runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
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
from shared.jobs import celery_app as app_module
from shared.jobs.handle import Delivery, JobIdFilter, ProgressThrottle, process, status_dict
from shared.jobs.registry import RedisRegistry
from shared.jobs.services import Services
from shared.storage.store import Store, posterior_key, summary_key
from tests.services import free_port

SHA = "ab" * 32
ROOT = Path(__file__).resolve().parents[1]


# -- fakes -----------------------------------------------------------------------


class RecordingRegistry(RedisRegistry):
    """The real RedisRegistry (transition table and all) over fakeredis, noting what the handler asked of it."""

    def __init__(self) -> None:
        import fakeredis

        super().__init__(fakeredis.FakeRedis(server=fakeredis.FakeServer()), prefix="t")
        self.progress_seen: list[Progress] = []
        self.calls: list[tuple[str, str]] = []

    def claim(self, job: CalibrationJob) -> tuple[JobStatus, bool]:
        self.calls.append(("claim", job.job_id))
        return super().claim(job)

    def mark_running(self, job_id: str, *, worker: str) -> JobStatus | None:
        self.calls.append(("mark_running", job_id))
        return super().mark_running(job_id, worker=worker)

    def progress(self, job_id: str, progress: Progress) -> JobStatus | None:
        self.progress_seen.append(progress)
        return super().progress(job_id, progress)

    def succeed(self, job_id: str, summary: CalibrationSummary) -> JobStatus | None:
        self.calls.append(("succeed", job_id))
        return super().succeed(job_id, summary)

    def fail(self, job_id: str, reason: str) -> JobStatus | None:
        self.calls.append(("fail", job_id))
        return super().fail(job_id, reason)

    def reject(self, job_id: str, reason: str) -> JobStatus | None:
        self.calls.append(("reject", job_id))
        return super().reject(job_id, reason)

    def finish_cancelled(self, job_id: str, reason: str) -> JobStatus | None:
        self.calls.append(("finish_cancelled", job_id))
        return super().finish_cancelled(job_id, reason)

    def record_invalid(self, reason: str, *, job_id: str | None = None) -> None:
        self.calls.append(("record_invalid", job_id or ""))
        super().record_invalid(reason, job_id=job_id)


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


# -- the Celery app --------------------------------------------------------------


#: A broker address nothing listens on: building the app connects to nothing, and if it ever did, it fails here.
NOBODY = f"redis://127.0.0.1:{free_port()}/15"


def broker_settings(**over: Any) -> Settings:
    return Settings(broker_url=NOBODY, **over)


def test_app_config_is_safe_for_long_jobs_on_redis():
    settings = broker_settings(visibility_timeout_s=7200, job_time_limit_s=1800)
    conf = app_module.make_app(settings).conf

    assert conf.accept_content == ["json"]
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 7200
    assert conf.result_backend_transport_options["visibility_timeout"] == 7200
    assert conf.visibility_timeout == 7200
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True
    assert conf.task_time_limit == 1800
    assert 0 < conf.task_soft_time_limit < conf.task_time_limit
    assert [q.name for q in conf.task_queues] == list(app_module.ALL_QUEUES)
    assert conf.broker_transport_options["queue_order_strategy"] == "priority"  # interactive before batch
    assert conf.task_default_queue == "calq.cpu"
    assert conf.result_expires == 7 * 24 * 3600
    assert conf.task_track_started is True
    assert conf.worker_hijack_root_logger is False
    assert conf.broker_url == NOBODY
    assert conf.result_backend == NOBODY


def test_app_uses_separate_result_backend_and_default_queue():
    conf = app_module.make_app(broker_settings(result_backend="redis://cache:6379/2", default_queue="calq.gpu")).conf
    assert conf.result_backend == "redis://cache:6379/2"
    assert conf.task_default_queue == "calq.gpu"


@pytest.mark.parametrize(
    ("name", "queue"),
    [("gpu", "calq.gpu"), ("cpu", "calq.cpu"), ("calq.gpu", "calq.gpu"), (" CPU ", "calq.cpu")],
)
def test_queue_for(name, queue):
    assert app_module.queue_for(name) == queue


@pytest.mark.parametrize("name", ["tpu", "", "calq.tpu"])
def test_queue_for_rejects_unknown(name):
    with pytest.raises(ValueError, match="unknown queue"):
        app_module.queue_for(name)


def test_app_without_broker_fails_clearly_only_when_used(monkeypatch):
    monkeypatch.setattr(app_module, "get_settings", lambda: Settings(broker_url=None))
    app_module.get_app.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="CALQ_BROKER_URL"):
            app_module.app  # noqa: B018
    finally:
        app_module.get_app.cache_clear()


def test_worker_modules_import_without_broker_or_jax(tmp_path):
    # A process that forks (prefork, the supervisor) must not have initialised JAX.
    code = (
        "import sys, shared.jobs.celery_app, worker.tasks, shared.jobs.handle, worker.supervisor; "
        "assert 'jax' not in sys.modules, 'jax imported'; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALQ_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- the task shell --------------------------------------------------------------


@pytest.fixture
def task_env(monkeypatch, registry, store, settings):
    from worker import tasks

    app = app_module.make_app(broker_settings())
    app.conf.task_always_eager = True
    task = tasks.register(app)
    ctx = Services(settings=settings, store=store, registry=registry)
    monkeypatch.setattr(tasks, "context", lambda: ctx)
    return task


def test_task_options(task_env):
    task = task_env
    assert task.name == app_module.TASK_NAME == "calq.calibrate"
    assert task.max_retries == 5
    assert task.acks_late is True and task.reject_on_worker_lost is True
    assert task.autoretry_for == (RetryableError,)
    assert task.retry_backoff is True and task.retry_backoff_max == 600 and task.retry_jitter is True


def test_task_runs_the_handler(monkeypatch, task_env, job, registry):
    install(monkeypatch)
    result = task_env.apply(args=[job.to_message()]).get()
    assert result["job_id"] == job.job_id
    assert registry.get(job.job_id).state is JobState.SUCCEEDED


def test_task_exhausting_retries_fails_the_job(monkeypatch, task_env, job, registry):
    fake = install(monkeypatch, raises=StorageUnavailable("s3 down"))
    outcome = task_env.apply(args=[job.to_message()])
    assert outcome.failed()
    assert len(fake.calls) == 1 + task_env.max_retries
    record = registry.get(job.job_id)
    assert record.state is JobState.FAILED
    assert record.reason == "gave up after 5 retries: StorageUnavailable: s3 down"


def test_device_check_catches_a_cpu_run_that_wanted_a_gpu():
    from worker.device import device_problem

    # Tests run JAX on the CPU (conftest): fine for a CPU worker, wrong for a GPU one.
    assert device_problem({"JAX_PLATFORMS": "cpu"}) is None
    problem = device_problem({"JAX_PLATFORMS": "cuda"})
    assert problem is not None and "cuda" in problem


def test_device_check_reports_a_backend_that_cannot_start(monkeypatch):
    import jax

    from worker.device import device_problem

    def broken() -> list:
        raise AssertionError()  # what JAX 0.10 raises for JAX_PLATFORMS=cuda without a CUDA plugin

    monkeypatch.setattr(jax, "devices", broken)
    problem = device_problem({"JAX_PLATFORMS": "cuda"})
    assert problem is not None and "could not initialise the cuda backend" in problem

"""What a worker does with one job message: a pure function, tested without Celery.

:func:`process` turns a message into a job record's final state::

    message ──parse──▶ invalid, or content does not give its job_id ──▶ dropped: no record changes
       │                                                                (counted in {prefix}:invalid)
       ├─ record already succeeded (duplicate delivery) ─────▶ stored summary
       ├─ record cancelled, failed or rejected ──────────────▶ dropped (a cancelled queued job never starts)
       ├─ record running with cancel_requested (redelivery) ─▶ cancelled
       ├─ delivered more than max_deliveries times ──────────▶ failed (dead-letter)
       └─ run_job ─▶ summary ───────────────────────────────▶ succeeded
                 ├─▶ JobCancelled (the cancel flag, checked ─▶ cancelled
                 │   at each phase and between chunks)
                 └─▶ exception, by shared.contract.errors.classify:
                       REJECT ──────────────────────────────▶ rejected
                       FAIL ────────────────────────────────▶ failed
                       RETRY ───────────────────────────────▶ raised (the task retries)

Every record change goes through the registry's transition table
(:mod:`shared.jobs.registry.base`); where the table refuses one (the job was
cancelled or finished meanwhile), the message is dropped.

It returns the Celery task result (a JSON-ready dict) and raises only
:class:`~shared.contract.errors.RetryableError`: a transient fault that is not one
already (a dropped Redis connection) is wrapped into one, so the task's
``autoretry_for`` sees every retryable outcome.

Redelivery is normal with late acks: the same message can arrive again after
a worker was lost, or after ``visibility_timeout``. Job ids are derived from
content and every write is atomic, so running a job twice is harmless, and a
job that already succeeded is never run again.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import pydantic

from shared.contract.control import JobControl
from shared.contract.errors import JobCancelled, JobFailed, NotFound, Outcome, classify, transient_as_retryable
from shared.contract.job import CalibrationJob, JobState, JobStatus, Progress
from shared.storage.catalog import Catalog

if TYPE_CHECKING:
    from shared.contract.summary import CalibrationSummary
    from shared.jobs.lease import Fence
    from shared.jobs.services import Services
    from shared.storage.store import Store

# shared.jobs.run (and through it JAX, NumPyro, ArviZ) is imported inside the
# functions that run a job: importing this module must not initialise JAX in a
# process that may fork.

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
MAX_REASON_CHARS = 2000

#: The id of the job this thread is running: set by :func:`bound_job_id`, read by :class:`JobIdFilter`.
current_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("calq_job_id", default=None)


class Registry(Protocol):
    """The part of ``shared.jobs.registry.RedisRegistry`` the handler uses."""

    def claim(self, job: CalibrationJob) -> tuple[JobStatus, bool]: ...
    def find(self, job_id: str) -> JobStatus | None: ...
    def mark_running(self, job_id: str, *, worker: str) -> JobStatus | None: ...
    def progress(self, job_id: str, progress: Progress) -> Any: ...
    def succeed(self, job_id: str, summary: CalibrationSummary) -> Any: ...
    def fail(self, job_id: str, reason: str) -> Any: ...
    def reject(self, job_id: str, reason: str) -> Any: ...
    def finish_cancelled(self, job_id: str, reason: str) -> Any: ...
    def record_delivery(self, job_id: str, attempt: int = 0) -> int: ...
    def record_invalid(self, reason: str, *, job_id: str | None = None) -> None: ...
    def repair(self, job_id: str, catalog: Catalog) -> JobStatus | None: ...


class JobIdFilter(logging.Filter):
    """Adds ``record.job_id`` (the running job's id, or ``-``) to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            record.job_id = current_job_id.get() or "-"
        return True


@contextlib.contextmanager
def bound_job_id(job_id: str | None) -> Iterator[None]:
    """Every log line written inside names ``job_id`` (through :class:`JobIdFilter`)."""
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)


def status_dict(job_id: str | None, state: JobState | str, reason: str | None = None) -> dict[str, Any]:
    """The task result of a job that did not produce a summary."""
    return {"job_id": job_id, "state": JobState(state).value, "reason": reason}


def validation_reason(exc: pydantic.ValidationError) -> str:
    """A pydantic error as one compact line: ``field: problem; other.field: problem``."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err.get("loc", ())) or "message"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return _clip("invalid job message: " + "; ".join(parts))


def _clip(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


class ProgressThrottle:
    """Forwards progress to ``sink`` on every phase change, else at most every ``interval_s``.

    A failing sink (Redis blip) is logged once and never stops the job:
    progress is best-effort, the final state is not.
    """

    def __init__(
        self,
        sink: Callable[[Progress], Any],
        *,
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | logging.LoggerAdapter = log,
    ) -> None:
        self._sink, self._interval, self._clock, self._log = sink, interval_s, clock, logger
        self._phase: str | None = None
        self._last = float("-inf")
        self._warned = False

    def __call__(self, progress: Progress) -> None:
        now = self._clock()
        if progress.phase == self._phase and now - self._last < self._interval:
            return
        self._phase, self._last = progress.phase, now
        try:
            self._sink(progress)
        except Exception as exc:  # progress must never fail the job
            if not self._warned:
                self._log.warning("could not record progress (%s: %s); carrying on", type(exc).__name__, exc)
                self._warned = True


def cancel_source(registry: Registry, job_id: str) -> Callable[[], str | None]:
    """What a running job polls: the reason, once its record says ``cancel_requested``."""

    def reason() -> str | None:
        record = registry.find(job_id)
        if record is not None and (record.cancel_requested or record.state is JobState.CANCELLED):
            return record.cancel_reason or "cancelled by request"
        return None

    return reason


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One delivery of a job message to a worker: what differs from one run of the handler to the next.

    ``worker`` is the name in the record and the logs; ``attempt`` the
    task's retry count; ``fence`` a fleet worker's lease (every store write
    is checked against it); ``on_progress`` hears each progress report;
    ``control`` is a :class:`JobControl` the caller keeps (embedded mode
    cancels the job from a signal handler through it).
    """

    message: Mapping[str, Any]
    worker: str
    attempt: int = 0
    fence: Fence | None = None
    on_progress: Callable[[Progress], Any] | None = None
    control: JobControl | None = None


def process(services: Services, delivery: Delivery) -> dict[str, Any]:
    """Run the job in ``delivery.message`` once, record its outcome, return the task result.

    Returns the summary as a JSON-ready dict on success (also for a duplicate
    delivery of a job that already succeeded), or :func:`status_dict` for a
    rejected, failed, cancelled or dropped job. Raises
    :class:`~shared.contract.errors.RetryableError` for transient faults, and
    nothing else for bad input.

    The handler gives the job one :class:`JobControl`: it records progress
    (throttled) in ``services.registry``, then passes it to
    ``delivery.on_progress``, and polls the record's cancel flag. A caller
    that passes ``delivery.control`` gets it wired the same way. A fleet
    worker passes its lease's ``fence`` (and services whose registry is
    fenced by it): every store write is checked against it, and a worker that
    lost its lease stops with :class:`~shared.jobs.lease.LeaseLost`, having
    written nothing.
    """
    with transient_as_retryable():  # e.g. redis.ConnectionError from the registry: the task's autoretry_for catches it
        return _process(services, delivery)


def _process(services: Services, delivery: Delivery) -> dict[str, Any]:
    registry, store, message = services.registry, services.store, delivery.message
    claimed_id = claimed_job_id(message)
    try:
        job = CalibrationJob.model_validate(message)
    except pydantic.ValidationError as exc:
        return refuse_message(registry, claimed_id, validation_reason(exc))
    except Exception as exc:  # e.g. RecursionError: a body too deep to walk is as invalid as one that fails
        return refuse_message(registry, claimed_id, f"invalid job message: unreadable ({type(exc).__name__})")
    if claimed_id is None:  # a message must say which job it is; its content must then give that id
        return refuse_message(registry, None, "invalid job message: job_id: missing")

    job_id = job.job_id
    with bound_job_id(job_id):
        record = registry.find(job_id)
        if record is None:
            # Sent without going through the producer (or its record expired): make one.
            log.warning("no record for this job; creating one")
            record, _ = registry.claim(job)

        if record.state is JobState.SUCCEEDED:
            done = _stored_summary(store, record)
            if done is not None:
                log.info("already succeeded; duplicate delivery not run again")
                return done
            return status_dict(job_id, JobState.SUCCEEDED, "already succeeded; its summary could not be read")
        if record.state.finished:
            log.info("record is %s; message dropped", record.state.value)
            return status_dict(job_id, record.state, record.reason)
        if record.cancel_requested:  # a redelivery of a job that was cancelled while it ran
            reason = f"cancelled: {record.cancel_reason or 'cancelled by request'}"
            registry.finish_cancelled(job_id, reason)
            return status_dict(job_id, JobState.CANCELLED, reason)
        done = finished_in_store(registry, store, job_id)
        if done is not None:
            return done

        deliveries = registry.record_delivery(job_id, delivery.attempt)
        if deliveries > services.settings.max_deliveries:
            reason = (
                f"dead-lettered after {deliveries - 1} deliveries: the worker was lost while "
                "running it (killed or out of memory)"
            )
            log.error("%s", reason)
            registry.fail(job_id, reason)
            return status_dict(job_id, JobState.FAILED, reason)

        return _run(job, services, delivery, deliveries=deliveries)


def _run(job: CalibrationJob, services: Services, delivery: Delivery, *, deliveries: int) -> dict[str, Any]:
    from shared.jobs import run as runner

    registry, worker, on_progress = services.registry, delivery.worker, delivery.on_progress
    job_id = job.job_id
    if registry.mark_running(job_id, worker=worker) is None:
        # Cancelled (or finished) between the read and now: the table refused the start.
        record = registry.find(job_id)
        state = record.state if record is not None else JobState.CANCELLED
        log.info("may not start (record is %s); message dropped", state.value)
        return status_dict(job_id, state, record.reason if record is not None else None)
    try:
        log.info(
            "running %s on %s (attempt %d, delivery %d)", job.archetype, worker, delivery.attempt + 1, deliveries
        )

        def record(progress: Progress) -> None:
            registry.progress(job_id, progress)
            if on_progress is not None:
                on_progress(progress)

        throttle = ProgressThrottle(record, logger=log)
        control = (delivery.control or JobControl()).attach(
            on_progress=throttle, cancel_source=cancel_source(registry, job_id)
        )
        summary = runner.run_job(job, store=services.store, settings=services.settings, control=control,
                                 fence=delivery.fence)
        registry.succeed(job_id, summary)
    except JobCancelled as exc:
        reason = _clip(str(exc))
        log.info("%s", reason)
        registry.finish_cancelled(job_id, reason)
        return status_dict(job_id, JobState.CANCELLED, reason)
    except Exception as exc:
        outcome = classify(exc)
        if outcome is Outcome.RETRY:
            log.warning("transient fault, will retry: %s: %s", type(exc).__name__, exc)
            raise
        if outcome is Outcome.REJECT:
            reason = _clip(str(exc))
            log.warning("rejected: %s", reason)
            registry.reject(job_id, reason)
            return status_dict(job_id, JobState.REJECTED, reason)
        reason = _clip(f"{type(exc).__name__}: {exc}")
        # Failures calq raises on purpose (time limit) need no traceback.
        log.error("failed: %s", reason, exc_info=not isinstance(exc, JobFailed))
        registry.fail(job_id, reason)
        return status_dict(job_id, JobState.FAILED, reason)
    log.info("succeeded (converged=%s)", summary.converged)
    return summary.model_dump(mode="json")


def claimed_job_id(message: Any) -> str | None:
    """The job id a message says it carries (a non-empty string), or None; not yet checked against its content."""
    job_id = message.get("job_id") if isinstance(message, Mapping) else None
    return job_id if isinstance(job_id, str) and job_id else None


def refuse_message(registry: Registry, job_id: str | None, reason: str) -> dict[str, Any]:
    """A message that is not a valid job changes no record: it is logged, counted in ``calq:invalid``, and dropped.

    Also for messages refused before the handler sees them (undecodable
    bodies, ETAs too far ahead: :mod:`worker.tasks`). ``reason`` is calq's
    own words; it never quotes the message.
    """
    try:
        registry.record_invalid(reason, job_id=job_id)
    except Exception as exc:  # the count is best-effort; the message is dropped either way
        log.warning("could not count an invalid message (%s: %s)", type(exc).__name__, exc)
    return status_dict(job_id, JobState.REJECTED, reason)


def finished_in_store(registry: Registry, store: Store, job_id: str) -> dict[str, Any] | None:
    """The summary of a job the store says finished, its record repaired; None when it must run.

    One store, one truth: a job fitted in embedded mode on the same store, or
    whose record Redis lost, never runs again nor overwrites its result.
    """
    repaired = registry.repair(job_id, Catalog(store))
    if repaired is None:
        return None
    log.info("its summary is already in the store: record repaired, not run again")
    return _stored_summary(store, repaired)


def _stored_summary(store: Store, record: JobStatus) -> dict[str, Any] | None:
    """The summary of a job that already succeeded, or None if it cannot be read (then rerun)."""
    if not record.summary_uri:
        log.warning("record says succeeded but names no summary; running again")
        return None

    try:
        return Catalog(store).read(record.summary_uri).model_dump(mode="json")
    except NotFound:
        log.warning("summary %s is gone; running again", record.summary_uri)
    except (pydantic.ValidationError, ValueError) as exc:
        log.warning("summary %s is unreadable (%s); running again", record.summary_uri, exc)
    return None

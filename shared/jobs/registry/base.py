"""calq's own job records, and the ``latest`` pointers.

Celery reports an unknown task id as PENDING and a task id is no uniqueness
constraint (celery/celery#4070), so calq keeps its own record of every job:
a :class:`~shared.contract.job.JobStatus`, keyed by the content-derived job id.

One set of semantics, two backends:

- :class:`RedisRegistry` for the fleet. Records are JSON at
  ``{prefix}:job:{job_id}`` (with a TTL), latest pointers live in the hash
  ``{prefix}:latest`` (field ``{archetype}:{event}``), delivery counters at
  ``{prefix}:deliveries:{job_id}:{attempt}``; every state change is
  published on ``{prefix}:jobs``. Creation is ``SET NX``; every
  read-modify-write is a WATCH/MULTI transaction, retried on conflict.
- :class:`StoreRegistry` for embedded mode: JSON files ``jobs/{job_id}.json``
  and ``latest/{archetype}/{event}.json`` in the store, serialised by a lock
  shared by every registry on the same store in this process.

The rules (in :class:`JobRegistry`):

- :meth:`~JobRegistry.claim` creates the QUEUED record, or returns the one
  that exists. A FAILED job is re-queued (a time limit or a dead-lettered
  delivery may pass on another try); a REJECTED one stays rejected.
- Updates change only the fields concerned; finishing states set
  ``finished_at``. A transition that makes no sense (succeed after reject)
  is written anyway, with a warning: a record must never block a job.
- ``latest`` moves only for converged summaries, and only forward
  (:func:`shared.storage.catalog.is_newer`), atomically, so two workers finishing at
  once cannot move it backwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

from shared.contract.domain import SAFE_ID
from shared.contract.errors import NotFound
from shared.contract.job import CalibrationJob, JobState, JobStatus, Progress, utcnow
from shared.contract.summary import CalibrationSummary
from shared.storage.catalog import Catalog, LatestPointer, pointers_for

log = logging.getLogger(__name__)

DEFAULT_RECORD_TTL_S = 30 * 24 * 3600

# Transitions that make sense; anything else is written with a warning.
_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.REJECTED}),
    JobState.RUNNING: frozenset({JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.REJECTED}),
    JobState.FAILED: frozenset({JobState.FAILED}),
    JobState.SUCCEEDED: frozenset({JobState.SUCCEEDED}),
    JobState.REJECTED: frozenset({JobState.REJECTED}),
}

Change = Callable[[JobStatus], "JobStatus | None"]


class WaitTimeout(TimeoutError):
    """:meth:`JobRegistry.wait` ran out of time; ``status`` is the last record seen."""

    def __init__(self, message: str, status: JobStatus) -> None:
        super().__init__(message)
        self.status = status


def _queued(job_id: str, archetype: str) -> JobStatus:
    return JobStatus(job_id=job_id, archetype=archetype, state=JobState.QUEUED, submitted_at=utcnow())


def _message(status: JobStatus) -> str:
    """The pub/sub message of a change: ``{"job_id", "state", "progress"?}``."""
    body: dict[str, Any] = {"job_id": status.job_id, "state": status.state.value}
    if status.progress is not None:
        body["progress"] = status.progress.model_dump(mode="json")
    return json.dumps(body, separators=(",", ":"))


class JobRegistry(ABC):
    """Job records and latest pointers; subclasses supply storage primitives."""

    # -- primitives (each atomic) --

    @abstractmethod
    def find(self, job_id: str) -> JobStatus | None:
        """The record of ``job_id``, or None."""

    @abstractmethod
    def _insert(self, status: JobStatus) -> bool:
        """Write ``status`` only if no record exists; True if written."""

    @abstractmethod
    def _mutate(self, job_id: str, change: Change) -> tuple[JobStatus | None, JobStatus | None]:
        """Apply ``change`` to the record atomically: ``(before, after)``.

        ``before`` is None when there is no record (``change`` is not
        called); ``after`` is None when ``change`` returned None (nothing
        written). ``change`` may run more than once under contention.
        """

    @abstractmethod
    def _count_delivery(self, job_id: str, attempt: int) -> int: ...

    @abstractmethod
    def _reset_deliveries(self, job_id: str) -> None: ...

    @abstractmethod
    def _merge(self, pointers: list[LatestPointer]) -> list[LatestPointer]:
        """Store each pointer that :func:`is_newer` than the current one, atomically; the moved ones."""

    @abstractmethod
    def latest_all(self) -> dict[tuple[str, str], LatestPointer]:
        """Every latest pointer, keyed by ``(archetype, event)``."""

    @abstractmethod
    def _drop_latest(self) -> None: ...

    @abstractmethod
    def _publish(self, status: JobStatus) -> None: ...

    @abstractmethod
    @contextlib.contextmanager
    def _listener(self, job_id: str) -> Iterator[Callable[[float], None]]:
        """Yield ``pause(seconds)``: returns early when ``job_id`` may have changed."""

    # -- records --

    def get(self, job_id: str) -> JobStatus:
        """The record of ``job_id``; NotFound if there is none."""
        status = self.find(job_id)
        if status is None:
            raise NotFound(f"no job {job_id!r} in {self!r} (never submitted, or its record expired)")
        return status

    def claim(self, job: CalibrationJob) -> tuple[JobStatus, bool]:
        """Record ``job`` as QUEUED unless it is known: ``(record, enqueue)``.

        ``enqueue`` is True when the caller must send the job to a worker:
        the record is new, or the job had FAILED and is now re-queued (reason
        cleared, deliveries reset). Otherwise the existing record comes back
        with False: queued, running and succeeded jobs are done once, and a
        REJECTED job stays rejected (bad input never passes).
        """
        job_id = job.job_id

        def requeue(current: JobStatus) -> JobStatus | None:
            return _queued(job_id, job.archetype) if current.state is JobState.FAILED else None

        while True:
            fresh = _queued(job_id, job.archetype)
            if self._insert(fresh):
                self._publish(fresh)
                return fresh, True
            before, after = self._mutate(job_id, requeue)
            if before is None:  # expired or deleted in between: create it after all
                continue
            if after is None:
                return before, False
            self._reset_deliveries(job_id)
            log.info("job %s had failed (%s); queued again", job_id, before.reason)
            self._publish(after)
            return after, True

    def mark_running(self, job_id: str, *, worker: str) -> JobStatus | None:
        """The job started on ``worker``."""
        return self._transition(
            job_id, JobState.RUNNING, lambda s: s.model_copy(
                update={"state": JobState.RUNNING, "worker": worker, "started_at": utcnow()}
            )
        )

    def progress(self, job_id: str, progress: Progress) -> JobStatus | None:
        """Record how far the job has got (the state is left as it is)."""
        before, after = self._mutate(job_id, lambda s: s.model_copy(update={"progress": progress}))
        if before is None:
            log.warning("progress of job %s not recorded: no record", job_id)
        elif after is not None:
            if before.state.finished:
                log.warning("progress reported for job %s, which is already %s", job_id, before.state.value)
            self._publish(after)
        return after

    def succeed(self, job_id: str, summary: CalibrationSummary) -> JobStatus:
        """The job succeeded: record its URIs, move ``latest`` if it should, then publish."""
        update = {
            "state": JobState.SUCCEEDED,
            "reason": None,
            "summary_uri": summary.summary_uri,
            "posterior_uri": summary.posterior_uri,
            "finished_at": utcnow(),
        }

        def change(status: JobStatus) -> JobStatus:
            return status.model_copy(update=update)

        after = self._transition(job_id, JobState.SUCCEEDED, change, publish=False)
        if after is None:  # no record (expired, or Redis flushed): the result still counts
            created = JobStatus(job_id=job_id, archetype=summary.archetype, **update)
            after = created if self._insert(created) else (self._mutate(job_id, change)[1] or created)
        self.update_latest(summary)
        self._publish(after)
        return after

    def fail(self, job_id: str, reason: str) -> JobStatus | None:
        """The job ran and could not finish; ``reason`` says why."""
        return self._finish(job_id, JobState.FAILED, reason)

    def reject(self, job_id: str, reason: str) -> JobStatus | None:
        """The job's input is bad and it will never be retried."""
        return self._finish(job_id, JobState.REJECTED, reason)

    def _finish(self, job_id: str, state: JobState, reason: str) -> JobStatus | None:
        return self._transition(
            job_id, state, lambda s: s.model_copy(update={"state": state, "reason": reason, "finished_at": utcnow()})
        )

    def _transition(self, job_id: str, state: JobState, change: Change, *, publish: bool = True) -> JobStatus | None:
        before, after = self._mutate(job_id, change)
        if before is None:
            log.warning("job %s has no record to mark %s", job_id, state.value)
            return None
        if state not in _ALLOWED[before.state]:
            log.warning("job %s goes from %s to %s", job_id, before.state.value, state.value)
        if publish and after is not None:
            self._publish(after)
        return after

    def record_delivery(self, job_id: str, attempt: int = 0) -> int:
        """Count one more delivery of attempt ``attempt`` of the job; returns the count.

        A job that keeps killing its worker is delivered again and again
        with the same attempt number; the caller dead-letters it past
        ``max_deliveries``. The count is also stored as the record's
        ``deliveries``.
        """
        count = self._count_delivery(job_id, attempt)
        self._mutate(job_id, lambda s: s.model_copy(update={"deliveries": count}))
        return count

    # -- latest pointers --

    def update_latest(self, summary: CalibrationSummary) -> list[LatestPointer]:
        """Point ``latest`` at ``summary`` wherever it is newer; returns the pointers moved.

        Only converged summaries move pointers (one per archetype and event
        they fitted), and only forward by :func:`shared.storage.catalog.is_newer`.
        """
        pointers = pointers_for(summary)
        moved = self._merge(pointers) if pointers else []
        if moved:
            log.info("latest now %s for %s", summary.job_id, ", ".join(f"{p.archetype}/{p.event}" for p in moved))
        return moved

    def latest(self, archetype: str, event: str) -> LatestPointer | None:
        """The current calibration of ``archetype`` for ``event``, or None."""
        return self.latest_all().get((archetype, event))

    def rebuild_latest(self, catalog: Catalog) -> int:
        """Drop every latest pointer and rebuild them from the summaries in the store.

        The pointers are dropped *before* the store is read, and rebuilt by
        the same forward-only merge jobs use, so a job finishing meanwhile is
        never lost. Readers see no pointer until the rebuild ends. Returns
        the number of pointers written.
        """
        self._drop_latest()
        return len(self._merge(list(catalog.latest_pointers().values())))

    # -- waiting --

    def wait(
        self,
        job_id: str,
        *,
        timeout: float,
        on_update: Callable[[JobStatus], None] | None = None,
        poll_s: float = 0.5,
    ) -> JobStatus:
        """Block until the job finishes; returns its final record.

        ``on_update`` is called with the record first and on every change.
        Change notifications only wake the loop early; the record is read
        again at least every ``poll_s``, so a missed message costs at most
        that. Raises NotFound if the job has no record and
        :class:`WaitTimeout` (a TimeoutError) after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last: JobStatus | None = None
        with self._listener(job_id) as pause:
            while True:
                status = self.get(job_id)
                if status != last:
                    last = status
                    if on_update is not None:
                        on_update(status)
                if status.state.finished:
                    return status
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(
                        f"job {job_id} still {status.state.value} after {timeout:g} s", status
                    )
                pause(min(poll_s, remaining))


def _check_id(job_id: str) -> None:
    if not SAFE_ID.match(job_id):
        raise ValueError(f"job id {job_id!r} cannot name a file")

"""calq's own job records, and the ``latest`` pointers.

Celery reports an unknown task id as PENDING and a task id is no uniqueness
constraint (celery/celery#4070), so calq keeps its own record of every job:
a :class:`~shared.contract.job.JobStatus`, keyed by the content-derived job id.

One set of semantics, two backends:

- :class:`RedisRegistry` for the fleet. Records are JSON at
  ``{prefix}:job:{job_id}`` (with a TTL), indexed by update time in the
  sorted set ``{prefix}:index``; latest pointers live in the hash
  ``{prefix}:latest`` (field ``{archetype}:{event}``), delivery counters at
  ``{prefix}:deliveries:{job_id}:{attempt}``, messages that were refused in
  the capped stream ``{prefix}:invalid``; every state change is published on
  ``{prefix}:jobs``. Creation is ``SET NX``; every read-modify-write is a
  WATCH/MULTI transaction, retried on conflict.
- :class:`StoreRegistry` for embedded mode: JSON files ``jobs/{job_id}.json``
  and ``latest/{archetype}/{event}.json`` in the store, serialised by a lock
  shared by every registry on the same store in this process.

Records change only through one table of allowed transitions
(:data:`TRANSITIONS`), enforced in :meth:`JobRegistry._transition`; any other
change is refused, logged, and never written::

    actor      from                            to          by
    ─────────  ──────────────────────────────  ──────────  ───────────────────────────────────────────────
    submitter  (none), failed, cancelled       queued      claim
    submitter  rejected                        queued      claim, only after a hash mismatch (see below)
    cancel     queued                          cancelled   cancel: it never starts
    cancel     running                         running     cancel: sets cancel_requested
    worker     queued                          queued      record_delivery
    worker     queued                          running     mark_running
    worker     running                         running     mark_running, progress, record_delivery
    worker     queued                          failed      fail: dead-lettered before it started
    worker     running                         succeeded   succeed
    worker     running                         failed      fail
    worker     running                         rejected    reject
    worker     running                         cancelled   finish_cancelled: it saw cancel_requested
    reaper     running                         queued      requeue_abandoned
    repair     (none), queued, running, failed  succeeded  repair (summary in the store); succeed (below)

``succeeded``, ``rejected`` and ``cancelled`` are final; ``failed`` and
``cancelled`` jobs may be submitted again, and so may a job rejected for
:class:`~shared.contract.errors.DatasetHashMismatch` (anyone holding the
store's key could have put those bytes at its address first; the worker
deleted them and the owner's upload replaces them); any other rejected job
stays rejected (:func:`_may_resubmit`). A worker's :meth:`succeed` comes
after its summary is written, so where the worker's own move is refused (a
reaper re-queued the job meanwhile, or the record expired) the summary in
hand is repaired in. ``latest`` moves only for converged summaries of jobs
that succeeded, and only forward (:func:`shared.storage.catalog.is_newer`),
atomically, so two workers finishing at once cannot move it backwards.

A message that fails to parse, or whose content does not give its job id,
changes no record: :meth:`JobRegistry.record_invalid` logs it and keeps its
reason in a list capped at exactly :data:`INVALID_KEEP` entries
(:meth:`JobRegistry.invalid_messages`).

Records and pointers are read back as untrusted input
(:mod:`shared.jobs.registry.values`): a corrupt one is skipped by listings
with a warning naming its key (:meth:`JobRegistry.corrupt` lists them),
counts as absent for every write (a resubmission, or the job's worker
finishing, replaces a corrupt record; a job moving ``latest`` repairs a
corrupt slot), and makes :meth:`JobRegistry.get` raise
:class:`~shared.contract.errors.CorruptRecord`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any

from shared.contract.domain import SAFE_ID
from shared.contract.errors import CorruptRecord, DatasetHashMismatch, NotFound
from shared.contract.job import CalibrationJob, JobState, JobStatus, Progress, utcnow
from shared.contract.summary import CalibrationSummary
from shared.jobs.registry.values import Corrupt, Holds, read_pointer, read_record
from shared.storage.catalog import Catalog, LatestPointer, pointers_for

log = logging.getLogger(__name__)

DEFAULT_RECORD_TTL_S = 30 * 24 * 3600
#: How many refused messages are kept (the oldest are dropped first).
INVALID_KEEP = 1000
MAX_INVALID_REASON_CHARS = 500


class Actor(str, Enum):
    """Who asks for a change of a job record."""

    SUBMITTER = "submitter"
    CANCEL = "cancel"
    WORKER = "worker"
    REAPER = "reaper"
    REPAIR = "repair"


_Q, _R, _S, _F, _X, _C = (
    JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.REJECTED, JobState.CANCELLED,
)

#: The allowed transitions: ``(actor, from, to)``; ``from`` None is "no record yet". See the module docstring.
TRANSITIONS: frozenset[tuple[Actor, JobState | None, JobState]] = frozenset(
    {
        (Actor.SUBMITTER, None, _Q), (Actor.SUBMITTER, _F, _Q), (Actor.SUBMITTER, _C, _Q), (Actor.SUBMITTER, _X, _Q),
        (Actor.CANCEL, _Q, _C), (Actor.CANCEL, _R, _R),
        (Actor.WORKER, _Q, _Q), (Actor.WORKER, _Q, _R), (Actor.WORKER, _R, _R), (Actor.WORKER, _Q, _F),
        (Actor.WORKER, _R, _S), (Actor.WORKER, _R, _F), (Actor.WORKER, _R, _X), (Actor.WORKER, _R, _C),
        (Actor.REAPER, _R, _Q),
        (Actor.REPAIR, None, _S), (Actor.REPAIR, _Q, _S), (Actor.REPAIR, _R, _S), (Actor.REPAIR, _F, _S),
    }
)


def allowed(actor: Actor, before: JobState | None, after: JobState) -> bool:
    """Whether ``actor`` may move a record from ``before`` (None: no record) to ``after``."""
    return (actor, before, after) in TRANSITIONS


Change = Callable[[JobStatus], "JobStatus | None"]


class WaitTimeout(TimeoutError):
    """:meth:`JobRegistry.wait` ran out of time; ``status`` is the last record seen."""

    def __init__(self, message: str, status: JobStatus) -> None:
        super().__init__(message)
        self.status = status


def _queued(job_id: str, archetype: str) -> JobStatus:
    now = utcnow()
    return JobStatus(job_id=job_id, archetype=archetype, state=JobState.QUEUED, submitted_at=now, updated_at=now)


def _may_resubmit(status: JobStatus) -> bool:
    """Whether a submitter may queue this finished record again: the table's one condition beyond states.

    A REJECTED job only when it was rejected for someone else's bytes at
    its address (a hash mismatch); bad input of its own never passes.
    """
    return status.state is not JobState.REJECTED or DatasetHashMismatch.is_reason(status.reason)


def _message(status: JobStatus) -> str:
    """The pub/sub message of a change: ``{"job_id", "state", "progress"?}``."""
    body: dict[str, Any] = {"job_id": status.job_id, "state": status.state.value}
    if status.progress is not None:
        body["progress"] = status.progress.model_dump(mode="json")
    return json.dumps(body, separators=(",", ":"))


def _clip(text: str, limit: int = MAX_INVALID_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class JobRegistry(ABC):
    """Job records and latest pointers; subclasses supply storage primitives."""

    #: Whether a URI lies inside the store; pointers naming a summary elsewhere are corrupt (None: not checked).
    holds: Holds | None = None

    # -- primitives (each atomic) --

    @abstractmethod
    def _record_key(self, job_id: str) -> str:
        """Where the record of ``job_id`` lies (named in warnings)."""

    @abstractmethod
    def _raw_record(self, job_id: str) -> bytes | None:
        """The stored bytes of the record of ``job_id``, unparsed; None if there is none."""

    @abstractmethod
    def _raw_pointers(self) -> Iterator[tuple[str, tuple[str, str], bytes]]:
        """Every stored latest pointer, unparsed: ``(key, (archetype, event), bytes)``."""

    @abstractmethod
    def _raw_pointer(self, slot: tuple[str, str]) -> tuple[str, bytes | None]:
        """The key of one latest slot and its stored bytes (None if empty)."""

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
    def _count_delivery(self, job_id: str, attempt: int, by: int = 1) -> int: ...

    @abstractmethod
    def _reset_deliveries(self, job_id: str) -> None: ...

    @abstractmethod
    def _merge(self, pointers: list[LatestPointer]) -> list[LatestPointer]:
        """Store each pointer that :func:`is_newer` than the current one, atomically; the moved ones."""

    @abstractmethod
    def _drop_latest(self) -> None: ...

    @abstractmethod
    def _publish(self, status: JobStatus) -> None: ...

    @abstractmethod
    @contextlib.contextmanager
    def _listener(self, job_id: str) -> Iterator[Callable[[float], None]]:
        """Yield ``pause(seconds)``: returns early when ``job_id`` may have changed."""

    @abstractmethod
    def _newest(self) -> Iterator[JobStatus | Corrupt]:
        """Every record, most recently updated first, corrupt ones as they are met (lazily)."""

    @abstractmethod
    def _append_invalid(self, entry: dict[str, str]) -> None:
        """Keep ``entry`` in the capped list of refused messages."""

    @abstractmethod
    def invalid_messages(self, limit: int = 100) -> list[dict[str, str]]:
        """The newest refused messages, newest first: ``{"at", "job_id", "reason"}``."""

    # -- reading values back --

    def _load(self, job_id: str) -> JobStatus | Corrupt | None:
        raw = self._raw_record(job_id)
        return None if raw is None else read_record(raw, key=self._record_key(job_id), job_id=job_id)

    def _record_or_none(self, job_id: str, raw: bytes | None) -> JobStatus | None:
        """The record in ``raw`` (read inside a backend's transaction); None if absent or corrupt."""
        if raw is None:
            return None
        record = read_record(raw, key=self._record_key(job_id), job_id=job_id)
        return record if isinstance(record, JobStatus) else None

    def _pointer_or_none(self, key: str, slot: tuple[str, str], raw: bytes | None) -> LatestPointer | None:
        """The pointer in ``raw``; None if the slot is empty or corrupt (so the next pointer repairs it)."""
        if raw is None:
            return None
        pointer = read_pointer(raw, key=key, slot=slot, holds=self.holds)
        return pointer if isinstance(pointer, LatestPointer) else None

    # -- records --

    def find(self, job_id: str) -> JobStatus | None:
        """The record of ``job_id``, or None (also when it is corrupt: see the module docstring)."""
        record = self._load(job_id)
        return record if isinstance(record, JobStatus) else None

    def get(self, job_id: str) -> JobStatus:
        """The record of ``job_id``; NotFound if there is none, CorruptRecord if it cannot be read."""
        record = self.find(job_id) or self._load(job_id)  # read again only to tell corrupt from absent
        if record is None:
            raise NotFound(f"no job {job_id!r} in {self!r} (never submitted, or its record expired)")
        if isinstance(record, Corrupt):
            raise CorruptRecord(
                f"job {job_id!r}: its record at {record.key} is corrupt ({record.why}); "
                "submitting the job again replaces it"
            )
        return record

    def corrupt(self) -> list[Corrupt]:
        """Every record and latest pointer that cannot be used: where it lies and why (see ``calq jobs --all``)."""
        found = [record for record in self._newest() if isinstance(record, Corrupt)]
        for key, slot, raw in self._raw_pointers():
            pointer = read_pointer(raw, key=key, slot=slot, holds=self.holds)
            if isinstance(pointer, Corrupt):
                found.append(pointer)
        return found

    def jobs(
        self, *, state: JobState | str | None = None, archetype: str | None = None, limit: int | None = 20
    ) -> list[JobStatus]:
        """The most recently updated records, newest first, optionally of one state and archetype."""
        wanted = JobState(state) if state is not None else None
        found: list[JobStatus] = []
        for status in self._newest():
            if isinstance(status, Corrupt):
                continue
            if (wanted is None or status.state is wanted) and (archetype is None or status.archetype == archetype):
                found.append(status)
                if limit is not None and len(found) >= limit:
                    break
        return found

    def running(self) -> list[JobStatus]:
        """Every running job's record (for a reaper looking for abandoned ones)."""
        return self.jobs(state=JobState.RUNNING, limit=None)

    def claim(self, job: CalibrationJob) -> tuple[JobStatus, bool]:
        """Record ``job`` as QUEUED unless it is known: ``(record, enqueue)``.

        ``enqueue`` is True when the caller must send the job to a worker:
        the record is new, or the job had FAILED or was CANCELLED, or was
        REJECTED for a dataset hash mismatch, and is now re-queued (reason
        cleared, deliveries reset). Otherwise the existing record comes back
        with False: queued, running and succeeded jobs are done once, and any
        other REJECTED job stays rejected (bad input never passes).
        """
        job_id = job.job_id
        while True:
            fresh = _queued(job_id, job.archetype)
            if self._insert(fresh):
                self._publish(fresh)
                return fresh, True
            before, after = self._transition(
                job_id, Actor.SUBMITTER, JobState.QUEUED,
                lambda s: _queued(job_id, job.archetype) if _may_resubmit(s) else None, quiet=True,
            )
            if before is None:  # expired or deleted in between: create it after all
                continue
            if after is None:
                return before, False
            self._reset_deliveries(job_id)
            log.info("job %s had %s (%s); queued again", job_id, before.state.value, before.reason)
            return after, True

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> tuple[JobStatus, bool]:
        """Cancel a job: ``(record, changed)``; NotFound for an unknown id.

        A queued job becomes CANCELLED at once (its message is dropped when a
        worker sees it); a running one is flagged ``cancel_requested`` and its
        worker stops at the next check. A finished job is left as it is
        (``changed`` False), as is a running one already flagged.
        """

        def change(status: JobStatus) -> JobStatus | None:
            if status.state is JobState.QUEUED:
                now = utcnow()
                return status.model_copy(update={
                    "state": JobState.CANCELLED, "reason": f"cancelled: {reason}", "cancel_requested": True,
                    "cancel_reason": reason, "finished_at": now,
                })
            if status.state is JobState.RUNNING and not status.cancel_requested:
                return status.model_copy(update={"cancel_requested": True, "cancel_reason": reason})
            return None

        for _ in range(5):  # the record may move on between the read and the write: look again
            current = self.get(job_id)
            if current.state is JobState.QUEUED:
                target = JobState.CANCELLED
            elif current.state is JobState.RUNNING and not current.cancel_requested:
                target = JobState.RUNNING
            else:
                return current, False
            before, after = self._transition(job_id, Actor.CANCEL, target, change, quiet=True)
            if before is None:
                raise NotFound(f"no job {job_id!r} in {self!r} (its record expired)")
            if after is not None:
                log.info("job %s: cancel requested (%s); now %s", job_id, reason, after.state.value)
                return after, True
        return self.get(job_id), False

    def mark_running(self, job_id: str, *, worker: str) -> JobStatus | None:
        """The job started on ``worker``; None (and nothing written) if it may not start."""
        return self._transition(
            job_id, Actor.WORKER, JobState.RUNNING, lambda s: s.model_copy(
                update={"state": JobState.RUNNING, "worker": worker, "started_at": utcnow()}
            )
        )[1]

    def progress(self, job_id: str, progress: Progress) -> JobStatus | None:
        """Record how far a running job has got."""
        return self._transition(
            job_id, Actor.WORKER, JobState.RUNNING, lambda s: s.model_copy(update={"progress": progress})
        )[1]

    def count_sampler_run(self, job_id: str) -> JobStatus | None:
        """The sampler starts (again) for a running job: one more in its ``sampler_runs``."""
        return self._transition(
            job_id, Actor.WORKER, JobState.RUNNING,
            lambda s: s.model_copy(update={"sampler_runs": s.sampler_runs + 1}), publish=False,
        )[1]

    def succeed(self, job_id: str, summary: CalibrationSummary) -> JobStatus | None:
        """The job succeeded (its summary is written): record its URIs, move ``latest`` if it should.

        The worker's own move is from RUNNING; where that is refused because
        the record was re-queued, had failed, or is gone, the summary in hand
        repairs it (see the module docstring). None if both are refused.
        """
        update = {
            "state": JobState.SUCCEEDED,
            "reason": None,
            "summary_uri": summary.summary_uri,
            "posterior_uri": summary.posterior_uri,
            "finished_at": utcnow(),
        }

        def change(status: JobStatus) -> JobStatus:
            return status.model_copy(update=update)

        current = self.find(job_id)
        actor = Actor.WORKER if current is not None and current.state is JobState.RUNNING else Actor.REPAIR
        after = self._finish_with(job_id, actor, summary, change, update)
        if after is not None:
            self.update_latest(summary)
        return after

    def repair(self, job_id: str, catalog: Catalog) -> JobStatus | None:
        """The repair rule, applied here only: a summary in the store means the job succeeded.

        A record the table lets the repairer move (none, queued, running,
        failed) whose summary is in ``catalog`` is marked succeeded with the
        summary's URIs, and ``latest`` moves as for a worker's ``succeed``;
        the record after. A final record (succeeded, rejected, cancelled) is
        left alone without reading the store. None when nothing was written.
        Every repair goes through here: the handler (a delivery of a finished
        job), the lease guard (a redelivery), ``hand_back``, ``calq reindex``
        (:func:`shared.jobs.submissions.repair_from_store`) and the client's submit.
        """
        record = self.find(job_id)
        if record is not None and not allowed(Actor.REPAIR, record.state, JobState.SUCCEEDED):
            return None
        try:
            summary = catalog.summary(job_id)
        except NotFound:
            log.info("job %s: no summary in the store; record left as it is", job_id)
            return None
        update = {
            "state": JobState.SUCCEEDED, "reason": None, "summary_uri": summary.summary_uri,
            "posterior_uri": summary.posterior_uri, "finished_at": utcnow(),
        }
        after = self._finish_with(job_id, Actor.REPAIR, summary, lambda s: s.model_copy(update=update), update)
        if after is not None:
            log.info("job %s repaired from the store: succeeded", job_id)
            self.update_latest(summary)
        return after

    def _finish_with(
        self, job_id: str, actor: Actor, summary: CalibrationSummary, change: Change, update: dict[str, Any]
    ) -> JobStatus | None:
        before, after = self._transition(job_id, actor, JobState.SUCCEEDED, change)
        if before is None and allowed(actor, None, JobState.SUCCEEDED):
            # No record (expired, or Redis flushed): the result still counts.
            created = JobStatus(job_id=job_id, archetype=summary.archetype, updated_at=utcnow(), **update)
            if self._insert(created):
                self._publish(created)
                return created
            before, after = self._transition(job_id, actor, JobState.SUCCEEDED, change)
        if after is None and before is not None and actor is Actor.WORKER:
            return self._transition(job_id, Actor.REPAIR, JobState.SUCCEEDED, change)[1]
        return after

    def fail(self, job_id: str, reason: str) -> JobStatus | None:
        """The job ran (or was dead-lettered) and could not finish; ``reason`` says why."""
        return self._finish(job_id, JobState.FAILED, reason)

    def reject(self, job_id: str, reason: str) -> JobStatus | None:
        """The job's input is bad and it will never be retried."""
        return self._finish(job_id, JobState.REJECTED, reason)

    def finish_cancelled(self, job_id: str, reason: str) -> JobStatus | None:
        """The worker stopped the job because it was cancelled."""
        return self._finish(job_id, JobState.CANCELLED, reason)

    def _finish(self, job_id: str, state: JobState, reason: str) -> JobStatus | None:
        return self._transition(
            job_id, Actor.WORKER, state,
            # a finished job's progress is history: a failed record must not show it frozen mid-run
            lambda s: s.model_copy(update={"state": state, "reason": reason, "finished_at": utcnow(), "progress": None}),
        )[1]

    def requeue_abandoned(self, job_id: str, *, reason: str, count_delivery: bool) -> JobStatus | None:
        """Return a RUNNING job whose worker is gone to QUEUED; None (nothing written) otherwise.

        The delivery that was abandoned was counted when it started; with
        ``count_delivery`` False (a hand-back at shutdown) that count is
        taken back, so it does not count towards ``max_deliveries``. Progress,
        worker and start time are cleared; ``reason`` says why it was re-queued.
        """

        def change(status: JobStatus) -> JobStatus:
            return status.model_copy(update={
                "state": JobState.QUEUED, "reason": reason, "worker": None, "progress": None, "started_at": None,
            })

        before, after = self._transition(job_id, Actor.REAPER, JobState.QUEUED, change)
        if after is not None and not count_delivery and before is not None and before.deliveries > 0:
            count = self._count_delivery(job_id, before.attempt, by=-1)
            after = self._transition(
                job_id, Actor.WORKER, JobState.QUEUED, lambda s: s.model_copy(update={"deliveries": count}),
                publish=False,
            )[1] or after
        if after is not None:
            log.info("job %s re-queued (%s)", job_id, reason)
        return after

    def _transition(
        self, job_id: str, actor: Actor, target: JobState, change: Change, *, publish: bool = True,
        quiet: bool = False,
    ) -> tuple[JobStatus | None, JobStatus | None]:
        """Apply ``change`` if the table allows ``actor`` to move the record to ``target``: ``(before, after)``.

        A refused change is logged (``quiet``: at debug level, for callers
        that expect refusals) and not written; ``after`` is then None.
        """
        refused: list[JobState] = []

        def guarded(status: JobStatus) -> JobStatus | None:
            refused.clear()
            if not allowed(actor, status.state, target):
                refused.append(status.state)
                return None
            after = change(status)
            if after is None:
                return None
            if after.state is not target:  # a change must land where the table said it would
                refused.append(status.state)
                return None
            return after.model_copy(update={"updated_at": utcnow()})

        before, after = self._mutate(job_id, guarded)
        if before is None:
            (log.debug if quiet else log.warning)(
                "job %s has no record: %s cannot move it to %s", job_id, actor.value, target.value
            )
        elif refused:
            (log.debug if quiet else log.warning)(
                "refused: %s may not move job %s from %s to %s", actor.value, job_id, refused[0].value, target.value
            )
        elif publish and after is not None:
            self._publish(after)
        return before, after

    def record_delivery(self, job_id: str, attempt: int = 0) -> int:
        """Count one more delivery of attempt ``attempt`` of the job; returns the count.

        A job that keeps killing its worker is delivered again and again
        with the same attempt number; the caller dead-letters it past
        ``max_deliveries``. The count (and the attempt) is also stored in a
        queued or running record's ``deliveries``.
        """
        count = self._count_delivery(job_id, attempt)
        target = self.find(job_id)
        if target is not None:
            self._transition(
                job_id, Actor.WORKER, target.state,
                lambda s: s.model_copy(update={"deliveries": count, "attempt": attempt}), publish=False,
            )
        return count

    def record_invalid(self, reason: str, *, job_id: str | None = None) -> None:
        """A message was refused (it fails to parse, or its content does not give its id): log and keep it.

        No record changes. ``job_id`` is the id the message claimed, if any.
        """
        log.warning("invalid message%s dropped: %s", f" claiming {job_id}" if job_id else "", _clip(reason, 300))
        self._append_invalid({
            "at": utcnow().isoformat(), "job_id": _clip(job_id or "", 100), "reason": _clip(reason),
        })

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

    def latest_all(self) -> dict[tuple[str, str], LatestPointer]:
        """Every usable latest pointer, keyed by ``(archetype, event)``; corrupt ones are skipped."""
        found: dict[tuple[str, str], LatestPointer] = {}
        for key, slot, raw in self._raw_pointers():
            pointer = self._pointer_or_none(key, slot, raw)
            if pointer is not None:
                found[slot] = pointer
        return found

    def latest(self, archetype: str, event: str) -> LatestPointer | None:
        """The current calibration of ``archetype`` for ``event``, or None (also when the slot is corrupt)."""
        key, raw = self._raw_pointer((archetype, event))
        return self._pointer_or_none(key, (archetype, event), raw)

    def rebuild_latest(self, catalog: Catalog) -> int:
        """Drop every latest pointer and rebuild them from the summaries in the store.

        The pointers are dropped *before* the store is read, and rebuilt by
        the same forward-only merge jobs use, so a job finishing meanwhile is
        never lost. Readers see no pointer until the rebuild ends. Returns
        the number of pointers written.
        """
        self._drop_latest()
        return self.merge_latest(catalog)

    def merge_latest(self, catalog: Catalog) -> int:
        """Merge the store's newest pointers into the registry's, forward-only (nothing dropped); how many were written.

        One store, one truth: fits the registry never heard of (made in
        embedded mode on the same store, or before Redis was flushed) count as
        they do in embedded mode.
        """
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
        with self._listener(job_id) as pause:
            return follow(lambda: self.get(job_id), job_id=job_id, timeout=timeout, on_update=on_update,
                          pause=pause, poll_s=poll_s)


def follow(
    read: Callable[[], JobStatus],
    *,
    job_id: str,
    timeout: float,
    on_update: Callable[[JobStatus], None] | None,
    pause: Callable[[float], None],
    poll_s: float,
) -> JobStatus:
    """Read a job's record until it finishes (``on_update`` hears the first and every changed one); the final record.

    ``pause(seconds)`` waits between reads (it may return early on a change
    notification). Raises :class:`WaitTimeout` after ``timeout`` seconds.
    The registry's :meth:`JobRegistry.wait` and the API client's wait both follow a job this way.
    """
    deadline = time.monotonic() + timeout
    last: JobStatus | None = None
    while True:
        status = read()
        if status != last:
            last = status
            if on_update is not None:
                on_update(status)
        if status.state.finished:
            return status
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(f"job {job_id} still {status.state.value} after {timeout:g} s", status)
        pause(min(poll_s, remaining))


def _check_id(job_id: str) -> None:
    if not SAFE_ID.match(job_id):
        raise ValueError(f"job id {job_id!r} cannot name a file")

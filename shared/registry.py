"""calq's own job records, and the ``latest`` pointers.

Celery reports an unknown task id as PENDING and a task id is no uniqueness
constraint (celery/celery#4070), so calq keeps its own record of every job:
a :class:`~shared.job.JobStatus`, keyed by the content-derived job id.

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
  (:func:`shared.catalog.is_newer`), atomically, so two workers finishing at
  once cannot move it backwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from shared.catalog import Catalog, LatestPointer, is_newer, newest_pointers, pointers_for
from shared.errors import BrokerUnavailable, NotFound
from shared.job import CalibrationJob, JobState, JobStatus, Progress, utcnow
from shared.settings import redact_url
from shared.storage import Store
from shared.summary import CalibrationSummary

log = logging.getLogger(__name__)

DEFAULT_RECORD_TTL_S = 30 * 24 * 3600
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

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
        they fitted), and only forward by :func:`shared.catalog.is_newer`.
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


# -- Redis ---------------------------------------------------------------------


class RedisRegistry(JobRegistry):
    """Job records in Redis, shared by the producers and workers of a fleet."""

    def __init__(
        self,
        redis_client: Any,
        *,
        prefix: str = "calq",
        record_ttl_s: int = DEFAULT_RECORD_TTL_S,
        url: str | None = None,
    ) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.record_ttl_s = record_ttl_s
        self.channel = f"{prefix}:jobs"
        self._latest_key = f"{prefix}:latest"
        self._url = redact_url(url) if url else _describe(redis_client)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "RedisRegistry":
        """A registry on a new client for ``url`` (connect and read time out after 5 s)."""
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5, health_check_interval=30)
        return cls(client, url=url, **options)

    def __repr__(self) -> str:
        return f"RedisRegistry({self._url!r}, prefix={self.prefix!r})"

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _deliveries_key(self, job_id: str, attempt: int) -> str:
        return f"{self.prefix}:deliveries:{job_id}:{attempt}"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Map connection and timeout errors to BrokerUnavailable, without credentials."""
        import redis.exceptions as rex

        try:
            yield
        except (rex.ConnectionError, rex.TimeoutError) as exc:
            raise BrokerUnavailable(f"Redis unavailable at {self._url}: {type(exc).__name__}: {exc}") from exc

    def find(self, job_id: str) -> JobStatus | None:
        with self._errors():
            raw = self.redis.get(self._job_key(job_id))
        return None if raw is None else JobStatus.model_validate_json(raw)

    def _insert(self, status: JobStatus) -> bool:
        with self._errors():
            return bool(
                self.redis.set(self._job_key(status.job_id), status.model_dump_json(), nx=True, ex=self.record_ttl_s)
            )

    def _mutate(self, job_id: str, change: Change) -> tuple[JobStatus | None, JobStatus | None]:
        key = self._job_key(job_id)

        def attempt(pipe: Any) -> tuple[JobStatus | None, JobStatus | None]:
            raw = pipe.get(key)
            if raw is None:
                return None, None
            before = JobStatus.model_validate_json(raw)
            after = change(before)
            if after is not None:
                pipe.multi()
                pipe.set(key, after.model_dump_json(), ex=self.record_ttl_s)
            return before, after

        with self._errors():
            return self.redis.transaction(attempt, key, value_from_callable=True)

    def _count_delivery(self, job_id: str, attempt: int) -> int:
        key = self._deliveries_key(job_id, attempt)
        with self._errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, self.record_ttl_s)
            count, _ = pipe.execute()
        return int(count)

    def _reset_deliveries(self, job_id: str) -> None:
        pattern = f"{_glob_escape(self.prefix)}:deliveries:{_glob_escape(job_id)}:*"
        with self._errors():
            keys = list(self.redis.scan_iter(match=pattern, count=1000))
            if keys:
                self.redis.delete(*keys)

    def _merge(self, pointers: list[LatestPointer]) -> list[LatestPointer]:
        best = newest_pointers(pointers)
        fields = [_field(slot) for slot in best]

        def attempt(pipe: Any) -> list[LatestPointer]:
            current = pipe.hmget(self._latest_key, fields)
            moved = [
                p
                for p, raw in zip(best.values(), current)
                if is_newer(p, None if raw is None else LatestPointer.model_validate_json(raw))
            ]
            if moved:
                pipe.multi()
                pipe.hset(self._latest_key, mapping={_field(p.slot): p.model_dump_json() for p in moved})
            return moved

        if not best:
            return []
        with self._errors():
            return self.redis.transaction(attempt, self._latest_key, value_from_callable=True)

    def latest_all(self) -> dict[tuple[str, str], LatestPointer]:
        with self._errors():
            raw = self.redis.hgetall(self._latest_key)
        pointers = (LatestPointer.model_validate_json(v) for v in raw.values())
        return {p.slot: p for p in pointers}

    def latest(self, archetype: str, event: str) -> LatestPointer | None:
        with self._errors():
            raw = self.redis.hget(self._latest_key, _field((archetype, event)))
        return None if raw is None else LatestPointer.model_validate_json(raw)

    def _drop_latest(self) -> None:
        with self._errors():
            self.redis.delete(self._latest_key)

    def _publish(self, status: JobStatus) -> None:
        with self._errors():
            self.redis.publish(self.channel, _message(status))

    def subscribe(self) -> Any:
        """A redis PubSub subscribed to the job-change channel ``{prefix}:jobs``."""
        with self._errors():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(self.channel)
        return pubsub

    @contextlib.contextmanager
    def _listener(self, job_id: str) -> Iterator[Callable[[float], None]]:
        import redis.exceptions as rex

        pubsub = self.subscribe()
        broken = False

        def pause(seconds: float) -> None:
            nonlocal broken
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                if broken:
                    time.sleep(left)
                    return
                try:
                    message = pubsub.get_message(timeout=left)
                except rex.RedisError as exc:  # fall back to polling; reads report real outages
                    log.debug("job-change subscription lost: %s", exc)
                    broken = True
                    continue
                if message is None or message.get("type") != "message":
                    continue
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    if json.loads(message["data"]).get("job_id") == job_id:
                        return

        try:
            yield pause
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()


def _field(slot: tuple[str, str]) -> str:
    return f"{slot[0]}:{slot[1]}"


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _describe(client: Any) -> str:
    """``redis://host:port/db`` of a client, never with its password."""
    try:
        kwargs = client.connection_pool.connection_kwargs
    except AttributeError:
        return type(client).__name__
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


# -- the store (embedded mode) -------------------------------------------------

_STORE_LOCKS: dict[str, threading.Condition] = {}
_STORE_LOCKS_GUARD = threading.Lock()


def _store_condition(url: str) -> threading.Condition:
    with _STORE_LOCKS_GUARD:
        return _STORE_LOCKS.setdefault(url, threading.Condition(threading.RLock()))


class StoreRegistry(JobRegistry):
    """Job records as JSON files in the store, for embedded (single-process) mode.

    Updates are serialised by a lock shared by every StoreRegistry on the
    same store URL in this process; separate processes writing the same
    store at once are not coordinated (the fleet uses Redis). There is no
    pub/sub: :meth:`wait` wakes on changes made in this process and polls
    otherwise.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cond = _store_condition(store.url)

    def __repr__(self) -> str:
        return f"StoreRegistry({self.store!r})"

    @staticmethod
    def _job_key(job_id: str) -> str:
        return f"jobs/{job_id}.json"

    @staticmethod
    def _deliveries_key(job_id: str) -> str:
        return f"deliveries/{job_id}.json"

    @staticmethod
    def _latest_key(archetype: str, event: str) -> str:
        return f"latest/{archetype}/{event}.json"

    def _read(self, key: str) -> bytes | None:
        try:
            return self.store.get_bytes(key)
        except NotFound:
            return None

    def find(self, job_id: str) -> JobStatus | None:
        if not _SAFE_ID.match(job_id):
            return None
        raw = self._read(self._job_key(job_id))
        return None if raw is None else JobStatus.model_validate_json(raw)

    def _write(self, status: JobStatus) -> None:
        _check_id(status.job_id)
        self.store.put_bytes(self._job_key(status.job_id), status.model_dump_json(indent=2).encode())

    def _insert(self, status: JobStatus) -> bool:
        with self._cond:
            if self.find(status.job_id) is not None:
                return False
            self._write(status)
            return True

    def _mutate(self, job_id: str, change: Change) -> tuple[JobStatus | None, JobStatus | None]:
        with self._cond:
            before = self.find(job_id)
            if before is None:
                return None, None
            after = change(before)
            if after is not None:
                self._write(after)
            return before, after

    def _count_delivery(self, job_id: str, attempt: int) -> int:
        _check_id(job_id)
        key = self._deliveries_key(job_id)
        with self._cond:
            raw = self._read(key)
            counts: dict[str, int] = json.loads(raw) if raw is not None else {}
            counts[str(attempt)] = counts.get(str(attempt), 0) + 1
            self.store.put_json(key, counts)
            return counts[str(attempt)]

    def _reset_deliveries(self, job_id: str) -> None:
        with self._cond:
            self.store.delete(self._deliveries_key(job_id))

    def _merge(self, pointers: list[LatestPointer]) -> list[LatestPointer]:
        moved = []
        with self._cond:
            for slot, pointer in newest_pointers(pointers).items():
                key = self._latest_key(*slot)
                raw = self._read(key)
                if is_newer(pointer, None if raw is None else LatestPointer.model_validate_json(raw)):
                    self.store.put_bytes(key, pointer.model_dump_json(indent=2).encode())
                    moved.append(pointer)
        return moved

    def latest_all(self) -> dict[tuple[str, str], LatestPointer]:
        pointers: dict[tuple[str, str], LatestPointer] = {}
        for uri in self._latest_uris():
            raw = self._read(uri)
            if raw is not None:
                pointer = LatestPointer.model_validate_json(raw)
                pointers[pointer.slot] = pointer
        return pointers

    def latest(self, archetype: str, event: str) -> LatestPointer | None:
        if not (_SAFE_ID.match(archetype) and _SAFE_ID.match(event)):
            return None
        raw = self._read(self._latest_key(archetype, event))
        return None if raw is None else LatestPointer.model_validate_json(raw)

    def _latest_uris(self) -> Iterable[str]:
        return [u for u in self.store.list("latest") if u.endswith(".json")]

    def _drop_latest(self) -> None:
        with self._cond:
            for uri in self._latest_uris():
                self.store.delete(uri)

    def _publish(self, status: JobStatus) -> None:
        with self._cond:
            self._cond.notify_all()

    @contextlib.contextmanager
    def _listener(self, job_id: str) -> Iterator[Callable[[float], None]]:
        def pause(seconds: float) -> None:
            with self._cond:
                self._cond.wait(seconds)

        yield pause


def _check_id(job_id: str) -> None:
    if not _SAFE_ID.match(job_id):
        raise ValueError(f"job id {job_id!r} cannot name a file")


__all__ = ["DEFAULT_RECORD_TTL_S", "JobRegistry", "RedisRegistry", "StoreRegistry", "WaitTimeout"]

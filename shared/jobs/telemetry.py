"""What workers publish about themselves in Redis, and the fleet view built from it (``calq fleet``).

Keys, beside the job registry's (same Redis, same ``prefix``)::

    {prefix}:fleet:worker:{holder}   one worker process's heartbeat record (JSON, expires after ttl_s)
    {prefix}:fleet:workers           sorted set: holder → time of its last heartbeat (the index of the above)
    {prefix}:fleet:recent            sorted set: one JSON entry per finished job, scored by its finish time;
                                     kept for RECENT_WINDOW_S and at most RECENT_KEEP entries
    {prefix}:fleet:totals            hash: dead_letters, invalid_messages (counted since the fleet began)

``holder`` is the lease holder name, ``{celery node}#{pid}``. A record is
written by its own worker process every few seconds (:func:`publish_beat`); a
worker that dies stops writing, its record expires, and the next reader
drops it from the index. The view is read in a handful of round trips,
however many jobs the registry holds.

Everything here is read back as untrusted input: anyone who can write to
this Redis could have written it. A record or entry that does not parse
against its schema (types, lengths, finite non-negative numbers) is skipped
and counted in :attr:`FleetView.skipped`, never echoed; a reader prints the
values it kept through its own sanitizer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.jobs.metrics import queue_depths

log = logging.getLogger(__name__)

#: How far back the fleet view's rates and percentiles look.
RECENT_WINDOW_S = 3600.0
#: At most this many finished jobs are kept for the view (a fleet finishing more per hour sees the newest).
RECENT_KEEP = 20_000
#: Longest text kept in a heartbeat field (the last error is clipped to it).
MAX_TEXT = 300
#: Most worker records one view reads.
MAX_WORKERS = 1_000

_Text = Field(None, max_length=MAX_TEXT)


class _Untrusted(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and (not math.isfinite(value) or value < 0):
            raise ValueError("not a finite non-negative number")
        return value


class WorkerBeat(_Untrusted):
    """One worker process, as it last said: who it is, what it runs, how it has been doing."""

    worker: str = Field(min_length=1, max_length=MAX_TEXT, description="Celery node name, e.g. calq-cpu0@host")
    pid: int = Field(ge=1)
    node: str = Field(min_length=1, max_length=MAX_TEXT, description="host name")
    device: str = Field(max_length=64)
    version: str = Field(max_length=64)
    state: Literal["idle", "busy"]
    job_id: str | None = _Text
    archetype: str | None = _Text
    phase: str | None = Field(None, max_length=64)
    lease_since: float | None = Field(None, description="when the running job's lease was taken (epoch seconds)")
    heartbeat_at: float = Field(description="epoch seconds of this record")
    started_at: float = Field(description="epoch seconds the process started")
    jobs_done: int = Field(0, ge=0)
    last_error: str | None = _Text

    @property
    def holder(self) -> str:
        return f"{self.worker}#{self.pid}"


class FinishedJob(_Untrusted):
    """One finished job, as the fleet view counts it."""

    job_id: str = Field(max_length=MAX_TEXT)
    archetype: str = Field(max_length=MAX_TEXT)
    state: Literal["succeeded", "failed", "rejected", "cancelled"]
    seconds: float = Field(description="start to finish")
    converged: bool | None = None
    finished_at: float


class WorkerView(BaseModel):
    """A worker record with its ages, as ``calq fleet`` shows it."""

    beat: WorkerBeat
    heartbeat_age_s: float
    lease_age_s: float | None


class ArchetypeStats(BaseModel):
    jobs: int
    p50_s: float | None
    p95_s: float | None
    convergence_failures: int = Field(description="succeeded jobs whose fit did not converge, in the last hour")


class FleetView(BaseModel):
    """The whole fleet at one moment: workers, queues, totals, rates and per-archetype statistics."""

    at: float
    workers: list[WorkerView]
    queues: dict[str, int | None] = Field(description="messages waiting per queue; None where Redis did not say")
    dead_letters: int
    invalid_messages: int
    jobs_per_minute_5m: float
    jobs_per_minute_60m: float
    finished_last_hour: dict[str, int] = Field(description="state → jobs finished in the last hour")
    archetypes: dict[str, ArchetypeStats]
    skipped: int = Field(0, description="records or entries that did not parse and were left out")


# -- keys ----------------------------------------------------------------------------


def _worker_key(prefix: str, holder: str) -> str:
    return f"{prefix}:fleet:worker:{holder}"


def _index_key(prefix: str) -> str:
    return f"{prefix}:fleet:workers"


def _recent_key(prefix: str) -> str:
    return f"{prefix}:fleet:recent"


def _totals_key(prefix: str) -> str:
    return f"{prefix}:fleet:totals"


TOTALS = ("dead_letters", "invalid_messages")


# -- writing (worker processes) ------------------------------------------------------


def publish_beat(redis_client: Any, prefix: str, beat: WorkerBeat, *, ttl_s: float) -> None:
    """Write ``beat`` with a TTL and index it (one round trip)."""
    pipe = redis_client.pipeline(transaction=False)
    pipe.set(_worker_key(prefix, beat.holder), beat.model_dump_json(), px=max(1, int(ttl_s * 1000)))
    pipe.zadd(_index_key(prefix), {beat.holder: beat.heartbeat_at})
    pipe.execute()


def remove_beat(redis_client: Any, prefix: str, holder: str) -> None:
    """A worker process that stops cleanly takes its record away."""
    pipe = redis_client.pipeline(transaction=False)
    pipe.delete(_worker_key(prefix, holder))
    pipe.zrem(_index_key(prefix), holder)
    pipe.execute()


def record_finish(redis_client: Any, prefix: str, job: FinishedJob, *, keep: int = RECENT_KEEP,
                  window_s: float = RECENT_WINDOW_S) -> None:
    """Add a finished job to the recent list, dropping what is older than the window or past ``keep``."""
    key = _recent_key(prefix)
    pipe = redis_client.pipeline(transaction=False)
    pipe.zadd(key, {job.model_dump_json(): job.finished_at})
    pipe.zremrangebyscore(key, "-inf", f"({job.finished_at - window_s}")
    pipe.zremrangebyrank(key, 0, -(keep + 1))
    pipe.execute()


def count(redis_client: Any, prefix: str, total: str, by: int = 1) -> None:
    """Add ``by`` to one of :data:`TOTALS`."""
    if total not in TOTALS:
        raise ValueError(f"unknown fleet total {total!r}: one of {', '.join(TOTALS)}")
    redis_client.hincrby(_totals_key(prefix), total, by)


# -- reading (calq fleet) ------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) by linear interpolation between order statistics; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def _parse(model: type[BaseModel], raw: Any) -> Any:
    try:
        return model.model_validate_json(raw)
    except (ValidationError, ValueError, TypeError):
        return None


def _count_value(raw: Any) -> int | None:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def read_fleet(redis_client: Any, prefix: str, queues: Sequence[str], *, now: float | None = None) -> FleetView:
    """The fleet as its workers last published it (see the module docstring for what is skipped)."""
    now = time.time() if now is None else now
    skipped = 0
    holders = redis_client.zrange(_index_key(prefix), 0, MAX_WORKERS - 1)
    raws = redis_client.mget([_worker_key(prefix, _text(h)) for h in holders]) if holders else []
    workers, gone = [], []
    for holder, raw in zip(holders, raws):
        if raw is None:
            gone.append(holder)  # expired: that worker stopped publishing
            continue
        beat = _parse(WorkerBeat, raw)
        if beat is None or beat.holder != _text(holder):
            skipped += 1
            continue
        workers.append(WorkerView(
            beat=beat,
            heartbeat_age_s=max(0.0, now - beat.heartbeat_at),
            lease_age_s=max(0.0, now - beat.lease_since) if beat.state == "busy" and beat.lease_since else None,
        ))
    if gone:
        redis_client.zrem(_index_key(prefix), *gone)
    workers.sort(key=lambda w: (w.beat.node, w.beat.worker, w.beat.pid))

    try:
        depths: dict[str, int | None] = dict(queue_depths(redis_client, queues))
    except Exception as exc:  # e.g. a key of the wrong type where a queue should be
        log.warning("could not read the queue depths (%s)", type(exc).__name__)
        depths = {q: None for q in queues}

    totals_raw = redis_client.hmget(_totals_key(prefix), list(TOTALS))
    totals = {}
    for name, raw in zip(TOTALS, totals_raw):
        value = 0 if raw is None else _count_value(raw)
        if value is None:
            skipped += 1
        totals[name] = value or 0

    entries = redis_client.zrangebyscore(_recent_key(prefix), now - RECENT_WINDOW_S, "+inf")
    finished = []
    for raw in entries:
        job = _parse(FinishedJob, raw)
        if job is None:
            skipped += 1
        else:
            finished.append(job)
    if skipped:
        log.warning("skipped %d fleet record(s) that did not parse (not written by a calq worker?)", skipped)
    return FleetView(
        at=now, workers=workers, queues=depths,
        dead_letters=totals["dead_letters"], invalid_messages=totals["invalid_messages"],
        jobs_per_minute_5m=sum(1 for j in finished if j.finished_at >= now - 300) / 5.0,
        jobs_per_minute_60m=len(finished) / 60.0,
        finished_last_hour=_by_state(finished),
        archetypes=_by_archetype(finished),
        skipped=skipped,
    )


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _by_state(finished: Sequence[FinishedJob]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in finished:
        counts[job.state] = counts.get(job.state, 0) + 1
    return dict(sorted(counts.items()))


def _by_archetype(finished: Sequence[FinishedJob]) -> dict[str, ArchetypeStats]:
    groups: dict[str, list[FinishedJob]] = {}
    for job in finished:
        groups.setdefault(job.archetype, []).append(job)
    stats = {}
    for archetype, jobs in sorted(groups.items()):
        seconds = [j.seconds for j in jobs if j.state == "succeeded"]
        stats[archetype] = ArchetypeStats(
            jobs=len(jobs), p50_s=percentile(seconds, 0.5), p95_s=percentile(seconds, 0.95),
            convergence_failures=sum(1 for j in jobs if j.state == "succeeded" and j.converged is False),
        )
    return stats


def beat_from(fields: Mapping[str, Any]) -> WorkerBeat:
    """A heartbeat record from this process's own fields (text clipped to :data:`MAX_TEXT`)."""
    clipped = {k: (v[: MAX_TEXT - 1] + "…" if isinstance(v, str) and len(v) > MAX_TEXT else v) for k, v in fields.items()}
    return WorkerBeat(**clipped)


__all__ = [
    "RECENT_KEEP",
    "RECENT_WINDOW_S",
    "ArchetypeStats",
    "FinishedJob",
    "FleetView",
    "WorkerBeat",
    "WorkerView",
    "beat_from",
    "count",
    "percentile",
    "publish_beat",
    "read_fleet",
    "record_finish",
    "remove_beat",
]

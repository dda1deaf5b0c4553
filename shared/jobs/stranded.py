"""Queued records whose message is nowhere: found by ``calq reindex`` and sent again.

A queued record promises a message on its way to a worker. Redis can lose
the message and keep the record: a FLUSHALL after the record was written
again (a hand-back's re-queue, a resubmission), a purge of a broker queue
(``celery purge``, a deleted list), a restart from an older snapshot.
Nothing would ever run such a job, and ``calq wait`` would wait for ever.

A queued record is *stranded* when the registry last wrote it more than
``grace_s`` ago (a producer writes the record before it sends the message)
and its job id is in none of the places its message can be, read in the
order a message moves through them, so one moving while they are read is
still seen::

    batch lanes' held lists ─▶ broker queue lists ─▶ kombu's unacked hash ─▶ the leased set
    ({prefix}:lanes:held:*)    (calq's queues and      (delivered, not yet      ({prefix}:leased: running,
                                their priority lists)   acknowledged)            or the reaper's to hand back)

A message names a job by its task id (a single job's is its job id) or by
the job messages in its arguments (a batch task carries several). Each
stranded job is sent again with the message and queue of its submission
(:mod:`shared.jobs.submissions`), or else the message and queue its last
lease kept; its record is read once more first and must still be the same
queued one. A stranded job with neither is logged and left.

What lies in the broker's lists and hash is read as untrusted (anyone with
the Redis password can push there): a message that does not parse names no
job. A forged one can only hide a job from this check, never send one.

This needs the fleet's registry and leases (``calq reindex`` and the
API's pass them; without leases there is no search) and leave to read kombu's
unacked hash: a Redis user without it (the API's, :mod:`shared.jobs.acl`)
finds nothing, with a warning, rather than resend jobs a worker holds.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from shared.contract.job import JobState, JobStatus, utcnow
from shared.storage.store import Store

log = logging.getLogger(__name__)

#: How long a queued record may have no message anywhere before it counts as stranded (producers write the
#: record, then the submission object, then send: seconds at most).
GRACE_S = 120.0
#: kombu's Redis transport: the hash of delivered, unacknowledged messages, and a priority list's name suffix.
UNACKED_KEY = "unacked"
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
#: LRANGE page: long queues are read in pieces.
PAGE = 1000


def queue_lists(queues: Iterable[str]) -> list[str]:
    """The Redis lists kombu keeps ``queues`` in: each queue's own and its priority steps'."""
    return [q if step == 0 else f"{q}{PRIORITY_SEPARATOR}{step}" for q in queues for step in PRIORITY_STEPS]


def named_jobs(raw: bytes | str) -> set[str]:
    """The job ids a kombu message (a queue list's entry) names: its task id and its job messages' ids."""
    try:
        envelope = json.loads(raw)
        found = {envelope.get("headers", {}).get("id")}
        body = envelope.get("body")
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        first = args[0] if args else None
        found.update(m.get("job_id") for m in (first if isinstance(first, list) else [first]) if isinstance(m, dict))
    except (ValueError, TypeError, AttributeError, KeyError, IndexError):  # not a message: names nothing
        return set()
    return {job_id for job_id in found if isinstance(job_id, str)}


def _unacked_jobs(raw: bytes) -> set[str]:
    """The job ids an unacked entry (``[message, exchange, routing key]``) names."""
    try:
        return named_jobs(json.dumps(json.loads(raw)[0]))
    except (ValueError, TypeError, KeyError, IndexError):
        return set()


def _list_entries(redis: Any, key: str) -> Iterator[bytes]:
    start = 0
    while page := redis.lrange(key, start, start + PAGE - 1):
        yield from page
        start += PAGE


def _held_jobs(lanes: Any) -> set[str]:
    """The job ids held in the batch lanes (entries ``{"job": message, "queue": name}``)."""
    found: set[str] = set()
    for owner in lanes.held():
        for raw in _list_entries(lanes.redis, lanes.held_key(owner)):
            try:
                job_id = json.loads(raw)["job"]["job_id"]
            except (ValueError, TypeError, KeyError):
                continue
            if isinstance(job_id, str):
                found.add(job_id)
    return found


def messages_on_the_way(redis: Any, *, lanes: Any, queues: Iterable[str]) -> set[str]:
    """Every job id a held batch entry, a queued message or an unacked one names (in that order: see the docstring)."""
    found = _held_jobs(lanes)
    for key in queue_lists(queues):
        for raw in _list_entries(redis, key):
            found |= named_jobs(raw)
    for raw in redis.hvals(UNACKED_KEY):
        found |= _unacked_jobs(raw)
    return found


def _older_than(status: JobStatus, grace_s: float, now: datetime) -> bool:
    written = status.updated_at or status.submitted_at
    return written is not None and now - written > timedelta(seconds=grace_s)


def stranded(registry: Any, *, leases: Any, lanes: Any, queues: Iterable[str], grace_s: float = GRACE_S,
             now: datetime | None = None) -> list[JobStatus]:
    """The queued records (written more than ``grace_s`` ago) whose message is nowhere (see the module docstring)."""
    import redis as redis_errors

    now = now or utcnow()
    candidates = [s for s in registry.jobs(state=JobState.QUEUED, limit=None) if _older_than(s, grace_s, now)]
    if not candidates:
        return []
    try:
        on_the_way = messages_on_the_way(registry.redis, lanes=lanes, queues=queues)
    except redis_errors.exceptions.NoPermissionError as exc:
        log.warning("not looking for queued jobs whose message was lost: this Redis user may not read the broker's "
                    "queues and unacknowledged messages (%s); run 'calq reindex' as the operator", exc)
        return []
    return [s for s in candidates if s.job_id not in on_the_way and not leases.leased(s.job_id)]


def _message_of(store: Store, leases: Any, job_id: str) -> tuple[dict[str, Any], str] | None:
    """The message and queue to send ``job_id`` with: its submission's, else its last lease's, else None."""
    from shared.jobs.submissions import submission

    found = submission(store, job_id)
    if found is not None:
        job, queue = found
        return job.to_message(), queue
    resend = leases.resend_info(job_id)
    if resend is not None and isinstance(resend.get("message"), dict) and resend.get("queue"):
        return resend["message"], resend["queue"]
    return None


def resend_stranded(registry: Any, store: Store, leases: Any, publish: Callable[[dict[str, Any], str], Any], *,
                    grace_s: float = GRACE_S) -> list[str]:
    """Send again every stranded job of the fleet's ``registry`` (``publish(message, queue)``); their ids."""
    from shared.jobs.celery_app import ALL_QUEUES
    from shared.jobs.lanes import BatchLanes

    lanes = BatchLanes(registry.redis, prefix=registry.prefix)
    resent = []
    for status in stranded(registry, leases=leases, lanes=lanes, queues=ALL_QUEUES, grace_s=grace_s):
        again = registry.find(status.job_id)
        if again is None or again.state is not JobState.QUEUED or again.updated_at != status.updated_at:
            continue  # it moved while we looked: it is on its way
        found = _message_of(store, leases, status.job_id)
        if found is None:
            log.error("job %s is queued but its message is lost, and neither a submission nor a lease kept it: "
                      "submit it again", status.job_id)
            continue
        message, queue = found
        publish(message, queue)
        resent.append(status.job_id)
        log.warning("job %s: queued, but its message was in no queue and no worker held it; sent again on %s",
                    status.job_id, queue)
    return resent

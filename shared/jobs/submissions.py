"""Submissions recorded where a Redis flush does not reach: the store.

A job's record and its queued message live in Redis; a FLUSHALL, or a Redis
restarted without its data, loses both, and with them every job that was
queued. So the producer also writes each job it sends to the fleet to the
store, before the message is enqueued::

    submissions/{job_id}.json   {"message": <the job message>, "queue": <the queue it was sent to>}

:func:`requeue_lost` (what ``calq reindex`` runs, after the records the store
proves finished were repaired) sends again every recorded submission that
has neither a summary in the store nor a record in the registry: nothing
that was submitted is lost for good. A record Redis kept while losing its
message (queued, its message in no queue) is sent again with its
submission's message and queue too (:mod:`shared.jobs.stranded`). ``calq wait`` on such a job says the
registry lost it and what to run (:func:`lost`).

A submission object is read back as untrusted input (anyone holding the
store's key can write one): its message must pass the job schema, its file
name must be the job id its content gives, and its queue must be one of
calq's. Anything else is skipped with a warning naming the key, never its
content. A job re-queued from a forged submission is still only a job
message: the worker checks it like any other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from shared.contract.domain import SAFE_ID
from shared.contract.errors import NotFound
from shared.contract.job import CalibrationJob
from shared.storage.store import Store

log = logging.getLogger(__name__)

SUBMISSIONS_PREFIX = "submissions"
#: A submission object is a job message and a queue name: anything larger is not one.
MAX_SUBMISSION_BYTES = 64 * 1024


class _NotASubmission(Exception):
    """What lies at a submission key is not one (calq's own words: safe to log)."""


def submission_key(job_id: str) -> str:
    """Key of the submission object of ``job_id``."""
    return f"{SUBMISSIONS_PREFIX}/{job_id}.json"


def record_submission(store: Store, job: CalibrationJob, *, queue: str) -> str:
    """Write ``job``'s submission to the store (before its message is enqueued); its URI."""
    return store.put_json(submission_key(job.job_id), {"message": job.to_message(), "queue": queue})


def _read(store: Store, uri: str) -> tuple[CalibrationJob, str]:
    """The ``(job, queue)`` of the submission at ``uri``; raises on anything else (see the module docstring)."""
    from shared.jobs.celery_app import ALL_QUEUES

    data = store.get_bytes(uri)
    if len(data) > MAX_SUBMISSION_BYTES:
        raise _NotASubmission(f"larger than {MAX_SUBMISSION_BYTES} bytes")
    body = json.loads(data)
    job = CalibrationJob.model_validate(body["message"])
    queue = body["queue"]
    if uri != store.uri(submission_key(job.job_id)) or queue not in ALL_QUEUES:
        raise _NotASubmission("not at its own job's key, or not one of calq's queues")
    return job, queue


def _readable(store: Store, uri: str) -> tuple[CalibrationJob, str] | None:
    """:func:`_read`, or None with a warning naming the key when what lies there is no submission."""
    try:
        return _read(store, uri)
    except Exception as exc:  # any content at all may lie there: only calq's own words are logged
        log.warning("skipping submission %s: %s", uri, exc if isinstance(exc, _NotASubmission) else type(exc).__name__)
        return None


def submitted(store: Store) -> Iterator[tuple[CalibrationJob, str]]:
    """Every readable submission in the store: ``(job, queue)``; bad ones skipped with a warning naming the key."""
    for uri in store.list(SUBMISSIONS_PREFIX):
        if uri.endswith(".json") and (found := _readable(store, uri)) is not None:
            yield found


def submission(store: Store, job_id: str) -> tuple[CalibrationJob, str] | None:
    """The submission of ``job_id``: ``(job, queue)``, or None when there is none (or a bad one, with a warning)."""
    key = submission_key(job_id)
    if not SAFE_ID.fullmatch(job_id) or not store.exists(key):
        return None
    return _readable(store, store.uri(key))


def requeue_lost(registry: Any, store: Store, publish: Callable[[dict[str, Any], str], Any]) -> list[str]:
    """Queue again every submitted job the registry lost (no record, no summary in the store); their ids.

    Each is claimed again (a new queued record) and its message published
    with ``publish(message, queue)``. A job that has a record is left alone:
    queued and running ones are the fleet's (leases and the reaper), final
    ones are done.
    """
    from shared.storage.catalog import Catalog

    catalog = Catalog(store)
    requeued = []
    for job, queue in submitted(store):
        if registry.find(job.job_id) is not None:
            continue
        try:
            catalog.summary(job.job_id)
            continue  # finished: the repair from the store restores its record
        except NotFound:
            pass
        _, send = registry.claim(job)
        if send:
            publish(job.to_message(), queue)
            requeued.append(job.job_id)
            log.warning("job %s: submitted, but the registry had lost it; queued again on %s", job.job_id, queue)
    return requeued


def lost(store: Store, job_id: str, missing: NotFound) -> NotFound:
    """What to raise for a job the registry does not know: ``missing``, or, when it was submitted, why and what to run."""
    if type(missing) is not NotFound or not SAFE_ID.fullmatch(job_id) or not store.exists(submission_key(job_id)):
        return missing
    return NotFound(
        f"job {job_id} was submitted, but the registry has no record of it: Redis lost it (flushed, or restarted "
        "without its data); run 'calq reindex' to queue it again"
    )


def repair_from_store(registry: Any, catalog: Any) -> list[str]:
    """Repair every job whose summary is in the store (the registry's one rule, :meth:`JobRegistry.repair`); their ids.

    Records that are missing (Redis flushed), queued, running or failed are
    marked succeeded; succeeded, rejected and cancelled ones are left alone.
    """
    return [summary.job_id for summary in catalog.summaries() if registry.repair(summary.job_id, catalog) is not None]


def reindex(*, registry: Any, store: Store, publish: Callable[[dict[str, Any], str], Any], leases: Any = None,
            grace_s: float | None = None) -> dict[str, int]:
    """What ``calq reindex`` (and the API's) does: rebuild ``latest``, repair records, queue lost jobs again.

    ``{"pointers", "repaired", "requeued", "resent"}``: the latest pointers
    rebuilt from the store, the records the store proves finished
    (:func:`repair_from_store`), the submitted jobs the registry had lost,
    queued again (:func:`requeue_lost`), and, given the fleet's ``leases``,
    the queued jobs whose message was lost, older than ``grace_s``
    (:data:`shared.jobs.stranded.GRACE_S` if None), sent again
    (:func:`shared.jobs.stranded.resend_stranded`).
    """
    from shared.jobs.stranded import GRACE_S, resend_stranded
    from shared.storage.catalog import Catalog

    catalog = Catalog(store)
    pointers = registry.rebuild_latest(catalog)
    repaired = repair_from_store(registry, catalog)
    requeued = requeue_lost(registry, store, publish)
    resent = [] if leases is None else resend_stranded(registry, store, leases, publish,
                                                       grace_s=GRACE_S if grace_s is None else grace_s)
    return {"pointers": pointers, "repaired": len(repaired), "requeued": len(requeued), "resent": len(resent)}

"""The batch task, ``calq.calibrate_batch``: a backfill's job messages in one delivery.

A thin shell over :func:`shared.jobs.batch.run_batch`: the messages (at most
``settings.batch.max_jobs`` a batch; more are run in batches of that size)
have their first runs sampled together where batching pays on this
process's device, then each is run as the calibrate task runs one message
(:func:`worker.tasks.calibrate_message`: the ETA refusal, the job's lease,
the handler), so each job keeps its own record, posterior, summary, lease
and hand-back. Registered by :func:`worker.tasks.register`.

A batch task that finally fails (its retries spent) fails every job of it
that has not finished, as the calibrate task fails its one job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery, Task

from shared.jobs import handle
from shared.jobs.batch import run_batch
from shared.jobs.celery_app import BATCH_TASK_NAME
from worker.protocol import lease_holder

log = logging.getLogger(__name__)


def calibrate_batch_messages(task: Task, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The task body: each message's task result, in order (see the module docstring)."""
    from worker.tasks import calibrate_message, context

    services = context()
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        return [handle.refuse_message(services.registry, None, "invalid batch message: not a list of job messages")]
    cap = services.settings.batch.max_jobs
    worker = lease_holder(task.request.hostname or "calq")
    results: list[dict[str, Any]] = []
    for first in range(0, len(messages), cap):
        results.extend(run_batch(services, messages[first : first + cap], worker=worker,
                                 attempt=task.request.retries or 0,
                                 queue=(task.request.delivery_info or {}).get("routing_key"),
                                 run_one=lambda message: calibrate_message(task, message)))
    return results


class CalibrateBatchTask(Task):
    """Base of the batch task: a batch that finally fails leaves each of its unfinished jobs failed."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        from worker.tasks import context

        messages = (args or [None])[0] if args else (kwargs or {}).get("messages")
        reason = f"batch gave up after {self.request.retries} retries: {type(exc).__name__}: {exc}"
        for message in messages if isinstance(messages, list) else []:
            job_id = handle.claimed_job_id(message)
            if job_id is None:
                continue
            with handle.bound_job_id(job_id):
                try:
                    record = context().registry.find(job_id)
                    if record is not None and not record.state.finished:
                        log.error("task failed: %s", reason)
                        context().registry.fail(job_id, reason[: handle.MAX_REASON_CHARS])
                except Exception:  # the registry may be what is down; the log keeps the reason
                    log.exception("could not record the failure")


def register_batch(app: Celery) -> Task:
    """Add the batch task to ``app`` and return it (called once, by :func:`worker.tasks.register`)."""

    from worker.tasks import TASK_OPTIONS

    @app.task(name=BATCH_TASK_NAME, base=CalibrateBatchTask, **TASK_OPTIONS)
    def calibrate_batch(self: Task, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return calibrate_batch_messages(self, messages)

    return calibrate_batch


__all__ = ["CalibrateBatchTask", "calibrate_batch_messages", "register_batch"]

"""A fleet worker's delivery of a job message, run under the job's lease.

:func:`run_leased` is what the Celery task runs (:mod:`worker.tasks`), around
:func:`shared.jobs.handle.process`::

    message ─▶ no job id, or no leases (embedded) ─────────────────────────▶ the handler alone
       └─ acquire the job's lease ─▶ held elsewhere ───────────────────────▶ dropped ("running on …")
             └─ redelivered, summary in the store ─────────────────────────▶ record repaired, stored summary
             └─ heartbeat renews the lease; the handler runs, fenced by it:
                  each progress report: lease taken ─▶ HandBack (not re-queued: another worker runs it)
                                        stop_reason() ─▶ HandBack: the job handed back, delivery not counted
             └─ lease released (or handed back)

The first progress report of a sampling phase (:data:`SAMPLING_PHASES`)
counts one sampler run in the record. Every record change goes through
:class:`~shared.jobs.registry.patient.PatientRegistry` (final changes wait
through Redis outages) and the caller's ``view`` of the registry (the
worker's metrics). Transient faults of Redis become
:class:`~shared.contract.errors.RetryableError`, for the task's autoretry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from shared.contract.errors import transient_as_retryable
from shared.contract.job import JobState, Progress
from shared.jobs import handle, metrics
from shared.jobs.lease import Fence, HandBack, Heartbeat, Lease, hand_back
from shared.jobs.registry.patient import PatientRegistry
from shared.jobs.services import Services

log = logging.getLogger(__name__)

#: Phases that mean the sampler is running (counted once per delivery).
SAMPLING_PHASES = frozenset({"compile", "warmup", "sampling"})


def _never() -> str | None:
    return None


def run_leased(
    services: Services,
    delivery: handle.Delivery,
    *,
    queue: str | None = None,
    view: Callable[[Any], Any] = lambda registry: registry,
    stop_reason: Callable[[], str | None] = _never,
    on_beat: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Run ``delivery`` through the handler under its job's lease (the module's diagram); the task result.

    ``queue`` is where the message came from (to publish it again there);
    ``stop_reason`` says why this process must hand its job back now, or
    None; ``on_beat`` hears each lease renewal.
    """
    job_id = handle.claimed_job_id(delivery.message)

    def run(on_progress: Callable[[Progress], Any] | None = None, fence: Fence | None = None) -> dict[str, Any]:
        # Under a lease, every record change and store write is fenced by it (shared.jobs.lease.Fence).
        fenced = services.registry if fence is None else services.registry.fenced(fence)
        registry = view(PatientRegistry(fenced, services.settings))
        return handle.process(services.with_registry(registry),
                              dataclasses.replace(delivery, fence=fence, on_progress=on_progress))

    leases = services.leases
    if job_id is None or leases is None:
        return run()  # the handler refuses a message without a job id
    with transient_as_retryable():
        lease = leases.acquire(job_id, delivery.worker, message=delivery.message, attempt=delivery.attempt,
                               queue=queue)
        if lease is None:
            holder = leases.holder(job_id)
            log.info("already running on %s; this delivery is dropped", holder)
            return handle.status_dict(job_id, JobState.RUNNING, f"running on {holder}")
    released = False
    try:
        with transient_as_retryable():
            repaired = _repair_redelivery(services, job_id)
        if repaired is not None:
            return repaired
        fence = Fence(leases, lease)
        with Heartbeat(leases, lease, interval_s=services.settings.recovery.heartbeat_s, on_beat=on_beat) as beat:
            sampling = False

            def check(progress: Progress) -> None:
                nonlocal sampling
                if not sampling and progress.phase in SAMPLING_PHASES:
                    sampling = True
                    try:
                        services.registry.fenced(fence).count_sampler_run(job_id)
                    except Exception as exc:  # a counter for people and tests; never a reason to stop
                        log.warning("could not count this sampler run (%s: %s)", type(exc).__name__, exc)
                if beat.lost.is_set():
                    raise HandBack("its lease was taken: another worker runs it", requeue=False)
                reason = stop_reason()
                if reason is not None:
                    raise HandBack(reason)

            try:
                return run(check, fence)
            except HandBack as stop:
                released = True
                _give_back(services, lease, stop)
                return handle.status_dict(job_id, JobState.QUEUED, stop.reason)
    finally:
        if not released:
            try:
                leases.release(lease)
            except Exception as exc:  # the lease lapses on its own; the reaper finds the job finished
                log.warning("could not release the lease (%s: %s)", type(exc).__name__, exc)


def _give_back(services: Services, lease: Lease, stop: HandBack) -> None:
    """Hand the job back after a :class:`HandBack`: re-queued without counting the delivery, unless no longer ours."""
    try:
        if stop.requeue and services.leases.release(lease):
            done = hand_back(lease.job_id, services=services, reason=f"{lease.worker} stopped: {stop.reason}",
                             count_delivery=False)
            metrics.handed_back("stopped", done=done)
        else:
            log.warning("stopped: %s", stop.reason)
    except Exception as exc:  # Redis out: the lease lapses, or the claim went back, and the reaper hands it back
        log.error("stopped (%s) but could not hand the job back (%s: %s); the reaper will",
                  stop.reason, type(exc).__name__, exc)


def _repair_redelivery(services: Services, job_id: str) -> dict[str, Any] | None:
    """The stored summary of a redelivered job that finished (record repaired), or None to run it."""
    record = services.registry.find(job_id)
    if record is None or record.state.finished:
        return None  # the handler deals with these
    if record.deliveries == 0 and record.state is JobState.QUEUED:
        return None  # a first delivery: nothing can be in the store yet
    return handle.finished_in_store(services.registry, services.store, job_id)

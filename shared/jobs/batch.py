"""A batch of job messages: their first runs sampled together, each job then finished as a single one.

:func:`run_batch` takes the messages of one batch delivery (a backfill's
compatible jobs: :mod:`worker.batch`) and runs them in two phases::

    phase 1, sample   per message: parse; its record queued and not cancelled; the worker's limits
                      (shared.data.limits.check_job); lease acquired (the fleet) and renewed by a heartbeat;
                      dataset fetched and decoded once for all (shared.jobs.datasets); validated and
                      prepared; its warm start found (shared.jobs.warm_source)
                      → grouped by BatchKey (bucket, warm or cold, warmup, draws, target acceptance)
                      → each group's first runs in one program (shared.fit.batch.sample_batch); a job
                        cancelled, out of time or whose lease was taken is dropped, the others go on
    phase 2, finish   per message, in order, inside shared.fit.batch.first_runs: the single path
                      (shared.jobs.delivery.run_leased → shared.jobs.handle.process → run_job →
                      calibrate), under the job's lease: claim, deliveries, running, then calibrate()
                      judges the batched run (diagnostics, convergence); a converged job gets its
                      record, posterior, summary and warm-start pointer through the same write path
                      (shared.jobs.spool.write_results); a job that needs a remedy runs its remedies
                      alone there; a job phase 1 left out (bad message, finished, cancelled, bad data)
                      meets the single path's own answer for it

Every step a job takes in phase 2 is the single path's, so records,
retries, refusals and hand-backs are the same. A job keeps its lease from
phase 1 until its turn in phase 2, where the single path's lease guard takes
it over (the phase 1 lease is released and the guard acquires a new one at
once: a delivery of the job elsewhere could only slip in between if one
existed, and the batch message is the job's only one). A worker that dies
mid-batch stops renewing every lease: each job's lease lapses and the reaper
hands it back alone, as for a single job.

Phase 1 is an optimisation: any fault there (a dataset that will not load,
a lease that cannot be taken) leaves the job to phase 2, which runs it, or
refuses it, as a single delivery would be. Whether phase 1 samples at all
is :func:`shared.fit.batch.batching_pays` unless the caller says.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.contract.control import JobControl
from shared.contract.job import CalibrationJob, JobState
from shared.jobs import handle
from shared.jobs.services import Services

log = logging.getLogger(__name__)

#: Runs one message through the single path (default: :func:`shared.jobs.delivery.run_leased`); the task result.
RunOne = Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass
class _Member:
    """A job phase 1 samples: its message, job, lease and the parts of its first run."""

    message: Mapping[str, Any]
    job: CalibrationJob
    lease: Any = None
    beat: Any = None  # the lease's Heartbeat
    run: Any = None  # shared.fit.batch.BatchRun
    key: Any = None  # shared.fit.batch.BatchKey
    seeded: Any = None  # shared.fit.calibrate.warm_start_of's answer


def run_batch(
    services: Services,
    messages: Sequence[Mapping[str, Any]],
    *,
    worker: str,
    attempt: int = 0,
    queue: str | None = None,
    run_one: RunOne | None = None,
    batch: bool | None = None,
) -> list[dict[str, Any]]:
    """Run ``messages`` as the module docstring says; each message's task result, in order.

    ``run_one`` runs one message through the single path (default: the lease
    guard and the handler, as the calibrate task does, with ``worker``,
    ``attempt`` and ``queue``). ``batch`` False skips phase 1 (each job is
    then fitted alone); None samples where batching pays on this device.
    """
    from shared.fit import batch as fit_batch
    from shared.jobs.delivery import run_leased

    if run_one is None:
        def run_one(message: Mapping[str, Any]) -> dict[str, Any]:
            return run_leased(services, handle.Delivery(message=message, worker=worker, attempt=attempt), queue=queue)

    if batch is None:
        batch = fit_batch.batching_pays()
    with contextlib.ExitStack() as held:
        members = _members(services, messages, worker=worker, attempt=attempt, queue=queue, held=held) if batch else []
        first = _sample(members)
        leased = {m.job.job_id: m for m in members if m.lease is not None}
        results = []
        with fit_batch.first_runs(first):
            for message in messages:
                member = leased.pop(handle.claimed_job_id(message) or "", None)
                if member is not None:  # the single path's guard takes the job over (see the module docstring)
                    _release(services, member)
                results.append(run_one(message))
    return results


def _members(services: Services, messages: Sequence[Mapping[str, Any]], *, worker: str, attempt: int,
             queue: str | None, held: contextlib.ExitStack) -> list[_Member]:
    """The jobs phase 1 samples, each prepared, leased (on the fleet) and watched by its control."""
    members, seen = [], set()
    for message in messages:
        job_id = handle.claimed_job_id(message)
        if job_id is None or job_id in seen:
            continue
        seen.add(job_id)
        with handle.bound_job_id(job_id):
            try:
                member = _member(services, message, worker=worker, attempt=attempt, queue=queue, held=held)
            except Exception as exc:  # phase 1 is an optimisation: the single path answers for this job
                log.warning("left to run alone (%s: %s)", type(exc).__name__, exc)
                continue
        if member is not None:
            members.append(member)
    return members


def _member(services: Services, message: Mapping[str, Any], *, worker: str, attempt: int, queue: str | None,
            held: contextlib.ExitStack) -> _Member | None:
    from shared.data.limits import check_job
    from shared.fit.batch import BatchKey, BatchRun
    from shared.fit.calibrate import prepare, warm_start_of
    from shared.jobs.datasets import decoded, validated
    from shared.jobs.lease import Heartbeat
    from shared.jobs.warm_source import find_warm_source

    settings, store, registry = services.settings, services.store, services.registry
    job = CalibrationJob.model_validate(message)
    record = registry.find(job.job_id)
    if record is None or record.state is not JobState.QUEUED or record.cancel_requested:
        return None  # finished, running elsewhere, cancelled or unknown: the single path says what happens
    check_job(job, settings.limits)
    member = _Member(message=message, job=job)
    control = JobControl(cancel_source=handle.cancel_source(registry, job.job_id))
    if services.leases is not None:
        member.lease = services.leases.acquire(job.job_id, worker, message=message, attempt=attempt, queue=queue)
        if member.lease is None:
            return None  # held elsewhere: the single path drops this delivery
        member.beat = held.enter_context(Heartbeat(services.leases, member.lease,
                                                   interval_s=settings.recovery.heartbeat_s))
        control = control.attach(cancel_source=_lost_or(member.beat, handle.cancel_source(registry, job.job_id)))
    limits = settings.limits
    path = store.fetch_dataset(job.dataset_uri, job.dataset_sha256, max_bytes=limits.max_decoded_bytes)
    dataset = decoded(path, sha256=job.dataset_sha256, limits=limits, label=job.dataset_uri)
    validated(dataset, job)
    prepared = prepare(dataset, job)
    warm = find_warm_source(job, store) if settings.warm_start else None
    member.seeded = warm_start_of(prepared, job, warm)
    member.key = BatchKey.first_run(prepared.bucket, job.sampler.samples, member.seeded[1] if member.seeded else None)
    limit_s = min(job.time_limit_s or settings.job_time_limit_s, settings.job_time_limit_s)
    member.run = BatchRun(prepared.data, job.sampler.seed, member.seeded[0] if member.seeded else None,
                          control.start(limit_s))
    return member


def _lost_or(beat: Any, cancelled: Callable[[], str | None]) -> Callable[[], str | None]:
    """A cancel source that also stops a job whose lease another worker took."""

    def reason() -> str | None:
        if beat.lost.is_set():
            return "its lease was taken: another worker runs it"
        return cancelled()

    return reason


def _sample(members: list[_Member]) -> dict[str, Any]:
    """Each group's first runs in one program; job id → :class:`~shared.fit.batch.FirstRun` of each that finished."""
    from shared.fit.batch import FirstRun, sample_batch
    from shared.fit.sampler import Draws

    groups: dict[Any, list[_Member]] = {}
    for member in members:
        groups.setdefault(member.key, []).append(member)
    first: dict[str, FirstRun] = {}
    for key, group in groups.items():
        began = time.perf_counter()
        results = sample_batch([m.run for m in group], key=key)
        log.info("batch of %d jobs (%s, %d rows) sampled in %.1f s", len(group), "warm" if key.warm else "cold",
                 key.bucket.n_rows, time.perf_counter() - began)
        for member, result in zip(group, results):
            if isinstance(result, Draws):
                first[member.job.job_id] = FirstRun(key=key, seed=member.job.sampler.seed, seeded=member.seeded,
                                                    draws=result)
            else:  # cancelled, out of time, lease lost: the single path finds out and records it
                log.info("job %s left the batch: %s", member.job.job_id, result)
    return first


def _release(services: Services, member: _Member) -> None:
    """Stop renewing ``member``'s phase-1 lease and release it."""
    member.beat.stop()
    try:
        services.leases.release(member.lease)
    except Exception as exc:  # it lapses on its own; the single path's guard acquires the job anew
        log.warning("could not release a batch lease (%s: %s)", type(exc).__name__, exc)


__all__ = ["RunOne", "run_batch"]

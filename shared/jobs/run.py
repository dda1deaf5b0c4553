"""Running one job end to end: fetch → validate → calibrate → write → summary.

The Celery task and the embedded (in-process) mode both call :func:`run_job`.
The posterior is written in full before the summary, and the summary only
after that, so a reader never finds a summary whose posterior is missing.
"""

from __future__ import annotations

import logging
import time

from shared.contract.control import JobControl
from shared.contract.errors import DatasetHashMismatch, InvalidDataset
from shared.contract.job import CalibrationJob, Progress
from shared.contract.settings import Settings
from shared.contract.summary import CalibrationSummary, ConvergenceCriteria
from shared.data.limits import check_job
from shared.fit.calibrate import calibrate
from shared.jobs.datasets import decoded, validated
from shared.jobs.lease import Fence
from shared.jobs.spool import resume_spooled, write_results
from shared.jobs.summary import summarize
from shared.jobs.warm_source import find_warm_source
from shared.storage.store import Store

log = logging.getLogger(__name__)


_process_ready = False


def prepare_process(settings: Settings) -> None:
    """Once per process, before the first job: turn on the persistent compile cache.

    Also imports the heavy libraries (JAX, NumPyro, ArviZ) now rather than
    inside the first job, so their cost is paid at start-up.
    """
    global _process_ready
    if _process_ready:
        return
    from shared.fit import sampler

    sampler.enable_compile_cache(settings.compile_cache_dir)
    _process_ready = True


def run_job(
    job: CalibrationJob,
    *,
    store: Store,
    settings: Settings,
    control: JobControl | None = None,
    criteria: ConvergenceCriteria | None = None,
    fence: Fence | None = None,
) -> CalibrationSummary:
    """Run ``job`` and store its posterior and summary; return the summary.

    ``control`` hears progress and is checked at every phase boundary
    (fetch, load, compile, diagnostics, write) and between sampling chunks:
    the job's time limit (its own, or the settings' default) starts here, so
    it covers fetching and loading too, and a cancellation stops the job
    before anything is written. A job whose draws a killed process left in
    this host's spool is written from there, not fitted again
    (:func:`~shared.jobs.spool.resume_spooled`). With ``settings.warm_start`` the sampler
    starts from the nearest stored fit of the job's archetype
    (:mod:`shared.jobs.warm_source`). Convergence is judged by ``criteria``
    (default: the settings'). A fleet worker's ``fence`` (its lease) is checked
    before each store write (:func:`~shared.jobs.spool.write_results`). Errors propagate as calq's typed exceptions:
    bad input as :class:`~shared.contract.errors.RejectedError`, storage outages as
    :class:`~shared.contract.errors.StorageUnavailable`.
    """
    prepare_process(settings)
    # A producer's time limit may shorten the worker's, never lengthen it (which stays below the visibility timeout).
    limit_s = min(job.time_limit_s or settings.job_time_limit_s, settings.job_time_limit_s)
    control = (control or JobControl()).start(limit_s)
    started = time.perf_counter()
    check_job(job, settings.limits)  # chains, draws, events: capped by this worker, before any work
    resumed = resume_spooled(job, store=store, settings=settings, notify=control.progress, fence=fence)
    if resumed is not None:  # a process on this host fitted it and was stopped while writing
        return resumed

    control.check("fetch")
    control.progress(Progress(phase="load"))
    limits = settings.limits
    try:
        path = store.fetch_dataset(job.dataset_uri, job.dataset_sha256, max_bytes=limits.max_decoded_bytes)
        control.check("load")
        # Limits from the header before anything is decoded; the contract once per dataset and job's choices.
        dataset = decoded(path, sha256=job.dataset_sha256, limits=limits, label=job.dataset_uri)
        validated(dataset, job)
        warm = find_warm_source(job, store) if settings.warm_start else None
        load_s = time.perf_counter() - started

        idata, fit = calibrate(dataset, job, control=control, criteria=criteria or settings.convergence, warm=warm,
                               max_draws_per_chain=limits.max_draws_per_chain, validated=True)
    except (InvalidDataset, DatasetHashMismatch) as exc:
        _discard_if_its_own_fault(exc, job, store)
        raise

    summary = summarize(fit, load_s=load_s)  # built once; write_results adds where it is stored
    control.check("write")  # the last check: once the posterior is written, the job finishes
    control.progress(Progress(phase="write"))
    # The draws are in hand: from here on an outage costs waiting, never the fit (shared.jobs.spool).
    summary = write_results(
        idata, summary, job, store=store, settings=settings, notify=control.progress, started=started, fence=fence,
    )
    log.info(
        "job %s finished in %.1f s (converged=%s): %s",
        job.job_id, summary.timings.total_s, summary.converged, summary.posterior_uri,
    )
    return summary


def _discard_if_its_own_fault(exc: Exception, job: CalibrationJob, store: Store) -> None:
    """Delete the stored dataset when its own bytes failed (never for a job's choice of archetype or window).

    Only the job's content address in the store is deleted, and only when
    the job named it: a file under ``dataset_roots`` is never touched.
    """
    own = isinstance(exc, DatasetHashMismatch) or getattr(exc, "intrinsic", False)
    if not own or job.dataset_uri != store.dataset_uri(job.dataset_sha256):
        return
    try:
        store.discard_dataset(job.dataset_sha256)
    except Exception as cleanup:  # the rejection stands; a stray file is only disk space
        log.warning("could not delete rejected dataset: %s: %s", type(cleanup).__name__, cleanup)

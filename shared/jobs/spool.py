"""Writing a finished job's results so that no outage costs its fit.

Once the sampler has finished, the draws are the expensive part: a failed
write must be retried with the draws in hand, never by fitting again. So
:func:`write_results` first puts the posterior in a local file under
``recovery.spool_dir`` with the summary beside it (the draws now survive the
loss of this process), then uploads it and writes the summary, each step retried by
:func:`patiently`::

    draws ─▶ spool/{job_id}.nc, .json ─▶ store: posterior ─▶ store: summary ─▶ spool files removed
                  │                             │                  │
                  └────── transient fault (network, 5xx, timeout, the store's disk full):
                          progress phase "waiting for storage", pause (doubling up to
                          retry_max_s), try again — for up to write_budget_s, then JobFailed
                          (the spooled draws stay for the job's next run on this host)
                          local PermissionError: the same, for up to permission_budget_s

A spool that cannot be written for want of space is reported as "no space
in <spool dir>" (the NetCDF library's own error names neither disk nor
space), and a fleet worker hands the job back rather than failing it.

The posterior is written before the summary, so a reader never finds a
summary whose posterior is missing, and a summary in the store means the job
is done (the fleet repairs its record from it).

The summary waits beside the posterior (``spool/{job_id}.json``), so a
process killed while the store was out loses nothing either: when the job
comes back to a worker on this host, :func:`resume_spooled` writes the
spooled results instead of fitting again.

With the store's signing key, the summary written is sealed
(:func:`shared.storage.provenance.seal`): it records the sha256 of the
posterior file uploaded (the spool file itself) and a worker's HMAC of both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from shared.contract.errors import JobFailed
from shared.contract.job import CalibrationJob, Progress
from shared.contract.retry import is_transient, retry_transient
from shared.contract.settings import RecoverySettings, Settings
from shared.contract.summary import CalibrationSummary
from shared.jobs import handover, metrics
from shared.jobs.lease import Fence, HandBack, LeaseLost
from shared.jobs.summary import completed
from shared.storage.netcdf import write_netcdf
from shared.storage.provenance import seal
from shared.storage.store import Store, no_space, posterior_key, sha256_file, summary_key

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The progress phase while finished draws wait for the store.
WAITING_FOR_STORAGE = "waiting for storage"


def patiently(
    action: Callable[[], T],
    *,
    what: str,
    recovery: RecoverySettings,
    on_wait: Callable[[BaseException], Any] | None = None,
    sleep: Callable[[float], Any] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``action()``, tried again through transient faults; its result.

    A fault :func:`~shared.contract.errors.classify` calls retryable is
    retried for up to ``recovery.write_budget_s``, a ``PermissionError`` for
    up to ``recovery.permission_budget_s`` (a folder being fixed, a
    credential being rotated); pauses start at ``retry_first_s`` and double
    up to ``retry_max_s`` (:func:`shared.contract.retry.retry_transient`).
    ``on_wait`` hears each fault before the pause. Past its budget the
    fault becomes :class:`JobFailed` naming ``what`` and how long it was
    tried; any other error is raised at once.
    """
    start = clock()

    def waiting(fault: BaseException, _left: float) -> None:
        if on_wait is not None:
            on_wait(fault)
        metrics.store_write_retried()

    try:
        return retry_transient(action, budget_s=recovery.write_budget_s, first_s=recovery.retry_first_s,
                               max_s=recovery.retry_max_s, on_wait=waiting,
                               budgets={PermissionError: recovery.permission_budget_s}, sleep=sleep, clock=clock)
    except PermissionError as exc:
        raise JobFailed(f"permission denied writing {what}, still after {clock() - start:.0f} s "
                        f"(retried for up to {recovery.permission_budget_s:g} s): {exc}") from exc
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise JobFailed(f"could not write {what}: storage unavailable for {clock() - start:.0f} s "
                        f"(recovery.write_budget_s = {recovery.write_budget_s:g}): {exc}") from exc


def write_results(
    idata: Any,
    summary: CalibrationSummary,
    job: CalibrationJob,
    *,
    store: Store,
    settings: Settings,
    notify: Callable[[Progress], Any],
    started: float,
    fence: Fence | None = None,
) -> CalibrationSummary:
    """Spool, upload and record the results of a finished fit; the summary as stored.

    ``summary`` is the job's, built once (:func:`shared.jobs.summary.summarize`);
    this fills in where the posterior and summary are stored and the write and
    total times (``started``: the ``time.perf_counter()`` instant the job
    began); ``notify`` hears the ``write`` and ``waiting for storage`` phases.
    ``fence`` (a fleet worker's lease) is checked before each store write,
    names the posterior's key, and makes the summary's write conditional
    (:func:`_store_summary`).
    """
    recovery = settings.recovery
    job_id, archetype = job.job_id, job.archetype
    t0 = time.perf_counter()
    waiting = False

    def wait(exc: BaseException) -> None:
        nonlocal waiting
        log.warning("job %s: %s: %s; the draws wait on local disk and the write is tried again",
                    job_id, type(exc).__name__, exc)
        if not waiting:
            waiting = True
            notify(Progress(phase=WAITING_FOR_STORAGE))

    def resumed() -> None:
        nonlocal waiting
        if waiting:
            waiting = False
            notify(Progress(phase="write"))

    spooled, spooled_summary = spool_paths(recovery, job_id)

    def spool() -> None:
        _spooling(spooled, lambda path: write_netcdf(idata, path), fence=fence)
        # the summary as it will be stored (the posterior's URI is known before the upload)
        early = completed(
            summary, write_s=time.perf_counter() - t0, total_s=time.perf_counter() - started,
            posterior_uri=store.uri(posterior_key(archetype, job_id, _token(fence))),
            summary_uri=store.uri(summary_key(archetype, job_id)),
        )
        _spooling(spooled_summary, lambda path: path.write_text(early.model_dump_json(indent=2)), fence=fence)

    kept = False
    try:
        patiently(spool, what=f"the local spool file {spooled}", recovery=recovery, on_wait=wait)
        resumed()
        posterior_uri = _upload(spooled, job, store=store, recovery=recovery, on_wait=wait, resumed=resumed, fence=fence)
        digest = sha256_file(spooled)
        stored = completed(
            summary, write_s=time.perf_counter() - t0, total_s=time.perf_counter() - started,
            posterior_uri=posterior_uri, summary_uri=store.uri(summary_key(archetype, job_id)),
        )
        stored = _store_summary(stored, spooled, job, store=store, recovery=recovery, on_wait=wait, resumed=resumed,
                                 fence=fence, posterior_sha256=digest)
        if stored.posterior_uri == posterior_uri:  # published: the next job's warm start may take it from memory
            handover.keep(posterior_uri, digest, idata)
    except JobFailed:
        kept = spooled.is_file() and spooled_summary.is_file()
        if kept:  # the store stayed out (or full) past the budget: the draws wait for the job's next run here
            log.warning("job %s: its draws stay in %s for the next run of the job on this host", job_id, spooled.parent)
        raise
    finally:
        if not kept:
            _discard(spooled, spooled_summary)
    return stored


def resume_spooled(
    job: CalibrationJob, *, store: Store, settings: Settings, notify: Callable[[Progress], Any],
    fence: Fence | None = None,
) -> CalibrationSummary | None:
    """Write the results a killed process left in this host's spool for ``job``; None when there are none.

    The spooled summary must be this job's (its id is derived from the
    job's content, the dataset's sha256 must match); spooled files that
    cannot be read are discarded, and the job is fitted again.
    """
    recovery = settings.recovery
    spooled, spooled_summary = spool_paths(recovery, job.job_id)
    if not (spooled.is_file() and spooled_summary.is_file()):
        return None
    try:
        summary = CalibrationSummary.model_validate_json(spooled_summary.read_bytes())
        if summary.job_id != job.job_id or summary.dataset_sha256 != job.dataset_sha256:
            raise ValueError(f"the spooled summary is job {summary.job_id}'s")
        if spooled.stat().st_size == 0:
            raise ValueError("the spooled posterior is empty")
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        log.warning("job %s: discarding unreadable spooled results (%s); fitting again", job.job_id, exc)
        _discard(spooled, spooled_summary)
        return None
    log.info("job %s: its draws were waiting in the spool (the process that fitted them stopped while writing): "
             "writing them instead of fitting again", job.job_id)
    notify(Progress(phase="write"))

    def wait(exc: BaseException) -> None:
        log.warning("job %s: %s: %s; the spooled draws wait and the write is tried again", job.job_id, type(exc).__name__, exc)
        notify(Progress(phase=WAITING_FOR_STORAGE))

    def resumed() -> None:
        notify(Progress(phase="write"))

    try:
        posterior_uri = _upload(spooled, job, store=store, recovery=recovery, on_wait=wait, resumed=resumed, fence=fence)
        summary = _store_summary(summary.model_copy(update={"posterior_uri": posterior_uri}), spooled, job, store=store,
                                 recovery=recovery, on_wait=wait, resumed=resumed, fence=fence)
    except LeaseLost:
        _discard(spooled, spooled_summary)  # the job is another worker's: these draws will never be written
        raise
    _discard(spooled, spooled_summary)
    return summary


def spool_paths(recovery: RecoverySettings, job_id: str) -> tuple[Path, Path]:
    """Where a job's posterior and summary wait on local disk."""
    folder = Path(recovery.spool_dir).expanduser()
    return folder / f"{job_id}.nc", folder / f"{job_id}.json"


def _token(fence: Fence | None) -> int | None:
    return None if fence is None else fence.token


def _fenced(action: Callable[[], T], fence: Fence | None, what: str) -> Callable[[], T]:
    """``action``, run only after ``fence`` says the lease is still this worker's (every try: each is a write)."""
    if fence is None:
        return action

    def checked() -> T:
        fence.check(what)
        return action()

    return checked


def _upload(spooled: Path, job: CalibrationJob, *, store: Store, recovery: RecoverySettings, on_wait, resumed,
            fence: Fence | None = None) -> str:
    key = posterior_key(job.archetype, job.job_id, _token(fence))
    uri = patiently(_fenced(lambda: store.put_file(spooled, key), fence, "the posterior's upload"),
                    what="the posterior", recovery=recovery, on_wait=on_wait)
    resumed()
    return uri


def _store_summary(summary: CalibrationSummary, posterior: Path, job: CalibrationJob, *, store: Store,
                   recovery: RecoverySettings, on_wait, resumed, fence: Fence | None = None,
                   posterior_sha256: str | None = None) -> CalibrationSummary:
    """Write the summary of the uploaded ``posterior`` file, sealed with the store's signing key; the summary published.

    Embedded mode (no ``fence``) writes it as before. A fleet worker's write
    is conditional (:meth:`Store.create_bytes`): the summary is the job's
    publication, and of two runs of one job (a worker frozen past its lease
    while another ran it) exactly one publishes. The other finds the
    winner's summary, keeps it (returned: the record names it and its
    posterior) and deletes its own posterior, which nothing names. A
    summary at the key that :meth:`Catalog.read` refuses (planted, forged)
    publishes nothing and is replaced.
    """
    digest = posterior_sha256 or sha256_file(posterior)  # ``posterior_sha256``: the caller has hashed the file
    sealed = seal(summary, posterior_sha256=digest, key=store.signing_key)
    data = sealed.model_dump_json(indent=2).encode()
    key = summary_key(job.archetype, job.job_id)
    if fence is None:
        patiently(lambda: store.put_bytes(key, data), what="the summary", recovery=recovery, on_wait=on_wait)
        resumed()
        return sealed
    try:
        patiently(_fenced(lambda: store.create_bytes(key, data), fence, "the summary's write"),
                  what="the summary", recovery=recovery, on_wait=on_wait)
    except FileExistsError:
        published = _published(store, key, job)
        if published is not None:
            resumed()
            _discard_posterior(store, sealed, published)
            return published
        patiently(_fenced(lambda: store.put_bytes(key, data), fence, "the summary's write"),
                  what="the summary", recovery=recovery, on_wait=on_wait)
    resumed()
    return sealed


def _published(store: Store, key: str, job: CalibrationJob) -> CalibrationSummary | None:
    """The summary another run of ``job`` published at ``key`` first, or None if what lies there is no result."""
    from shared.storage.catalog import Catalog

    try:
        summary = Catalog(store).read(store.uri(key))
    except Exception as exc:  # planted, forged, unreadable: not a result of this job
        log.warning("job %s: the summary at %s is not a result of this job (%s); replacing it",
                    job.job_id, store.uri(key), type(exc).__name__)
        return None
    log.warning("job %s: another run of this job published its summary first (%s): keeping it, "
                "this run's results are discarded", job.job_id, summary.posterior_uri)
    return summary


def _discard_posterior(store: Store, mine: CalibrationSummary, published: CalibrationSummary) -> None:
    """Delete this run's posterior, which the published summary does not name (never the one it names)."""
    if mine.posterior_uri is None or mine.posterior_uri == published.posterior_uri:
        return
    try:
        store.delete(mine.posterior_uri)
    except Exception as exc:  # a stray posterior is only space: nothing names it
        log.warning("could not delete this run's unpublished posterior (%s)", type(exc).__name__)


def _spooling(path: Path, write: Callable[[Path], Any], *, fence: Fence | None) -> None:
    """:func:`_atomically` into the spool; a spool disk without space says so (not "NetCDF: HDF error").

    A full spool is no fault of the job: a fleet worker hands it back
    (:class:`~shared.jobs.lease.HandBack`: another worker, or this one once
    space is freed, runs it); embedded mode fails it with the same reason.
    """
    try:
        _atomically(path, write)
    except Exception as exc:
        if not (no_space(exc) or _nearly_full(path.parent)):
            raise
        reason = f"no space in {path.parent} (the spool, where finished draws wait for the store)"
        log.error("%s", reason)
        if fence is None:
            raise JobFailed(reason) from exc
        raise HandBack(reason) from exc


#: A spool folder with less free space than this is full, whatever error the NetCDF library gave.
SPOOL_FULL_BYTES = 1 << 20


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < SPOOL_FULL_BYTES
    except OSError:
        return False


def _atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` a file beside ``path``, then move it into place: a reader finds all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def _discard(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

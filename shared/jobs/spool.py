"""Writing a finished job's results so that no outage costs its fit.

Once the sampler has finished, the draws are the expensive part: a failed
write must be retried with the draws in hand, never by fitting again. So
:func:`write_results` first puts the posterior in a local file under
``recovery.spool_dir`` (the draws now survive anything but the loss of this
process), then uploads it and writes the summary, each step retried by
:func:`patiently`::

    draws ─▶ spool/{job_id}.nc ─▶ store: posterior ─▶ store: summary ─▶ spool file removed
                  │                       │                  │
                  └────── transient fault (network, 5xx, timeout): progress phase
                          "waiting for storage", pause (doubling up to retry_max_s),
                          try again — for up to write_budget_s, then JobFailed
                          local PermissionError: the same, for up to permission_budget_s

The posterior is written before the summary, so a reader never finds a
summary whose posterior is missing, and a summary in the store means the job
is done (the fleet repairs its record from it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from shared.contract.errors import JobFailed, Outcome, classify
from shared.contract.job import CalibrationJob, Progress
from shared.contract.settings import RecoverySettings, Settings
from shared.contract.summary import CalibrationSummary
from shared.storage.netcdf import write_netcdf
from shared.storage.store import Store, posterior_key, summary_key

if TYPE_CHECKING:
    from shared.fit.calibrate import Fit

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
    up to ``retry_max_s``. ``on_wait`` hears each fault before the pause.
    Past its budget the fault becomes :class:`JobFailed` naming ``what`` and
    how long it was tried; any other error is raised at once.
    """
    start = clock()
    pause = recovery.retry_first_s
    while True:
        try:
            return action()
        except PermissionError as exc:
            budget = recovery.permission_budget_s
            if clock() + pause - start > budget:
                raise JobFailed(f"permission denied writing {what}, still after {clock() - start:.0f} s "
                                f"(retried for up to {budget:g} s): {exc}") from exc
            fault: BaseException = exc
        except Exception as exc:
            if classify(exc) is not Outcome.RETRY:
                raise
            budget = recovery.write_budget_s
            if clock() + pause - start > budget:
                raise JobFailed(f"could not write {what}: storage unavailable for {clock() - start:.0f} s "
                                f"(recovery.write_budget_s = {budget:g}): {exc}") from exc
            fault = exc
        if on_wait is not None:
            on_wait(fault)
        sleep(pause)
        pause = min(recovery.retry_max_s, pause * 2)


def write_results(
    idata: Any,
    fit: Fit,
    job: CalibrationJob,
    *,
    store: Store,
    settings: Settings,
    notify: Callable[[Progress], Any],
    started: float,
    load_s: float = 0.0,
) -> CalibrationSummary:
    """Spool, upload and record the results of a finished fit; the summary as stored.

    ``started`` is the ``time.perf_counter()`` instant the job began and
    ``load_s`` the time spent loading its dataset (for the summary's
    timings, which :meth:`Fit.summary` builds once the posterior's URI is
    known); ``notify`` hears the ``write`` and ``waiting for storage`` phases.
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

    spooled = Path(recovery.spool_dir).expanduser() / f"{job_id}.nc"

    def spool() -> None:
        spooled.parent.mkdir(parents=True, exist_ok=True)
        partial = spooled.with_name(f"{spooled.name}.{os.getpid()}.partial")
        try:
            write_netcdf(idata, partial)
            os.replace(partial, spooled)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()

    try:
        patiently(spool, what=f"the local spool file {spooled}", recovery=recovery, on_wait=wait)
        resumed()
        posterior_uri = patiently(lambda: store.put_file(spooled, posterior_key(archetype, job_id)),
                                  what="the posterior", recovery=recovery, on_wait=wait)
        resumed()
        summary = fit.summary(
            load_s=load_s, write_s=time.perf_counter() - t0, total_s=time.perf_counter() - started,
            posterior_uri=posterior_uri, summary_uri=store.uri(summary_key(archetype, job_id)),
        )
        data = summary.model_dump_json(indent=2).encode()
        patiently(lambda: store.put_bytes(summary_key(archetype, job_id), data),
                  what="the summary", recovery=recovery, on_wait=wait)
        resumed()
    finally:
        with contextlib.suppress(FileNotFoundError):
            spooled.unlink()
    return summary

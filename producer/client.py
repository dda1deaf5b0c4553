"""The optimizer's client: submit jobs, wait for them, read results and posteriors.

``CalibrationClient`` works the same in both modes:

- **fleet** (``CALQ_BROKER_URL`` set): jobs go to Redis for the Celery
  workers; records and ``latest`` pointers live in Redis;
- **embedded** (no broker): ``submit`` runs the job here and now, in this
  process, on the configured store; records live in the store.

Either way the store's summaries are the source of truth, and the job runs
through the same :func:`shared.jobs.handle.process` as on a worker.

- **remote** (``CALQ_API__URL`` and ``CALQ_API__TOKEN`` set): the same
  public methods speak HTTP to the calibration API
  (:class:`producer.api.remote.RemoteClient`), holding only a token. The
  choice is made here, once, in :meth:`CalibrationClient.__new__`.

A job carries a lane: ``interactive`` (the default) or ``batch`` (backfills
and evaluations); workers take interactive jobs first (:mod:`shared.jobs.lanes`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import xarray as xr

from shared.contract.control import JobControl
from shared.contract.errors import CalqError, NotFound, RetryableError
from shared.contract.job import CalibrationJob, JobState, JobStatus, SamplerSettings
from shared.contract.retry import retry_transient
from shared.contract.settings import Settings, get_settings
from shared.contract.summary import CalibrationSummary
from shared.data.dataset import save_dataset
from shared.jobs.celery_app import BATCH, INTERACTIVE, lane_queue
from shared.jobs.lanes import routed_queue
from shared.jobs.registry import JobRegistry
from shared.jobs.services import Services
from shared.jobs.submissions import lost, record_submission
from shared.storage.catalog import LatestPointer, newest
from shared.storage.store import Store

log = logging.getLogger(__name__)

StatusCallback = Callable[[JobStatus], None]
#: Hears ``(error, seconds_left)`` while a wait rides through an outage.
OutageCallback = Callable[[Exception, float], None]
#: First and longest pause between tries while the fleet cannot be reached.
OUTAGE_BACKOFF_S = (0.5, 5.0)
T = TypeVar("T")


class JobDidNotSucceed(CalqError):
    """A job that was waited for ended failed, rejected or cancelled (``status.state`` says which)."""

    def __init__(self, status: JobStatus) -> None:
        super().__init__(f"job {status.job_id} {status.state.value}: {status.reason or 'no reason recorded'}")
        self.status = status


def job_rows(dataset: str | os.PathLike | xr.Dataset, job: CalibrationJob) -> int:
    """The likelihood rows of ``job``: its events × the entered race-driver pairs of its archetypes and window."""
    from shared.contract.domain import archetypes_of
    from shared.data.dataset import open_dataset, select_races

    ds = dataset if isinstance(dataset, xr.Dataset) else open_dataset(Path(dataset))
    window = select_races(ds, as_of=job.as_of, window_days=job.window_days, archetypes=archetypes_of(job.archetype))
    return len(job.events) * int(window["finish_position"].notnull().sum())


class CalibrationClient:
    """Submit calibration jobs and read their results (see the module docstring)."""

    def __new__(
        cls, settings: Settings | None = None, *, store: Store | None = None, registry: JobRegistry | None = None
    ) -> CalibrationClient:
        # The one place the mode is chosen: a token and an API URL, and no store or registry handed in, mean HTTP.
        if cls is CalibrationClient and store is None and registry is None and (settings or get_settings()).api.remote:
            from producer.api.remote import RemoteClient

            return super().__new__(RemoteClient)
        return super().__new__(cls)

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: Store | None = None,
        registry: JobRegistry | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        # the one wiring (connect/read time out: an outage is an error, not a hang)
        self.services = Services.from_settings(self.settings, store=store, registry=registry)
        self.store, self.registry, self.catalog = self.services.store, self.services.registry, self.services.catalog
        self._celery = None
        self._interrupted: str | None = None
        self._control: JobControl | None = None

    @property
    def embedded(self) -> bool:
        return self.settings.embedded

    # -- jobs --------------------------------------------------------------

    def upload(self, dataset: str | os.PathLike | xr.Dataset) -> tuple[str, str]:
        """Put a dataset in the store once, by content; returns (uri, sha256)."""
        if isinstance(dataset, xr.Dataset):
            with tempfile.TemporaryDirectory(prefix="calq-upload-") as tmp:
                path = save_dataset(dataset, Path(tmp) / "dataset.nc")
                return self.store.upload_dataset(path)
        path = Path(dataset)
        if not path.is_file():
            raise NotFound(f"no dataset file at {path}")
        return self.store.upload_dataset(path)

    def make_job(
        self,
        dataset: str | os.PathLike | xr.Dataset,
        archetype: str,
        *,
        events: Sequence[str] | str | None = None,
        as_of: date | None = None,
        window_days: int | None = None,
        warmup: int | None = None,
        samples: int | None = None,
        chains: int | None = None,
        seed: int = 0,
        time_limit_s: int | None = None,
        dataset_ref: tuple[str, str] | None = None,
    ) -> CalibrationJob:
        """Build (and validate) a job; the dataset is uploaded unless ``dataset_ref`` names it."""
        uri, sha = dataset_ref or self.upload(dataset)
        fields: dict[str, Any] = {
            "archetype": archetype,
            "dataset_uri": uri,
            "dataset_sha256": sha,
            "as_of": as_of,
            "window_days": window_days,
            "time_limit_s": time_limit_s,
            "sampler": SamplerSettings.model_validate(
                self.settings.sampler.model_dump()
                | {k: v for k, v in {"warmup": warmup, "samples": samples, "chains": chains}.items() if v}
                | {"seed": seed}
            ),
        }
        if events:
            fields["events"] = events
        return CalibrationJob(**fields)

    def submit(
        self,
        dataset: str | os.PathLike | xr.Dataset,
        archetype: str,
        *,
        queue: str | None = None,
        lane: str = INTERACTIVE,
        on_update: StatusCallback | None = None,
        **options: Any,
    ) -> str:
        """Submit a job; returns its id. The same job submitted twice is one job.

        In embedded mode the job runs to its end before this returns
        (``on_update`` hears its progress); a rejected or failed job is then
        in its record, as on the fleet.
        """
        job = self.make_job(dataset, archetype, **options)
        if queue is None and lane == INTERACTIVE and not self.embedded:  # a small job is not worth a GPU
            queue = routed_queue(self.settings.default_queue, lambda: job_rows(dataset, job))
        return self.submit_job(job, queue=queue, lane=lane, on_update=on_update)

    def submit_job(
        self,
        job: CalibrationJob,
        *,
        queue: str | None = None,
        lane: str = INTERACTIVE,
        on_update: StatusCallback | None = None,
    ) -> str:
        """Submit an already built job (see :meth:`submit`)."""
        return self.admit(job, queue=queue, lane=lane, on_update=on_update)[0].job_id

    def admit(
        self,
        job: CalibrationJob,
        *,
        queue: str | None = None,
        lane: str = INTERACTIVE,
        on_update: StatusCallback | None = None,
        owner: str | None = None,
    ) -> tuple[JobStatus, bool]:
        """Claim a job and send it to the workers (embedded: run it): ``(record, sent)``.

        ``sent`` is False when the job was known and is not sent again. A
        batch job with an ``owner`` (the API's token name) waits for its turn
        among other owners' batch jobs (:class:`shared.jobs.lanes.BatchLanes`).
        """
        status, send = self._claimed(job, queue=queue, lane=lane)
        if not send:
            return status, False
        if self.embedded:
            self._run_here(job, on_update)
        else:
            self._enqueue(job, lane_queue(queue or self.settings.default_queue, lane), owner if lane == BATCH else None)
        return status, True

    def _claimed(self, job: CalibrationJob, *, queue: str | None, lane: str) -> tuple[JobStatus, bool]:
        """Claim ``job``: ``(record, whether it must be run)``; a fleet job to run is recorded as submitted."""
        target = lane_queue(queue or self.settings.default_queue, lane)  # an unknown queue or lane, before any record
        status, created = self.registry.claim(job)
        interrupted = self.embedded and not status.state.finished and not created
        if not created and not interrupted:
            log.info("job %s already known (%s): not enqueued again", job.job_id, status.state.value)
            return status, False
        repaired = self.registry.repair(job.job_id, self.catalog)
        if repaired is not None:  # one store, one truth: fitted before (embedded, or a record Redis lost)
            log.info("job %s: its summary is already in the store; not run again", job.job_id)
            return repaired, False
        if interrupted:
            # Embedded jobs run inside the submitting call: an unfinished record
            # means the process that ran it was stopped. Run it again.
            log.info("job %s was interrupted while %s: running it again", job.job_id, status.state.value)
        if not self.embedded:
            record_submission(self.store, job, queue=target)  # where a Redis flush cannot reach (shared.jobs.submissions)
        return status, True

    @property
    def batch_jobs(self) -> int:
        """The most jobs :meth:`admit_batch` sends in one message: ``settings.batch.max_jobs`` on the fleet, else 1."""
        return 1 if self.embedded else self.settings.batch.max_jobs

    def admit_batch(
        self, jobs: Sequence[CalibrationJob], *, queue: str | None = None, lane: str = BATCH,
    ) -> list[tuple[JobStatus, bool]]:
        """Claim each of ``jobs`` as :meth:`admit` does; send those to run as one batch message (the fleet).

        Each job keeps its own record (queued), so status, cancel and wait
        work per job; the worker runs them through :mod:`shared.jobs.batch`.
        At most :attr:`batch_jobs` jobs; embedded, each is admitted (run) in turn.
        """
        if len(jobs) > self.batch_jobs:
            raise ValueError(f"{len(jobs)} jobs in one batch; at most {self.batch_jobs}")
        if self.embedded:
            return [self.admit(job, queue=queue, lane=lane) for job in jobs]
        admitted = [self._claimed(job, queue=queue, lane=lane) for job in jobs]
        messages = [job.to_message() for job, (_, send) in zip(jobs, admitted) if send]
        if messages:
            self.send_batch(messages, lane_queue(queue or self.settings.default_queue, lane))
        return admitted

    def _enqueue(self, job: CalibrationJob, queue: str, owner: str | None) -> None:
        if owner is not None:
            waiting = self.lanes().hold(owner, job.to_message(), queue)
            log.info("job %s waits for its turn on %s (%d of %s's batch jobs waiting)", job.job_id, queue, waiting, owner)
            return
        self.send(job.to_message(), queue)

    def send(self, message: dict[str, Any], queue: str) -> None:
        """Put one job message on a worker queue (Celery's send_task; the task id is the job id)."""
        from shared.jobs.celery_app import TASK_NAME, make_app

        if self._celery is None:
            self._celery = make_app(self.settings)
        self._celery.send_task(TASK_NAME, args=[message], task_id=message["job_id"], queue=queue)
        log.info("job %s enqueued on %s", message["job_id"], queue)

    def send_batch(self, messages: list[dict[str, Any]], queue: str) -> None:
        """Put several job messages on a worker queue as one batch task (:data:`~shared.jobs.celery_app.BATCH_TASK_NAME`)."""
        from shared.jobs.celery_app import BATCH_TASK_NAME, make_app

        if self._celery is None:
            self._celery = make_app(self.settings)
        self._celery.send_task(BATCH_TASK_NAME, args=[messages], queue=queue)
        log.info("%d jobs enqueued on %s as one batch", len(messages), queue)

    def lanes(self):
        """The fleet's batch lanes (:class:`shared.jobs.lanes.BatchLanes`) on the registry's Redis."""
        from shared.jobs.lanes import BatchLanes

        return BatchLanes(self.registry.redis, prefix=self.registry.prefix, depth=self.settings.api.batch_feed_depth)

    def _run_here(self, job: CalibrationJob, on_update: StatusCallback | None) -> None:
        def forward(progress) -> None:
            if on_update is not None:
                on_update(self.registry.get(job.job_id))

        self._control = JobControl()
        if self._interrupted is not None:
            self._control.cancel(self._interrupted)
        try:
            from shared.jobs.handle import (
                Delivery,
                process,  # imports JAX (seconds): only when a job runs here
            )

            process(self.services, Delivery(job.to_message(), worker="embedded", control=self._control,
                                            on_progress=forward))
        except BaseException:
            self._stopped_at_once(job.job_id)
            raise
        finally:
            self._control = None

    def _stopped_at_once(self, job_id: str) -> None:
        """The job running here was stopped mid-way (a second Ctrl-C raises out of it): its record ends ``cancelled``.

        This process is the job's only worker, so a record left ``queued`` or
        ``running`` would say it runs when nothing runs it. Queued, it is
        cancelled; running, flagged and then finished cancelled, as its worker.
        """
        reason = f"{self._interrupted or 'interrupted'}, then stopped at once"
        try:
            record, _ = self.registry.cancel(job_id, reason)
            if record.state is JobState.RUNNING:
                self.registry.finish_cancelled(job_id, f"cancelled: {reason}")
        except CalqError as exc:  # the stop is what the user asked for: say the record, do not replace the stop
            log.warning("job %s: its record could not be settled after the stop: %s", job_id, exc)

    def interrupt(self, reason: str = "interrupted") -> None:
        """Cancel the job running in this process (embedded mode) at its next check, and every later one.

        Safe to call from a signal handler: the job ends ``cancelled`` with
        ``reason``, writes nothing, and :meth:`wait` raises JobDidNotSucceed.
        """
        self._interrupted = reason
        control = self._control
        if control is not None:
            control.cancel(reason)

    @property
    def interrupted(self) -> bool:
        return self._interrupted is not None

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> tuple[JobStatus, bool]:
        """Cancel a job: ``(record, changed)``; NotFound for an unknown id.

        A queued job ends ``cancelled`` now and never starts; a running one
        is flagged and stops at its next check (within seconds), ending
        ``cancelled``. A finished job is left as it is (``changed`` False).
        """
        return self.registry.cancel(job_id, reason)

    def jobs(
        self, *, state: JobState | str | None = None, archetype: str | None = None, limit: int | None = 20
    ) -> list[JobStatus]:
        """The most recently updated jobs, newest first (optionally of one state and archetype)."""
        return self.registry.jobs(state=state, archetype=archetype, limit=limit)

    # -- reading -----------------------------------------------------------

    def status(self, job_id: str) -> JobStatus:
        """The job's record (NotFound for an id never submitted, or one the registry lost, saying so)."""
        try:
            return self.registry.get(job_id)
        except NotFound as exc:
            raise lost(self.store, job_id, exc) from exc

    def wait(
        self,
        job_id: str,
        *,
        timeout: float = 3600,
        on_update: StatusCallback | None = None,
        on_outage: OutageCallback | None = None,
    ) -> CalibrationSummary:
        """Block until the job ends; its summary, or JobDidNotSucceed with the reason.

        Rides through outages of Redis and the store: a RetryableError is
        reported to ``on_outage(error, seconds_left)`` and the wait goes on,
        with backoff, until ``timeout``. Raises the last RetryableError if
        the fleet could not be reached when time ran out, WaitTimeout (a
        TimeoutError) if it could and the job had not ended.
        """
        deadline = time.monotonic() + timeout
        status = self._riding_through(lambda left: self._follow(job_id, left, on_update), deadline, on_outage)
        if status.state is not JobState.SUCCEEDED:
            raise JobDidNotSucceed(status)
        return self._riding_through(lambda _: self.result(job_id), deadline, on_outage)

    def _follow(self, job_id: str, timeout: float, on_update: StatusCallback | None) -> JobStatus:
        """The job's final record, read until it ends (WaitTimeout after ``timeout``)."""
        try:
            return self.registry.wait(job_id, timeout=timeout, on_update=on_update)
        except NotFound as exc:
            raise lost(self.store, job_id, exc) from exc

    @staticmethod
    def _riding_through(call: Callable[[float], T], deadline: float, on_outage: OutageCallback | None) -> T:
        """``call(seconds_left)``, tried again through a RetryableError until ``deadline`` (all of its time).

        Only calq's RetryableError counts as an outage here: a WaitTimeout is
        a TimeoutError, which :func:`~shared.contract.errors.classify` would retry.
        """
        def waiting(fault: BaseException, left: float) -> None:
            if on_outage is not None:
                on_outage(fault, left)
            else:
                log.warning("%s; retrying for up to %.0f s more", fault, left)

        first, most = OUTAGE_BACKOFF_S
        return retry_transient(lambda: call(max(0.0, deadline - time.monotonic())),
                               budget_s=deadline - time.monotonic(), first_s=first, max_s=most, on_wait=waiting,
                               transient=lambda fault: isinstance(fault, RetryableError), to_the_end=True)

    def result(self, job_id: str) -> CalibrationSummary:
        """The summary of a succeeded job, read from the store."""
        status = self.registry.find(job_id)
        if status is not None and status.state is not JobState.SUCCEEDED:
            raise JobDidNotSucceed(status) if status.state.finished else NotFound(
                f"job {job_id} is {status.state.value}: no summary yet"
            )
        if status is not None and status.summary_uri:
            return self.catalog.read(status.summary_uri)
        return self.catalog.summary(job_id)

    def latest(self, archetype: str, event: str | None = None) -> CalibrationSummary:
        """The newest converged summary for an archetype (and event; default: any of its events)."""
        pointers = self.latest_pointers([archetype])
        found = newest(p for (a, e), p in pointers.items() if event is None or e == event)
        if found is None:
            what = f"{archetype}" + (f" / {event}" if event else "")
            raise NotFound(f"no converged calibration for {what} yet")
        return self.catalog.read(found.summary_uri)

    def latest_pointers(self, archetypes: Sequence[str] | None = None) -> dict[tuple[str, str], LatestPointer]:
        """``{(archetype, event): pointer}`` of the newest converged fits (of ``archetypes``, if given).

        One store, one truth: where the registry has no pointer for one of
        ``archetypes`` (or none at all), the store's own fits are merged into
        it first, so a fit made in embedded mode on this store, or before
        Redis was flushed, is latest on the fleet as it is embedded.
        """
        def read() -> dict[tuple[str, str], LatestPointer]:
            pointers = self.registry.latest_all()
            return {slot: p for slot, p in pointers.items() if archetypes is None or slot[0] in archetypes}

        pointers = read()
        missing = not pointers or (archetypes is not None and set(archetypes) - {a for a, _ in pointers})
        if missing and self.registry.merge_latest(self.catalog):
            pointers = read()
        return pointers

    def posterior(self, job_id: str):
        """The job's posterior as an ArviZ InferenceData (its bytes checked against the signed summary first)."""
        return self.catalog.posterior(self.result(job_id))

    def posterior_at(self, uri: str):
        """The posterior stored at ``uri`` (``calq apply``), as an ArviZ InferenceData."""
        return self.store.get_inference_data(uri)

    def calibrate(self, archetype: str, track: str | None, event: str, p: Sequence[float]):
        """Calibrate forecast probabilities with the latest converged posterior.

        Each result says whether the posterior fitted ``track``
        (``track_seen``; False: an unseen track, which borrows its
        archetype). A name that differs from a fitted track only in case is
        refused with ValueError naming the fitted one.
        """
        from shared.fit.apply import calibrate_probabilities

        summary = self.latest(archetype, event)
        idata = self.catalog.posterior(summary)
        return calibrate_probabilities(idata, p, event=event, track=track, archetype=archetype)

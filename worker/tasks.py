"""The Celery task: a few lines over :func:`shared.jobs.handle.process`.

Start a worker with ``celery -A worker.tasks worker --pool solo ...`` (the
supervisor, :mod:`worker.supervisor`, does this once per GPU). Importing this
module needs no broker and never imports JAX; the app (``worker.tasks.app``)
and the task (``worker.tasks.calibrate``) are built on first use.

Process start (``worker_process_init``, sent by the solo pool too) is where
the device is checked: a worker started with ``JAX_PLATFORMS=cuda`` that sees
no GPU logs an error and exits with :attr:`~worker.exit_codes.WorkerExit.DEVICE_UNAVAILABLE`, which the
supervisor does not restart, rather than quietly running jobs on the CPU.

Every job runs under a lease (:mod:`shared.jobs.lease`) renewed by a
heartbeat thread: a delivery whose job holds a lease elsewhere is dropped,
and a job whose worker dies is handed back by its supervisor or the reaper.
A running job stops at its next progress report and hands itself back
(without counting the delivery) when this process is asked to stop cold
(:data:`~worker.protocol.HAND_BACK_SIGNAL`, sent by the supervisor instead of Celery's
SIGQUIT, whose solo pool would fail the job) or its supervisor is gone.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task, signals
from celery.worker.consumer import Consumer

from shared.contract.errors import RetryableError, transient_as_retryable
from shared.contract.job import JobState, Progress
from shared.contract.retry import TASK_MAX_RETRIES, TASK_RETRY_BACKOFF_MAX_S
from shared.contract.settings import get_settings
from shared.jobs import handle, metrics
from shared.jobs.celery_app import TASK_NAME, get_app
from shared.jobs.lease import Fence, HandBack, Heartbeat, hand_back
from shared.jobs.registry.patient import PatientRegistry
from shared.jobs.services import Services
from worker import observe
from worker.exit_codes import WorkerExit
from worker.protocol import (
    BEAT_FILE_ENV,
    LOG_FORMAT,
    SAMPLING_PHASES,
    beat,
    lease_holder,
    listen_for_hand_back,
    stop_reason,
)

log = logging.getLogger(__name__)



_services_cache: dict[int, Services] = {}


def context() -> Services:
    """This process's :class:`~shared.jobs.services.Services`, built once (per pid: they must not cross a fork)."""
    pid = os.getpid()
    services = _services_cache.get(pid)
    if services is None:
        services = Services.from_settings(get_settings())
        _services_cache.clear()
        _services_cache[pid] = services
    return services


def _message_job_id(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
    message = args[0] if args else kwargs.get("message")
    job_id = message.get("job_id") if isinstance(message, Mapping) else None
    return job_id if isinstance(job_id, str) and job_id else None


class CalibrateTask(Task):
    """Base of the calibrate task: a task that finally fails leaves a failed job record."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_id = _message_job_id(tuple(args or ()), kwargs or {})
        if job_id is None:
            return
        if isinstance(exc, RetryableError):
            reason = f"gave up after {self.request.retries} retries: {type(exc).__name__}: {exc}"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        with handle.bound_job_id(job_id):
            log.error("task failed: %s", reason)
            try:
                context().registry.fail(job_id, reason[: handle.MAX_REASON_CHARS])
            except Exception:  # the registry may be what is down; the log keeps the reason
                log.exception("could not record the failure")


def calibrate_message(task: Task, message: Mapping[str, Any]) -> dict[str, Any]:
    """The task body: run ``message`` through the handler, under the job's lease.

    A delivery whose job holds a lease elsewhere is dropped (Celery's own
    late redelivery of a job another worker took over); a redelivery of a job
    whose summary is already in the store repairs the record instead of
    fitting again. Every log line inside names the job.
    """
    job_id = _message_job_id((message,), {})
    refused = eta_refusal(getattr(task.request, "eta", None), max_eta_s=context().settings.max_eta_s)
    if refused is not None:
        return _refuse(refused)
    with handle.bound_job_id(job_id):
        return _calibrate_leased(task, message, job_id)


def _calibrate_leased(task: Task, message: Mapping[str, Any], job_id: str | None) -> dict[str, Any]:
    ctx = context()
    # The name in the record, the logs and the lease: node name and pid (two supervisors on one host share node names).
    worker = lease_holder(task.request.hostname or "calq")
    attempt = task.request.retries or 0

    def run(on_progress: Any = None, fence: Fence | None = None) -> dict[str, Any]:
        # Under a lease, every record change and store write is fenced by it (shared.jobs.lease.Fence).
        fenced = ctx.registry if fence is None else ctx.registry.fenced(fence)
        registry = observe.observed(PatientRegistry(fenced, ctx.settings), message)
        delivery = handle.Delivery(message, worker=worker, attempt=attempt, fence=fence, on_progress=on_progress)
        return handle.process(ctx.with_registry(registry), delivery)

    if job_id is None or ctx.leases is None:
        return run()  # the handler refuses a message without a job id
    leases = ctx.leases
    queue = (task.request.delivery_info or {}).get("routing_key")
    with transient_as_retryable():
        lease = leases.acquire(job_id, worker, message=message, attempt=attempt, queue=queue)
        if lease is None:
            holder = leases.holder(job_id)
            log.info("already running on %s; this delivery is dropped", holder)
            return handle.status_dict(job_id, JobState.RUNNING, f"running on {holder}")
    released = False
    try:
        with transient_as_retryable():
            repaired = _repair_redelivery(ctx, job_id)
        if repaired is not None:
            return repaired
        fence = Fence(leases, lease)
        with Heartbeat(leases, lease, interval_s=ctx.settings.recovery.heartbeat_s, on_beat=beat) as lease_beat:
            sampling = False

            def check(progress: Progress) -> None:
                nonlocal sampling
                if not sampling and progress.phase in SAMPLING_PHASES:
                    sampling = True
                    try:
                        ctx.registry.fenced(fence).count_sampler_run(job_id)
                    except Exception as exc:  # a counter for people and tests; never a reason to stop
                        log.warning("could not count this sampler run (%s: %s)", type(exc).__name__, exc)
                if lease_beat.lost.is_set():
                    raise HandBack("its lease was taken: another worker runs it", requeue=False)
                reason = stop_reason()
                if reason is not None:
                    raise HandBack(reason)

            try:
                return run(check, fence)
            except HandBack as stop:
                released = True
                _give_back(ctx, lease, stop)
                return handle.status_dict(job_id, JobState.QUEUED, stop.reason)
    finally:
        if not released:
            try:
                leases.release(lease)
            except Exception as exc:  # the lease lapses on its own; the reaper finds the job finished
                log.warning("could not release the lease (%s: %s)", type(exc).__name__, exc)




def _give_back(ctx: Services, lease: Any, stop: HandBack) -> None:
    """Hand the job back after a :class:`HandBack`: re-queued without counting the delivery, unless no longer ours."""
    worker = lease.worker
    try:
        if stop.requeue and ctx.leases.release(lease):
            done = hand_back(lease.job_id, registry=ctx.registry, leases=ctx.leases, store=ctx.store,
                             publish=ctx.publish, reason=f"{worker} stopped: {stop.reason}",
                             count_delivery=False)
            metrics.handed_back("stopped", done=done)
        else:
            log.warning("stopped: %s", stop.reason)
    except Exception as exc:  # Redis out: the lease lapses, or the claim went back, and the reaper hands it back
        log.error("stopped (%s) but could not hand the job back (%s: %s); the reaper will",
                   stop.reason, type(exc).__name__, exc)


def _repair_redelivery(ctx: Services, job_id: str) -> dict[str, Any] | None:
    """The stored summary of a redelivered job that finished (record repaired), or None to run it."""
    from shared.storage.catalog import Catalog

    record = ctx.registry.find(job_id)
    if record is None or record.state is JobState.SUCCEEDED or record.state.finished:
        return None  # the handler deals with these
    if record.deliveries == 0 and record.state is JobState.QUEUED:
        return None  # a first delivery: nothing can be in the store yet
    repaired = ctx.registry.repair(job_id, Catalog(ctx.store))
    if repaired is None:
        return None
    log.info("redelivered, but its summary is in the store: record repaired, the fit not run again")
    return Catalog(ctx.store).read(repaired.summary_uri).model_dump(mode="json")


# -- messages refused before they run -------------------------------------------------
#
# Two kinds of message never reach the handler's own refusal: a body Celery
# cannot decode (not JSON, not UTF-8, a JSON body nested 200k deep: kombu wraps
# the RecursionError in a DecodeError, raised in the consumer under the solo
# pool), and a message asking to wait (an ETA or countdown), which Celery
# reserves and keeps in the worker's memory until then, whatever the prefetch
# limit: 3,000 messages with a one-day ETA were all parked in one worker.
# Both are counted in calq:invalid and dropped, never quoting the message.


def eta_refusal(eta: dt.datetime | str | None, *, max_eta_s: int, now: dt.datetime | None = None) -> str | None:
    """Why a message asking to run at ``eta`` is refused, or None (no ETA, or one within ``max_eta_s``).

    calq's own retries wait at most :data:`~shared.contract.retry.TASK_RETRY_BACKOFF_MAX_S`, within the
    default ``max_eta_s``; a producer has no reason to send an ETA at all. An
    ETA that is not a date is refused too. Naive times count as UTC.
    """
    if eta is None or eta == "":
        return None
    if isinstance(eta, str):
        try:
            eta = dt.datetime.fromisoformat(eta)
        except ValueError:
            return "invalid job message: its ETA is not a date"
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=dt.UTC)
    if (eta - (now or dt.datetime.now(dt.UTC))).total_seconds() <= max_eta_s:
        return None
    return (f"invalid job message: its ETA or countdown lies more than max_eta_s = {max_eta_s} s ahead "
            "(a worker never parks a message that long)")


def _refuse(reason: str) -> dict[str, Any]:
    """Count a message refused before the handler saw it, as the handler counts its own refusals."""
    return handle.refuse_message(observe.observed(context().registry, {}), None, reason)


@signals.task_received.connect
def _never_park(request: Any = None, **_: Any) -> None:
    """A calibrate message whose ETA :func:`eta_refusal` refuses runs now, where the task refuses it.

    Clearing the request's ETA (Celery's ``Request._eta``) before the
    strategy reads it keeps it out of the timer and under the prefetch
    limit; the task still sees the ETA the message asked for.
    """
    if getattr(request, "name", None) != TASK_NAME or getattr(request, "eta", None) is None:
        return
    if eta_refusal(request.eta, max_eta_s=get_settings().max_eta_s) is not None:
        request._eta = None


class CountingConsumer(Consumer):
    """Celery's consumer, counting each message it cannot decode or accept in ``calq:invalid`` before dropping it.

    Celery's own handlers log the message body; these name only the error's type.
    """

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
        self._refuse(message, f"invalid job message: undecodable body ({type(cause).__name__})", ack=True)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._refuse(message, f"invalid job message: not a task message Celery accepts ({type(exc).__name__})")

    def _refuse(self, message: Any, reason: str, *, ack: bool = False) -> None:
        log.error("%s; dropped", reason)
        try:
            _refuse(reason)
        except Exception as count_error:  # the count is best-effort; the message is dropped either way
            log.warning("could not count a refused message (%s)", type(count_error).__name__)
        if ack:
            message.ack()
        else:
            message.reject_log_error(log, self.connection_errors)


@functools.cache
def register(app: Celery) -> Task:
    """Add the calibrate task to ``app`` (once) and return it."""

    @app.task(
        name=TASK_NAME,
        bind=True,
        base=CalibrateTask,
        autoretry_for=(RetryableError,),
        retry_backoff=True,
        retry_backoff_max=TASK_RETRY_BACKOFF_MAX_S,
        retry_jitter=True,
        max_retries=TASK_MAX_RETRIES,
        acks_late=True,
        reject_on_worker_lost=True,
        shared=False,
    )
    def calibrate(self: Task, message: dict[str, Any]) -> dict[str, Any]:
        return calibrate_message(self, message)

    return calibrate


def __getattr__(name: str) -> Any:
    # Built lazily, so importing this module needs no broker (``celery -A`` reads ``app``).
    if name == "app":
        app = get_app()
        register(app)
        app.conf.worker_consumer = f"{__name__}:CountingConsumer"
        return app
    if name == "calibrate":
        return register(get_app())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- process start ---------------------------------------------------------------


def device_problem(environ: Mapping[str, str] | None = None) -> str | None:
    """Why this process's JAX device is not the one it was started for, or None if it is.

    Only ``JAX_PLATFORMS=cuda`` is checked: such a worker must see a GPU.
    Imports JAX: call it in the process that runs jobs, never in one that forks.
    """
    environ = os.environ if environ is None else environ
    wanted = environ.get("JAX_PLATFORMS", "").strip().lower()
    try:
        import jax

        devices = jax.devices()
    except Exception as exc:
        return (
            f"JAX could not initialise the {wanted or 'default'} backend "
            f"({type(exc).__name__}: {str(exc) or 'no details'}); is jax[cuda12] installed and a GPU visible?"
        )
    log.info("JAX devices: %s", ", ".join(f"{d.platform}:{d.id}" for d in devices))
    if wanted == "cuda" and (not devices or devices[0].platform != "gpu"):
        return f"started with JAX_PLATFORMS=cuda but JAX runs on {devices[0].platform if devices else 'nothing'}"
    return None


@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    listen_for_hand_back()
    problem = device_problem()
    if problem is not None:
        log.error(
            "%s (CUDA_VISIBLE_DEVICES=%r); exiting rather than running GPU jobs on the CPU",
            problem, os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
        logging.shutdown()
        sys.stderr.flush()
        os._exit(WorkerExit.DEVICE_UNAVAILABLE)
    try:
        from shared.jobs.run import prepare_process

        prepare_process(get_settings())
    except Exception:  # each job prepares again and fails with the reason if this is fatal
        log.exception("could not prepare the process (compile cache); carrying on")


@signals.worker_ready.connect
def _beat_while_idle(sender: Any = None, **_: Any) -> None:
    """Beat every ``recovery.heartbeat_s`` from the consumer's event loop (which a running job blocks)."""
    timer = getattr(sender, "timer", None)
    if timer is None or not os.environ.get(BEAT_FILE_ENV):
        return
    beat()
    timer.call_repeatedly(get_settings().recovery.heartbeat_s, beat)


@signals.setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    # Connected, so Celery leaves logging alone: one root handler, job id on every line.
    configure_logging(loglevel or get_settings().log_level)


def configure_logging(level: int | str = "INFO") -> None:
    """Log to stderr with the running job's id on every line (worker entry points only)."""
    stream = logging.StreamHandler()
    stream.setFormatter(observe.log_formatter(LOG_FORMAT))
    stream.addFilter(handle.JobIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(stream)
    root.setLevel(level if isinstance(level, int) else str(level).upper())

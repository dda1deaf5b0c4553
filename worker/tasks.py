"""The Celery task, its consumer and its signal hooks: a thin shell over the jobs layer.

Start a worker with ``celery -A worker.tasks worker --pool solo ...`` (the
supervisor, :mod:`worker.supervisor`, does this once per GPU). Importing this
module needs no broker and never imports JAX; the app (``worker.tasks.app``)
and the task (``worker.tasks.calibrate``) are built on first use.

- The task, ``calq.calibrate``: refuses a message whose ETA lies too far
  ahead (:func:`eta_refusal`), then runs it under its job's lease
  (:func:`shared.jobs.delivery.run_leased` over
  :func:`shared.jobs.handle.process`, with this process's
  :class:`~shared.jobs.services.Services`); Celery retries a
  RetryableError (:data:`~shared.contract.retry.TASK_MAX_RETRIES` times), and
  a task that finally fails leaves a failed record (:class:`CalibrateTask`).
- The consumer (:class:`CountingConsumer`): a message Celery cannot decode
  or accept is counted in ``calq:invalid`` and dropped.
- The signal hooks: at process start the device is checked
  (:mod:`worker.device`), the supervisor's cold shutdown is listened for
  (:mod:`worker.protocol`) and the compile cache prepared; an idle worker
  beats from Celery's loop; logging is configured once
  (:func:`worker.observe.configure_logging`); an ETA is never parked.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task, signals
from celery.worker.consumer import Consumer

from shared.contract.errors import RetryableError
from shared.contract.retry import TASK_MAX_RETRIES, TASK_RETRY_BACKOFF_MAX_S
from shared.contract.settings import get_settings
from shared.jobs import handle
from shared.jobs.celery_app import TASK_NAME, get_app
from shared.jobs.delivery import run_leased
from shared.jobs.services import Services
from worker import observe
from worker.batch import register_batch
from worker.device import exit_unless_device_fits
from worker.protocol import (
    BEAT_FILE_ENV,
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
    return handle.claimed_job_id(args[0] if args else kwargs.get("message"))


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
    """The task body: ``message`` run under its job's lease (:func:`shared.jobs.delivery.run_leased`).

    A message whose ETA lies too far ahead is refused first
    (:func:`eta_refusal`). Every log line inside names the job.
    """
    services = context()
    refused = eta_refusal(getattr(task.request, "eta", None), max_eta_s=services.settings.max_eta_s)
    if refused is not None:
        return _refuse(refused)
    # The name in the record, the logs and the lease: node name and pid (two supervisors on one host share node names).
    delivery = handle.Delivery(message, worker=lease_holder(task.request.hostname or "calq"),
                               attempt=task.request.retries or 0)
    with handle.bound_job_id(handle.claimed_job_id(message)):
        return run_leased(services, delivery, queue=(task.request.delivery_info or {}).get("routing_key"),
                          view=lambda registry: observe.observed(registry, message), stop_reason=stop_reason,
                          on_beat=beat)


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


#: How calq's tasks are delivered and retried (the calibrate task and the batch task, worker.batch).
TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "autoretry_for": (RetryableError,),
    "retry_backoff": True,
    "retry_backoff_max": TASK_RETRY_BACKOFF_MAX_S,
    "retry_jitter": True,
    "max_retries": TASK_MAX_RETRIES,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "shared": False,
}


@functools.cache
def register(app: Celery) -> Task:
    """Add the calibrate task (and the batch task) to ``app`` (once); return the calibrate task."""

    @app.task(name=TASK_NAME, base=CalibrateTask, **TASK_OPTIONS)
    def calibrate(self: Task, message: dict[str, Any]) -> dict[str, Any]:
        return calibrate_message(self, message)

    register_batch(app)  # calq.calibrate_batch: a backfill's jobs in one delivery (worker.batch)
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


@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    listen_for_hand_back()
    exit_unless_device_fits()
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
    observe.configure_logging(loglevel or get_settings().log_level)

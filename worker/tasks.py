"""The Celery task: a few lines over :func:`shared.jobs.handle.process`.

Start a worker with ``celery -A worker.tasks worker --pool solo ...`` (the
supervisor, :mod:`worker.supervisor`, does this once per GPU). Importing this
module needs no broker and never imports JAX; the app (``worker.tasks.app``)
and the task (``worker.tasks.calibrate``) are built on first use.

Process start (``worker_process_init``, sent by the solo pool too) is where
the device is checked: a worker started with ``JAX_PLATFORMS=cuda`` that sees
no GPU logs an error and exits with :data:`EXIT_DEVICE_ERROR`, which the
supervisor does not restart, rather than quietly running jobs on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task, signals

from shared.contract.errors import RetryableError
from shared.contract.settings import Settings, get_settings
from shared.jobs import handle
from shared.jobs.celery_app import TASK_NAME, get_app

log = logging.getLogger(__name__)

#: Exit status of a worker whose device is not the one it was started for (EX_CONFIG).
EXIT_DEVICE_ERROR = 78
MAX_RETRIES = 5
RETRY_BACKOFF_MAX_S = 600
LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s [%(job_id)s] %(message)s"


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """What every job in this process shares: settings, the job registry, the store."""

    settings: Settings
    registry: Any
    store: Any


_context_cache: dict[int, WorkerContext] = {}


def context() -> WorkerContext:
    """This process's :class:`WorkerContext`, built once (per pid: it must not cross a fork)."""
    pid = os.getpid()
    ctx = _context_cache.get(pid)
    if ctx is None:
        from shared.jobs.registry import RedisRegistry
        from shared.storage.store import Store

        settings = get_settings()
        # The registry lives beside the results (a client with connect/read timeouts).
        registry = RedisRegistry.from_url(settings.backend())
        ctx = WorkerContext(settings=settings, registry=registry, store=Store.from_settings(settings))
        _context_cache.clear()
        _context_cache[pid] = ctx
    return ctx


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
        jlog = handle.JobLog(log, {"job_id": job_id})
        jlog.error("task failed: %s", reason)
        try:
            context().registry.fail(job_id, reason[: handle.MAX_REASON_CHARS])
        except Exception:  # the registry may be what is down; the log keeps the reason
            jlog.exception("could not record the failure")


def calibrate_message(task: Task, message: Mapping[str, Any]) -> dict[str, Any]:
    """The task body: run ``message`` through the handler with this process's context."""
    ctx = context()
    return handle.process(
        message,
        registry=ctx.registry,
        store=ctx.store,
        settings=ctx.settings,
        worker=task.request.hostname or f"pid{os.getpid()}",
        attempt=task.request.retries or 0,
    )


@functools.cache
def register(app: Celery) -> Task:
    """Add the calibrate task to ``app`` (once) and return it."""

    @app.task(
        name=TASK_NAME,
        bind=True,
        base=CalibrateTask,
        autoretry_for=(RetryableError,),
        retry_backoff=True,
        retry_backoff_max=RETRY_BACKOFF_MAX_S,
        retry_jitter=True,
        max_retries=MAX_RETRIES,
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
    problem = device_problem()
    if problem is not None:
        log.error(
            "%s (CUDA_VISIBLE_DEVICES=%r); exiting rather than running GPU jobs on the CPU",
            problem, os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
        logging.shutdown()
        sys.stderr.flush()
        os._exit(EXIT_DEVICE_ERROR)
    try:
        from shared.jobs.run import prepare_process

        prepare_process(get_settings())
    except Exception:  # each job prepares again and fails with the reason if this is fatal
        log.exception("could not prepare the process (compile cache); carrying on")


@signals.setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    # Connected, so Celery leaves logging alone: one root handler, job id on every line.
    configure_logging(loglevel or get_settings().log_level)


def configure_logging(level: int | str = "INFO") -> None:
    """Log to stderr with the running job's id on every line (worker entry points only)."""
    stream = logging.StreamHandler()
    stream.setFormatter(logging.Formatter(LOG_FORMAT))
    stream.addFilter(handle.JobIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(stream)
    root.setLevel(level if isinstance(level, int) else str(level).upper())

"""What a worker process tells the fleet about itself: metrics, its heartbeat record, JSON logs.

Three pieces, each wired by one line elsewhere:

- :func:`observed` wraps the registry a job runs with
  (:func:`worker.tasks.calibrate_message`, through
  :func:`shared.jobs.delivery.run_leased`'s ``view``). The registry is where a job's
  outcome is decided, so the wrapper sees every start, phase and final state
  the worker itself records, and counts them: ``calq_jobs_finished_total``
  and the rest (:mod:`shared.jobs.metrics`), and one entry in the fleet's
  recent-jobs list (:mod:`shared.jobs.telemetry`). A ``fail`` of a job this
  delivery never started is a dead letter (``queued → failed`` is only that,
  see :mod:`shared.jobs.registry.base`); ``record_invalid`` an invalid
  message.
- :class:`Beacon`, started when Celery says the worker is ready, publishes this
  process's heartbeat record every ``metrics.heartbeat_s`` (node, pid,
  device, idle or busy, job and phase, lease age, jobs done, last error),
  and at once on every start and finish of a job; it removes the record when
  the worker shuts down. ``task_postrun`` puts the process back to idle
  whatever way the task ended (retry, hand-back, error).
- :class:`JsonFormatter`: with ``CALQ_LOG__FORMAT=json`` each log line is one
  JSON object (time, level, worker, job_id, archetype, phase, logger,
  message), ASCII-escaped, so a message can never split a line.

Nothing here may fail a job: a metric or heartbeat that cannot be written
is logged once and skipped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from celery import signals

import shared
from shared.contract.settings import Settings, get_settings
from shared.jobs import metrics, telemetry
from shared.jobs.celery_app import ALL_QUEUES, BATCH, INTERACTIVE
from shared.jobs.handle import current_job_id

log = logging.getLogger(__name__)

#: Progress phases that mean a sampler is running (a job stopped in one of them interrupted a run).
SAMPLER_PHASES = frozenset({"compile", "warmup", "sampling"})
#: A heartbeat record outlives this many missed heartbeats.
TTL_BEATS = 3


def device_name(environ: Mapping[str, str] | None = None) -> str:
    """``gpu:<id>`` for a worker pinned to a GPU, else ``cpu`` (from the environment; JAX not imported)."""
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "").lower()
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if "cuda" in platforms or "gpu" in platforms:
        return f"gpu:{visible or '?'}"[:64]
    return "cpu"


@dataclasses.dataclass
class Activity:
    """This process, as its heartbeat record describes it."""

    worker: str | None = None
    node: str = dataclasses.field(default_factory=socket.gethostname)
    pid: int = dataclasses.field(default_factory=os.getpid)
    device: str = dataclasses.field(default_factory=device_name)
    started_at: float = dataclasses.field(default_factory=time.time)
    job_id: str | None = None
    archetype: str | None = None
    phase: str | None = None
    lease_since: float | None = None
    jobs_done: int = 0
    last_error: str | None = None

    def beat(self) -> telemetry.WorkerBeat:
        return telemetry.beat_from({
            "worker": self.worker or f"pid{self.pid}", "pid": self.pid, "node": self.node, "device": self.device,
            "version": shared.__version__, "state": "busy" if self.job_id else "idle", "job_id": self.job_id,
            "archetype": self.archetype, "phase": self.phase, "lease_since": self.lease_since,
            "heartbeat_at": time.time(), "started_at": self.started_at, "jobs_done": self.jobs_done,
            "last_error": self.last_error,
        })

    def idle(self) -> None:
        self.job_id = self.archetype = self.phase = None
        self.lease_since = None


#: The one activity of this process (a solo-pool worker runs one job at a time).
activity = Activity()


class Beacon:
    """Publishes :data:`activity` to Redis every ``interval_s`` from a daemon thread, and on :meth:`now`."""

    def __init__(self, redis_client: Any, prefix: str, *, interval_s: float) -> None:
        self._redis, self._prefix, self._interval = redis_client, prefix, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    def now(self) -> None:
        try:
            beat = activity.beat()
            telemetry.publish_beat(self._redis, self._prefix, beat, ttl_s=self._interval * TTL_BEATS)
            self._warned = False
        except Exception as exc:  # Redis out: the record expires, calq fleet shows the worker gone
            if not self._warned:
                log.warning("could not publish the heartbeat record (%s: %s)", type(exc).__name__, exc)
                self._warned = True

    def start(self) -> Beacon:
        self.now()
        self._thread = threading.Thread(target=self._run, name="calq-beacon", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            telemetry.remove_beat(self._redis, self._prefix, activity.beat().holder)
        except Exception as exc:
            log.warning("could not remove the heartbeat record (%s: %s); it expires", type(exc).__name__, exc)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.now()


_beacon: Beacon | None = None
_fleet_redis: tuple[Any, str] | None = None


def _fleet(settings: Settings) -> tuple[Any, str]:
    """This process's Redis client and key prefix for fleet records (the registry's)."""
    global _fleet_redis
    if _fleet_redis is None:
        from shared.jobs.services import Services

        registry = Services.from_settings(settings).registry  # a RedisRegistry: workers have a broker
        _fleet_redis = (registry.redis, registry.prefix)
    return _fleet_redis


def _publish_now() -> None:
    if _beacon is not None:
        _beacon.now()


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    global _beacon
    settings = get_settings()
    activity.worker = getattr(sender, "hostname", None) or activity.worker
    activity.pid = os.getpid()
    metrics.worker_state(activity.worker or f"pid{activity.pid}", busy=False, version=shared.__version__,
                         device=activity.device)
    try:
        redis_client, prefix = _fleet(settings)
    except Exception as exc:
        log.warning("no heartbeat record: %s: %s", type(exc).__name__, exc)
        return
    _beacon = Beacon(redis_client, prefix, interval_s=settings.metrics.heartbeat_s).start()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    global _beacon
    if _beacon is not None:
        _beacon.stop()
        _beacon = None


@signals.task_prerun.connect
def _on_task_prerun(**_: Any) -> None:
    activity.lease_since = time.time()  # the task takes the job's lease first thing


@signals.task_postrun.connect
def _on_task_postrun(**_: Any) -> None:
    if activity.job_id is not None:
        activity.idle()
        metrics.worker_state(activity.worker or f"pid{activity.pid}", busy=False)
        _publish_now()
    activity.lease_since = None


# -- the observed registry -----------------------------------------------------------


def lane_of(queue: object) -> str:
    """The lane a job was delivered in: ``batch`` from a queue's batch twin (``calq.cpu.batch``), else ``interactive``."""
    return BATCH if isinstance(queue, str) and queue in ALL_QUEUES and queue.endswith(f".{BATCH}") else INTERACTIVE


def _delivered_from() -> str | None:
    """The queue the running Celery task's message came from (its routing key), or None outside a task."""
    from celery import current_task

    request = getattr(current_task, "request", None)
    info = getattr(request, "delivery_info", None) or {}
    return info.get("routing_key") if isinstance(info, Mapping) else None


def remedies_of(attempts: list[Any]) -> list[str]:
    """What each remedied sampler run changed, from its settings against the run before it (see shared.fit.remedy)."""
    changes = []
    for before, after in itertools.pairwise(attempts):
        if before.warm_start and not after.warm_start:
            changes.append("cold_start")
        elif after.target_accept_prob != before.target_accept_prob:
            changes.append("target_accept")
        elif after.warmup != before.warmup:
            changes.append("warmup")
        else:
            changes.append("draws")
    return changes


class ObservedRegistry:
    """A job's registry that counts what the worker records (see the module docstring); all else passes through."""

    def __init__(self, registry: Any, *, settings: Settings, lane: str = INTERACTIVE) -> None:
        self._registry, self._settings, self._lane = registry, settings, lane
        self._started: float | None = None
        self._queued_s: float | None = None
        self._sampling = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)

    def mark_running(self, job_id: str, *, worker: str) -> Any:
        status = self._registry.mark_running(job_id, worker=worker)
        if status is not None:
            self._started = time.monotonic()
            if status.submitted_at is not None and status.started_at is not None:
                self._queued_s = max(0.0, (status.started_at - status.submitted_at).total_seconds())
            activity.job_id, activity.archetype, activity.phase = job_id, status.archetype, "load"
            activity.lease_since = activity.lease_since or time.time()
            metrics.worker_state(activity.worker or f"pid{activity.pid}", busy=True)
            _publish_now()
        return status

    def progress(self, job_id: str, progress: Any) -> Any:
        activity.phase = progress.phase
        self._sampling = self._sampling or progress.phase in SAMPLER_PHASES
        return self._registry.progress(job_id, progress)

    def succeed(self, job_id: str, summary: Any) -> Any:
        status = self._registry.succeed(job_id, summary)
        if status is not None:
            t = summary.timings
            self._finished(job_id, summary.archetype, "succeeded",
                           phases={"load": t.load_s, "compile": t.compile_s, "sample": t.sample_s,
                                   "diagnostics": t.diagnostics_s, "write": t.write_s},
                           rows=summary.n_rows, converged=summary.converged,
                           runs=["converged" if not a.issues else "unconverged" for a in summary.attempts],
                           remedies=remedies_of(list(summary.attempts)),
                           divergences=sum(a.divergences for a in summary.attempts))
        return status

    def fail(self, job_id: str, reason: str) -> Any:
        status = self._registry.fail(job_id, reason)
        if status is not None:
            if self._started is None:  # queued → failed: dead-lettered before it started
                metrics.dead_lettered()
                self._total("dead_letters")
            self._finished(job_id, status.archetype, "failed", error=reason)
        return status

    def reject(self, job_id: str, reason: str) -> Any:
        status = self._registry.reject(job_id, reason)
        if status is not None:
            self._finished(job_id, status.archetype, "rejected", error=reason)
        return status

    def finish_cancelled(self, job_id: str, reason: str) -> Any:
        status = self._registry.finish_cancelled(job_id, reason)
        if status is not None:
            self._finished(job_id, status.archetype, "cancelled")
        return status

    def record_invalid(self, reason: str, *, job_id: str | None = None) -> None:
        self._registry.record_invalid(reason, job_id=job_id)
        metrics.invalid_message()
        self._total("invalid_messages")

    def _total(self, name: str) -> None:
        try:
            redis_client, prefix = _fleet(self._settings)
            telemetry.count(redis_client, prefix, name)
        except Exception as exc:
            log.warning("could not count %s (%s: %s)", name.replace("_", " "), type(exc).__name__, exc)

    def _finished(self, job_id: str, archetype: str, state: str, *, phases: Mapping[str, float] | None = None,
                  rows: int | None = None, converged: bool | None = None, runs: list[str] | None = None,
                  remedies: list[str] | None = None, divergences: int = 0, error: str | None = None) -> None:
        seconds = time.monotonic() - self._started if self._started is not None else 0.0
        if runs is None:
            runs = ["interrupted"] if self._sampling else []
        metrics.job_finished(archetype=archetype, state=state, lane=self._lane,
                             phase_seconds={**({"queued": self._queued_s} if self._queued_s is not None else {}),
                                            **(phases or {})},
                             rows=rows, runs=runs, remedies=remedies or [], divergences=divergences)
        try:
            redis_client, prefix = _fleet(self._settings)
            telemetry.record_finish(redis_client, prefix, telemetry.FinishedJob(
                job_id=job_id, archetype=archetype, state=state, seconds=seconds, converged=converged,
                finished_at=time.time()))
        except Exception as exc:  # the fleet view misses one job; the record is what counts
            log.warning("could not add the job to the fleet's recent list (%s: %s)", type(exc).__name__, exc)
        if activity.job_id == job_id or activity.job_id is None:
            activity.jobs_done += 1
            if error is not None:
                activity.last_error = error
            activity.idle()
            metrics.worker_state(activity.worker or f"pid{activity.pid}", busy=False)
            _publish_now()


def observed(registry: Any, message: Mapping[str, Any]) -> ObservedRegistry:
    """``registry``, counted for the fleet while it runs the job in ``message``.

    The job's lane is the queue Celery delivered it from, not anything the
    message says (whoever wrote the message could have written any lane).
    """
    return ObservedRegistry(registry, settings=get_settings(), lane=lane_of(_delivered_from()))


# -- JSON logs -------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, worker, job_id, archetype, phase, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        job_id = getattr(record, "job_id", None)
        job_id = job_id if isinstance(job_id, str) and job_id != "-" else current_job_id.get()
        same_job = job_id is not None and job_id == activity.job_id
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "worker": activity.worker or record.processName,
            "job_id": job_id,
            "archetype": activity.archetype if same_job else None,
            "phase": activity.phase if same_job else None,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


def log_formatter(text_format: str, settings: Settings | None = None) -> logging.Formatter:
    """The formatter ``settings.log.format`` asks for: :class:`JsonFormatter`, or ``text_format`` lines."""
    settings = get_settings() if settings is None else settings
    return JsonFormatter() if settings.log.format == "json" else logging.Formatter(text_format)


def configure_logging(level: int | str = "INFO") -> None:
    """Log to stderr with the running job's id on every line (:data:`worker.protocol.LOG_FORMAT`; worker children only)."""
    from shared.jobs.handle import JobIdFilter
    from worker.protocol import LOG_FORMAT

    stream = logging.StreamHandler()
    stream.setFormatter(log_formatter(LOG_FORMAT))
    stream.addFilter(JobIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(stream)
    root.setLevel(level if isinstance(level, int) else str(level).upper())


def apply_log_format(settings: Settings | None = None) -> None:
    """With ``log.format=json``, every handler of the root logger writes JSON lines (the supervisor's own logs)."""
    settings = get_settings() if settings is None else settings
    if settings.log.format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())


__all__ = ["Activity", "Beacon", "JsonFormatter", "ObservedRegistry", "activity", "apply_log_format",
           "configure_logging", "device_name", "lane_of", "log_formatter", "observed", "remedies_of"]

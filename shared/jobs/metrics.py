"""calq's Prometheus metrics: one definition of each name, and the supervisor's ``/metrics`` endpoint.

The names are a contract (dashboards and alert rules query them; a test checks
every query against :data:`EXPORTED`)::

    counters    calq_jobs_finished_total{archetype,state,lane}   state: succeeded, failed, rejected, cancelled;
                                                                 lane: interactive, batch (the queue it came from)
                calq_sampler_runs_total{archetype,outcome}       outcome: converged, unconverged, interrupted
                calq_remedies_total{archetype,remedy}            remedy: cold_start, target_accept, warmup, draws
                calq_divergences_total{archetype}
                calq_leases_reaped_total
                calq_handbacks_total{cause}                      cause: worker_lost, lease_lapsed, stopped
                calq_dead_letters_total
                calq_store_write_retries_total
                calq_invalid_messages_total
    histograms  calq_job_seconds{archetype,phase}                phase: queued, load, compile, sample, diagnostics, write
                calq_job_rows{archetype}
    gauges      calq_queue_depth{queue}                          read from Redis at scrape time (batch twins too)
                calq_worker_busy{worker}
                calq_worker_info{worker,version,device}
    API         calq_api_requests_total{method,route,status}     route: the route's template (/v1/jobs/{job_id})
                calq_api_request_seconds{method,route}           (histogram) served by the API's own /metrics

Each worker's supervisor serves them (:func:`serve`), aggregated over its
children with prometheus_client's multiprocess mode: the supervisor points
``PROMETHEUS_MULTIPROC_DIR`` at an empty folder of its own before anything
imports prometheus_client (:func:`prepare_multiprocess`), its children inherit
it, and a child that exits is marked dead (:func:`mark_process_dead`) so its
gauges leave the sum. prometheus_client reads that variable once, when it is
first imported; so this module imports it only inside functions.

Recording never fails a job: every recorder swallows its own errors (logged
once per process). Label values that come from a job (its archetype) are
bounded by the job schema; anything else is mapped onto a fixed set here.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

STATES = ("succeeded", "failed", "rejected", "cancelled")
PHASES = ("queued", "load", "compile", "sample", "diagnostics", "write")
RUN_OUTCOMES = ("converged", "unconverged", "interrupted")
REMEDIES = ("cold_start", "target_accept", "warmup", "draws")
HANDBACK_CAUSES = ("worker_lost", "lease_lapsed", "stopped")
#: Job seconds: from a compile-cache hit (well under a second) to a job at its hour's limit.
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
#: API latency: a record read (milliseconds) to a dataset upload (seconds).
API_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ROWS_BUCKETS = (100, 1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000)

#: Every metric this module exports: name → (type, labels).
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "calq_jobs_finished_total": ("counter", ("archetype", "state", "lane")),
    "calq_sampler_runs_total": ("counter", ("archetype", "outcome")),
    "calq_remedies_total": ("counter", ("archetype", "remedy")),
    "calq_divergences_total": ("counter", ("archetype",)),
    "calq_leases_reaped_total": ("counter", ()),
    "calq_handbacks_total": ("counter", ("cause",)),
    "calq_dead_letters_total": ("counter", ()),
    "calq_store_write_retries_total": ("counter", ()),
    "calq_invalid_messages_total": ("counter", ()),
    "calq_job_seconds": ("histogram", ("archetype", "phase")),
    "calq_job_rows": ("histogram", ("archetype",)),
    "calq_queue_depth": ("gauge", ("queue",)),
    "calq_worker_busy": ("gauge", ("worker",)),
    "calq_worker_info": ("gauge", ("worker", "version", "device")),
    "calq_api_requests_total": ("counter", ("method", "route", "status")),
    "calq_api_request_seconds": ("histogram", ("method", "route")),
}


def _series_names() -> frozenset[str]:
    names = set()
    for name, (kind, _labels) in METRICS.items():
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return frozenset(names)


#: Every series name a query may use (histograms add _bucket, _sum and _count).
EXPORTED: frozenset[str] = _series_names()


@functools.cache
def _metrics() -> dict[str, Any]:
    """The metric objects of this process, made on first use (after the supervisor set the multiprocess folder)."""
    from prometheus_client import Counter, Gauge, Histogram

    def counter(name: str) -> Any:
        base = name.removesuffix("_total")  # prometheus_client appends _total itself
        return Counter(base, _HELP[name], METRICS[name][1])

    made: dict[str, Any] = {name: counter(name) for name, (kind, _) in METRICS.items() if kind == "counter"}
    made["calq_job_seconds"] = Histogram("calq_job_seconds", _HELP["calq_job_seconds"], METRICS["calq_job_seconds"][1],
                                         buckets=SECONDS_BUCKETS)
    made["calq_api_request_seconds"] = Histogram(
        "calq_api_request_seconds", _HELP["calq_api_request_seconds"], METRICS["calq_api_request_seconds"][1],
        buckets=API_SECONDS_BUCKETS)
    made["calq_job_rows"] = Histogram("calq_job_rows", _HELP["calq_job_rows"], METRICS["calq_job_rows"][1],
                                      buckets=ROWS_BUCKETS)
    # livesum/livemax: a dead child's value leaves the aggregate once it is marked dead.
    made["calq_worker_busy"] = Gauge("calq_worker_busy", _HELP["calq_worker_busy"], ("worker",),
                                     multiprocess_mode="livesum")
    for cause in HANDBACK_CAUSES:  # a series per cause from the start: 0, not "no data"
        made["calq_handbacks_total"].labels(cause)
    made["calq_worker_info"] = Gauge("calq_worker_info", _HELP["calq_worker_info"], ("worker", "version", "device"),
                                     multiprocess_mode="livemax")
    return made


_HELP = {
    "calq_jobs_finished_total": "Jobs this fleet finished, by final state and lane (interactive or batch).",
    "calq_sampler_runs_total": "Sampler runs, by how they ended (unconverged runs are followed by a remedy).",
    "calq_remedies_total": "Sampler runs that changed something after a run failed the convergence criteria.",
    "calq_divergences_total": "Divergent transitions over every sampler run.",
    "calq_leases_reaped_total": "Jobs whose lease lapsed (worker lost) and that the reaper handed back.",
    "calq_handbacks_total": "Jobs given back to the queue, by cause.",
    "calq_dead_letters_total": "Jobs failed after max_deliveries deliveries (they kept losing their worker).",
    "calq_store_write_retries_total": "Store or Redis writes of finished results tried again after a transient fault.",
    "calq_invalid_messages_total": "Messages that were not a valid job: dropped, no record changed.",
    "calq_job_seconds": "Seconds a finished job spent in each phase (queued: submission to start).",
    "calq_job_rows": "Rows (race × driver) a succeeded job fitted.",
    "calq_queue_depth": "Messages waiting in each Celery queue, read from Redis at scrape time.",
    "calq_worker_busy": "1 while a worker process runs a job, 0 while it is idle.",
    "calq_worker_info": "One series per worker process: its calq version and device.",
    "calq_api_requests_total": "Requests the calibration API answered, by method, route template and status.",
    "calq_api_request_seconds": "Seconds the calibration API took to answer, by method and route template.",
}

_warned: set[str] = set()


def _safely(what: str) -> Any:
    """A decorator: the recorder logs its first error and never raises (metrics never fail a job)."""

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def safe(*args: Any, **kwargs: Any) -> None:
            try:
                fn(*args, **kwargs)
            except Exception as exc:
                if what not in _warned:
                    _warned.add(what)
                    log.warning("could not record the %s metric (%s: %s)", what, type(exc).__name__, exc)

        return safe

    return wrap


def _one_of(value: object, allowed: Sequence[str], default: str = "other") -> str:
    return value if isinstance(value, str) and value in allowed else default


# -- recorders -------------------------------------------------------------------


@_safely("job finished")
def job_finished(
    *,
    archetype: str,
    state: str,
    lane: str,
    phase_seconds: Mapping[str, float] | None = None,
    rows: int | None = None,
    runs: Iterable[str] = (),
    remedies: Iterable[str] = (),
    divergences: int = 0,
) -> None:
    """Count one job that reached a final ``state``, with what its run measured.

    ``phase_seconds`` maps phases of :data:`PHASES` to seconds (others are
    ignored, negative ones dropped); ``runs`` is one outcome of
    :data:`RUN_OUTCOMES` per sampler run; ``remedies`` one of :data:`REMEDIES`
    per remedied run.
    """
    m = _metrics()
    m["calq_jobs_finished_total"].labels(archetype, _one_of(state, STATES), lane).inc()
    for phase, seconds in (phase_seconds or {}).items():
        if phase in PHASES and seconds is not None and seconds >= 0:
            m["calq_job_seconds"].labels(archetype, phase).observe(float(seconds))
    if rows is not None and rows >= 0:
        m["calq_job_rows"].labels(archetype).observe(rows)
    for outcome in runs:
        m["calq_sampler_runs_total"].labels(archetype, _one_of(outcome, RUN_OUTCOMES)).inc()
    # Every remedy and the divergences get a series (zero at first), so a dashboard shows 0, not "no data".
    remedies = [_one_of(remedy, REMEDIES) for remedy in remedies]
    for remedy in (*REMEDIES, *(r for r in set(remedies) if r not in REMEDIES)):
        m["calq_remedies_total"].labels(archetype, remedy).inc(remedies.count(remedy))
    m["calq_divergences_total"].labels(archetype).inc(max(0, divergences))


@_safely("dead letter")
def dead_lettered() -> None:
    """One job failed for having lost its worker ``max_deliveries`` times."""
    _metrics()["calq_dead_letters_total"].inc()


@_safely("invalid message")
def invalid_message() -> None:
    """One message dropped because it was not a valid job."""
    _metrics()["calq_invalid_messages_total"].inc()


@_safely("lease reaped")
def lease_reaped(done: str) -> None:
    """The reaper handed back a job whose lease lapsed; ``done`` is what :func:`~shared.jobs.lease.hand_back` did."""
    _metrics()["calq_leases_reaped_total"].inc()
    handed_back("lease_lapsed", done=done)


@_safely("hand-back")
def handed_back(cause: str, *, done: str = "requeued") -> None:
    """A job was handed back: its worker died (``worker_lost``) or stopped (``stopped``).

    ``done`` is what :func:`~shared.jobs.lease.hand_back` did; only a job put back on the queue counts.
    """
    if done == "requeued":
        _metrics()["calq_handbacks_total"].labels(_one_of(cause, HANDBACK_CAUSES)).inc()


@_safely("store write retry")
def store_write_retried() -> None:
    """A write of finished results met a transient fault and is tried again."""
    _metrics()["calq_store_write_retries_total"].inc()


@_safely("worker state")
def worker_state(worker: str, *, busy: bool, version: str | None = None, device: str | None = None) -> None:
    """This process is ``worker``: busy or idle; with ``version`` and ``device``, its info series too."""
    m = _metrics()
    m["calq_worker_busy"].labels(worker).set(1 if busy else 0)
    if version is not None and device is not None:
        m["calq_worker_info"].labels(worker, version, device).set(1)


@_safely("API request")
def api_request(*, method: str, route: str, status: int, seconds: float) -> None:
    """One answered API request: ``route`` is the matched route's template (bounded), never the raw path."""
    m = _metrics()
    method = _one_of(method, HTTP_METHODS)
    m["calq_api_requests_total"].labels(method, route, str(int(status))).inc()
    m["calq_api_request_seconds"].labels(method, route).observe(max(0.0, seconds))


# -- queue depth -----------------------------------------------------------------


def priority_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps one queue in: the name itself, then one per priority step (``name\\x06\\x163`` …)."""
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS]


def queue_depths(redis_client: Any, queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting in each queue: LLEN of its lists, summed (one round trip). Raises what Redis raises."""
    pipe = redis_client.pipeline(transaction=False)
    for queue in queues:
        for name in priority_lists(queue):
            pipe.llen(name)
    sizes = iter(pipe.execute())
    steps = len(priority_lists(queues[0])) if queues else 0
    return {queue: sum(int(next(sizes)) for _ in range(steps)) for queue in queues}


class QueueDepthCollector:
    """``calq_queue_depth{queue}``, read from Redis at each scrape; no sample when Redis does not answer."""

    def __init__(self, redis_client: Any, queues: Sequence[str]) -> None:
        self._redis, self._queues = redis_client, tuple(queues)
        self._warned = False

    def describe(self) -> list[Any]:
        return []  # no describe at registration: that would read Redis

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("calq_queue_depth", _HELP["calq_queue_depth"], labels=["queue"])
        try:
            depths = queue_depths(self._redis, self._queues)
        except Exception as exc:  # Redis out: the series goes missing (an alert sees that), the scrape works
            if not self._warned:
                log.warning("queue depth unavailable (%s: %s)", type(exc).__name__, exc)
                self._warned = True
            return
        self._warned = False
        for queue, depth in depths.items():
            family.add_metric([queue], depth)
        yield family


# -- the endpoint ----------------------------------------------------------------


def prepare_multiprocess(folder: Path) -> Path:
    """Make ``folder`` the empty multiprocess folder of this process and its children (call before any metric).

    Files left by an earlier supervisor are removed: their processes are gone.
    """
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


def mark_process_dead(pid: int) -> None:
    """A child exited: its live gauges leave the aggregate (its counters stay)."""
    if not os.environ.get(MULTIPROC_ENV):
        return
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
    except Exception as exc:
        log.warning("could not mark process %d dead in the metrics (%s: %s)", pid, type(exc).__name__, exc)


class _ThisProcess:
    """This process's default registry, as one collector (without a multiprocess folder)."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client import REGISTRY

        yield from REGISTRY.collect()


def registry(redis_client: Any | None, queues: Sequence[str]) -> Any:
    """A collector registry of everything the supervisor serves: its children's metrics and the queue depths."""
    from prometheus_client import CollectorRegistry, multiprocess

    collected = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(collected)
    else:  # one process (tests, embedded): this process's own metrics
        _metrics()
        collected.register(_ThisProcess())
    if redis_client is not None:
        collected.register(QueueDepthCollector(redis_client, queues))
    return collected


def serve(port: int, *, host: str = "127.0.0.1", redis_client: Any | None, queues: Sequence[str]) -> Any:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the server (``shutdown()`` stops it)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry(redis_client, queues))
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server


__all__ = [
    "EXPORTED", "METRICS", "PHASES", "QueueDepthCollector", "api_request", "dead_lettered", "handed_back", "invalid_message",
    "job_finished", "lease_reaped", "mark_process_dead", "prepare_multiprocess", "priority_lists",
    "queue_depths", "registry", "serve", "store_write_retried", "worker_state",
]

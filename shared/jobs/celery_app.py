"""The Celery app and all of its configuration, in one module (producers send with it, workers consume).

Nothing here imports JAX: the app is built in processes that may fork. Celery
and kombu are imported only when an app is built, so the queue names serve
processes that never send (the supervisor).
:func:`make_app` builds an app from explicit :class:`~shared.contract.settings.Settings`
(tests use it); the module attribute ``app`` is built from the process's
settings on first use, so importing this module without ``CALQ_BROKER_URL``
only fails, with a clear message, when something actually needs the app.

Why each setting (see FIELD-NOTES, "Celery on Redis"):

- JSON only, both ways: a job is a small JSON message; pickle is refused.
- ``task_acks_late``: a message is acknowledged only when its job ended
  here, so a lost worker never loses it. ``task_reject_on_worker_lost`` is
  kept for pools that honour it, but calq's solo pool does not (FIELD-NOTES):
  a killed worker's job is brought back by its *lease*
  (:mod:`shared.jobs.lease`) — its supervisor hands it back at once, or the
  reaper when the lease lapses — and the handler counts deliveries and
  dead-letters a job that keeps killing workers.
- ``worker_prefetch_multiplier=1``: a worker reserves one job at a time, so a
  long job never sits prefetched behind another one past the visibility timeout.
- ``visibility_timeout`` in the broker's and the result backend's transport
  options and at the top level: only the last line of defence now (leases
  re-queue in seconds). Redis redelivers an unacknowledged message after it,
  so it must outlast queue wait plus run time, and the three places must
  agree (celery/celery#5935); such a late redelivery finds its job done or
  leased elsewhere and is dropped.
- Socket timeouts, TCP keepalive and a health check on the broker's and
  the backend's connections (:meth:`RecoverySettings.redis_options`, the
  numbers every calq Redis client uses): a half-open connection (a hung NAT
  or load balancer) fails in seconds and is reconnected, instead of hanging
  the worker for good; the broker's and the backend's commands are retried on
  a new connection after a timeout, so a message BRPOP popped is not lost with
  the dead one, nor its task failed by a dead result-backend connection.
- ``worker_cancel_long_running_tasks_on_connection_loss``: a broker blip must
  not leave a job running here while Redis hands it to another worker.
- Lanes: each queue has a batch twin (``calq.cpu`` → ``calq.cpu.batch``);
  a worker consumes its interactive queues first, then their batch twins
  (:func:`consumed_queues`), and ``queue_order_strategy='priority'`` makes
  kombu's BRPOP list the queues in that order every time, so Redis hands out
  a batch job only when every interactive queue is empty (kombu's default
  ``round_robin`` rotates the last-used queue to the back instead).
- Time limits: the solo pool ignores them (celery/celery#8395), so the job
  runner enforces the job's own limit between sampling chunks; these only
  matter under a pool that honours them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

# The queue names and their one rule are the contract's (the settings read them too); re-exported here.
from shared.contract.queues import CPU_QUEUE as CPU_QUEUE
from shared.contract.queues import GPU_QUEUE as GPU_QUEUE
from shared.contract.queues import QUEUES as QUEUES
from shared.contract.queues import queue_for as queue_for
from shared.contract.settings import Settings, get_settings

if TYPE_CHECKING:
    from celery import Celery

TASK_NAME = "calq.calibrate"
#: A batch of job messages in one delivery (worker.batch, shared.jobs.batch).
BATCH_TASK_NAME = "calq.calibrate_batch"
INTERACTIVE = "interactive"
BATCH = "batch"
#: A job's lane: interactive jobs (the default) always go before batch ones (backfills, evaluations).
LANES = (INTERACTIVE, BATCH)
#: Every queue a job may wait in: the interactive queues, then their batch twins.
ALL_QUEUES = QUEUES + tuple(f"{q}.{BATCH}" for q in QUEUES)
RESULT_EXPIRES_S = 7 * 24 * 3600
SOFT_LIMIT_MARGIN_S = 60
# A worker_process_init handler gets this long before a prefork child is killed;
# the handler warms JAX, which takes longer than Celery's default 4 s.
PROCESS_INIT_TIMEOUT_S = 120.0

def lane_queue(queue: str, lane: str = INTERACTIVE) -> str:
    """The queue a job of ``lane`` waits in: ``queue`` itself, or its batch twin ``queue.batch``."""
    if lane not in LANES:
        raise ValueError(f"unknown lane {lane!r}: use one of {', '.join(LANES)}")
    name = queue_for(queue)
    return name if lane == INTERACTIVE else f"{name}.{BATCH}"


def consumed_queues(queues: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """What a worker serving ``queues`` consumes, in the order it drains them: interactive first, then batch."""
    names = [queue_for(q) for q in queues]
    return tuple(names) + tuple(lane_queue(q, BATCH) for q in names)


def soft_time_limit(hard_s: int) -> int:
    """Soft limit for a hard one: ``hard - margin``, margin = min(60 s, 10 % of hard), at least 1 s."""
    margin = min(SOFT_LIMIT_MARGIN_S, max(1, hard_s // 10))
    return max(1, hard_s - margin)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration calq runs with, derived from ``settings``.

    Raises ``ValueError`` when no broker is configured (embedded mode).
    """
    from kombu import Exchange, Queue

    visibility = {"visibility_timeout": settings.visibility_timeout_s}
    # Dead connections noticed in seconds, as on every Redis client calq opens (settings.redis_client).
    connection = settings.recovery.redis_options()
    exchange = Exchange("calq", type="direct")
    hard = settings.job_time_limit_s
    default_queue = queue_for(settings.default_queue)
    return {
        "broker_url": settings.broker(),
        "result_backend": settings.backend(),
        # Messages are JSON only; pickle is refused on both sides.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # At-least-once delivery; the handler makes repeats harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # retry_on_timeout: a command on a pooled connection that went dead (the unacked record written
        # right after BRPOP popped a message) is sent again on a new connection. Without it the consumer
        # restarts and the popped message is lost: a job left queued for good (tests/test_faults.py, half-open).
        "broker_transport_options": {**visibility, **connection, "retry_on_timeout": True,
                                     "queue_order_strategy": "priority"},
        "result_backend_transport_options": dict(visibility),  # the backend takes the redis_* keys below
        "redis_socket_timeout": connection["socket_timeout"],
        "redis_socket_connect_timeout": connection["socket_connect_timeout"],
        "redis_socket_keepalive": True,
        "redis_backend_health_check_interval": connection["health_check_interval"],
        "redis_retry_on_timeout": True,  # the backend's too: a task's first result write met a dead pooled connection
        "visibility_timeout": settings.visibility_timeout_s,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        # Limits (ignored by the solo pool; the runner enforces the job's own).
        "task_time_limit": hard,
        "task_soft_time_limit": soft_time_limit(hard),
        "worker_proc_alive_timeout": PROCESS_INIT_TIMEOUT_S,
        # Queues: GPU workers consume both, CPU workers only calq.cpu; unrouted jobs go to
        # settings.default_queue (calq.cpu unless set).
        "task_queues": tuple(Queue(name, exchange, routing_key=name) for name in ALL_QUEUES),
        "task_default_queue": default_queue,
        "task_default_exchange": exchange.name,
        "task_default_exchange_type": exchange.type,
        "task_default_routing_key": default_queue,
        # Results are small JSON summaries; calq's registry is the durable record.
        "result_expires": RESULT_EXPIRES_S,
        "task_track_started": True,
        # Events for Flower.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # Logging is configured by worker.tasks (job id on every line), not by Celery.
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }


def make_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings`` (the worker's tasks are added by worker.tasks)."""
    from celery import Celery

    app = Celery("calq", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


@functools.lru_cache(maxsize=1)
def get_app() -> Celery:
    """The process's Celery app, built from :func:`~shared.contract.settings.get_settings` on first use."""
    settings = get_settings()
    if settings.embedded:
        raise RuntimeError(
            "the Celery app needs a broker: set CALQ_BROKER_URL (e.g. redis://localhost:6379/0); "
            "without one, calq runs jobs in-process and never needs the Celery app"
        )
    return make_app(settings)


def __getattr__(name: str) -> Any:
    # ``shared.jobs.celery_app.app`` is built lazily: importing this module never needs a broker.
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""shared.jobs.celery_app: the Celery configuration calq runs with, and the queue names (no broker reached)."""

from __future__ import annotations

from typing import Any

import pytest

from shared.contract.settings import Settings
from shared.jobs import celery_app as app_module
from tests.services import free_port

#: A broker address nothing listens on: building the app connects to nothing, and if it ever did, it fails here.
NOBODY = f"redis://127.0.0.1:{free_port()}/15"


def broker_settings(**over: Any) -> Settings:
    return Settings(broker_url=NOBODY, **over)


def test_app_config_is_safe_for_long_jobs_on_redis():
    settings = broker_settings(visibility_timeout_s=7200, job_time_limit_s=1800)
    conf = app_module.make_app(settings).conf

    assert conf.accept_content == ["json"]
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 7200
    assert conf.result_backend_transport_options["visibility_timeout"] == 7200
    assert conf.visibility_timeout == 7200
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True
    assert conf.task_time_limit == 1800
    assert 0 < conf.task_soft_time_limit < conf.task_time_limit
    assert [q.name for q in conf.task_queues] == list(app_module.ALL_QUEUES)
    assert conf.broker_transport_options["queue_order_strategy"] == "priority"  # interactive before batch
    assert conf.task_default_queue == "calq.cpu"
    assert conf.result_expires == 7 * 24 * 3600
    assert conf.task_track_started is True
    assert conf.worker_hijack_root_logger is False
    assert conf.broker_url == NOBODY
    assert conf.result_backend == NOBODY


def test_app_uses_separate_result_backend_and_default_queue():
    conf = app_module.make_app(broker_settings(result_backend="redis://cache:6379/2", default_queue="calq.gpu")).conf
    assert conf.result_backend == "redis://cache:6379/2"
    assert conf.task_default_queue == "calq.gpu"


@pytest.mark.parametrize(
    ("name", "queue"),
    [("gpu", "calq.gpu"), ("cpu", "calq.cpu"), ("calq.gpu", "calq.gpu"), (" CPU ", "calq.cpu")],
)
def test_queue_for(name, queue):
    assert app_module.queue_for(name) == queue


@pytest.mark.parametrize("name", ["tpu", "", "calq.tpu"])
def test_queue_for_rejects_unknown(name):
    with pytest.raises(ValueError, match="unknown queue"):
        app_module.queue_for(name)


@pytest.mark.parametrize(("name", "queue"), [("gpu", "calq.gpu"), (" CPU ", "calq.cpu"), ("calq.gpu", "calq.gpu")])
def test_the_default_queue_setting_reads_names_as_queue_for_does(name, queue, monkeypatch):
    assert Settings(default_queue=name).default_queue == queue
    monkeypatch.setenv("CALQ_DEFAULT_QUEUE", name)
    assert Settings().default_queue == queue
    assert app_module.make_app(broker_settings()).conf.task_default_queue == queue


@pytest.mark.parametrize("name", ["tpu", "", "calq.tpu"])
def test_the_default_queue_setting_rejects_what_queue_for_rejects(name):
    with pytest.raises(ValueError, match="unknown queue"):
        Settings(default_queue=name)


def test_app_without_broker_fails_clearly_only_when_used(monkeypatch):
    monkeypatch.setattr(app_module, "get_settings", lambda: Settings(broker_url=None))
    app_module.get_app.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="CALQ_BROKER_URL"):
            app_module.app  # noqa: B018
    finally:
        app_module.get_app.cache_clear()

"""worker.tasks: the task shell over the handler (Celery eager, fakeredis), and its import without broker or JAX."""
# The fixtures imported from tests/test_handle.py are parameters here:
# ruff: noqa: F811

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.contract.errors import RetryableError, StorageUnavailable
from shared.contract.job import JobState
from shared.jobs import celery_app as app_module
from shared.jobs.services import Services
from tests.test_celery_app import broker_settings
from tests.test_handle import install, job, registry, store  # noqa: F401 (the handler's fakes and fixtures)

ROOT = Path(__file__).resolve().parents[1]


def test_worker_modules_import_without_broker_or_jax(tmp_path):
    # A process that forks (prefork, the supervisor) must not have initialised JAX.
    code = (
        "import sys, shared.jobs.celery_app, worker.tasks, shared.jobs.handle, worker.supervisor; "
        "assert 'jax' not in sys.modules, 'jax imported'; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALQ_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"




@pytest.fixture
def task_env(monkeypatch, registry, store, settings):
    from worker import tasks

    app = app_module.make_app(broker_settings())
    app.conf.task_always_eager = True
    task = tasks.register(app)
    ctx = Services(settings=settings, store=store, registry=registry)
    monkeypatch.setattr(tasks, "context", lambda: ctx)
    return task


def test_task_options(task_env):
    task = task_env
    assert task.name == app_module.TASK_NAME == "calq.calibrate"
    assert task.max_retries == 5
    assert task.acks_late is True and task.reject_on_worker_lost is True
    assert task.autoretry_for == (RetryableError,)
    assert task.retry_backoff is True and task.retry_backoff_max == 600 and task.retry_jitter is True


def test_task_runs_the_handler(monkeypatch, task_env, job, registry):
    install(monkeypatch)
    result = task_env.apply(args=[job.to_message()]).get()
    assert result["job_id"] == job.job_id
    assert registry.get(job.job_id).state is JobState.SUCCEEDED


def test_task_exhausting_retries_fails_the_job(monkeypatch, task_env, job, registry):
    fake = install(monkeypatch, raises=StorageUnavailable("s3 down"))
    outcome = task_env.apply(args=[job.to_message()])
    assert outcome.failed()
    assert len(fake.calls) == 1 + task_env.max_retries
    record = registry.get(job.job_id)
    assert record.state is JobState.FAILED
    assert record.reason == "gave up after 5 retries: StorageUnavailable: s3 down"

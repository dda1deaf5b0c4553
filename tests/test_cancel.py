"""Cancellation for real: a `calq worker` process on redis-server and moto's S3, and embedded `calq` processes.

- Fleet: a running job, cancelled mid-sampling, ends ``cancelled`` within
  seconds and writes nothing; the worker then runs the next job; a queued job
  that was cancelled never starts, and runs when submitted again.
- Embedded: ``calq cancel`` / ``calq jobs`` on the store's records, and Ctrl-C
  (SIGINT) to ``calq calibrate`` mid-sampling: exit code 4, no traceback, no
  posterior or summary in the store, the record ``cancelled``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.client import CalibrationClient, JobDidNotSucceed
from producer.exit_codes import ExitCode
from shared.contract.job import JobState, JobStatus
from shared.contract.settings import S3Settings, Settings
from shared.data.dataset import save_dataset
from shared.jobs.registry import StoreRegistry
from shared.storage.store import Store
from tests.services import calq_worker, until

ROOT = Path(__file__).resolve().parents[1]
TINY = {"warmup": 30, "samples": 30, "chains": 1}
#: Long enough to be still sampling when the cancel comes (it is never run to its end); within the worker's
#: default cap on draws per chain.
LONG = {"warmup": 10_000, "samples": 10_000, "chains": 1}
EVENTS = "top_5"
CONVERGENCE = {"CALQ_CONVERGENCE__MIN_ESS_BULK": "5", "CALQ_CONVERGENCE__MAX_RHAT": "1.5",
               "CALQ_CONVERGENCE__MAX_DIVERGENCES": "50"}


def calq(environ: dict[str, str], cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=environ, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def sampling(status: JobStatus | None) -> bool:
    if status is not None and status.state.finished:
        raise AssertionError(f"job {status.job_id} ended {status.state.value} before it was cancelled: {status.reason}")
    return (status is not None and status.state is JobState.RUNNING and status.progress is not None
            and status.progress.phase in ("warmup", "sampling"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from shared.data.synth import synthesize

    path = tmp_path_factory.mktemp("cancel-data") / "season.nc"
    save_dataset(synthesize(seasons=1, scenarios=100, seed=11), path)
    return path


# -- embedded ----------------------------------------------------------------------


@pytest.fixture
def embedded(tmp_path) -> tuple[dict[str, str], Path, Settings]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CALQ_")}
    environ.update(CALQ_STORAGE_URL=str(tmp_path / "store"), CALQ_COMPILE_CACHE_DIR=str(tmp_path / "jax-cache"),
                   PYTHONPATH=str(ROOT), **CONVERGENCE)
    return environ, tmp_path, Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None)


def test_cancel_and_jobs_on_embedded_records(embedded, dataset):
    environ, cwd, settings = embedded
    client = CalibrationClient(settings)
    job = client.make_job(dataset, "intermediate", events=EVENTS, **TINY)
    client.registry.claim(job)  # queued, as if its process had not started it yet

    listed = json.loads(calq(environ, cwd, "jobs", "--json").stdout)
    assert [(r["job_id"], r["state"]) for r in listed] == [(job.job_id, "queued")]

    first = calq(environ, cwd, "cancel", job.job_id, "--reason", "wrong [red]window[/red]", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"job_id": job.job_id, "state": "cancelled"}
    record = client.status(job.job_id)
    assert record.state is JobState.CANCELLED and record.finished_at is not None
    assert record.reason == "cancelled: wrong [red]window[/red]"

    again = calq(environ, cwd, "cancel", job.job_id)
    assert again.returncode == 0 and "already cancelled: nothing changed" in again.stderr
    assert client.status(job.job_id) == record

    assert calq(environ, cwd, "wait", job.job_id, "--timeout", "5").returncode == ExitCode.CANCELLED
    assert calq(environ, cwd, "result", job.job_id).returncode == ExitCode.CANCELLED
    status = calq(environ, cwd, "status", job.job_id)  # markup in the reason is shown, not interpreted
    assert status.returncode == 0 and "[red]window[/red]" in status.stdout
    assert [r["job_id"] for r in json.loads(calq(environ, cwd, "jobs", "--state", "cancelled", "--json").stdout)] == [
        job.job_id
    ]
    assert json.loads(calq(environ, cwd, "jobs", "--state", "running", "--json").stdout) == []

    unknown = calq(environ, cwd, "cancel", "cj-000000000000000000000000")
    assert unknown.returncode == ExitCode.FAILED and "not found" in unknown.stderr
    assert calq(environ, cwd, "jobs", "--state", "paused").returncode == ExitCode.USAGE


def test_ctrl_c_cancels_an_embedded_calibrate_cleanly(embedded, dataset):
    environ, cwd, settings = embedded
    registry = StoreRegistry(Store(settings.storage_url))
    args = ["calibrate", str(dataset), "--archetype", "intermediate", "--events", EVENTS,
            *(f"--{k}={v}" for k, v in LONG.items())]
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", *args], env=environ, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        running = until(lambda: next((r for r in registry.jobs() if sampling(r)), None), timeout=180,
                        what="the embedded job sampling")
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        stopped_s = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == ExitCode.CANCELLED, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stopped_s < 30
    record = registry.get(running.job_id)
    assert record.state is JobState.CANCELLED and "interrupted (Ctrl-C)" in record.reason
    assert record.finished_at is not None
    store = Path(cwd / "store")
    assert not (store / "posteriors").exists() or not any((store / "posteriors").rglob("*"))
    stray = [p for p in store.rglob("*") if p.is_file() and not p.name.endswith((".json", ".nc"))]
    assert stray == []  # no temporary or half-written file


# -- the fleet ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(redis_server, s3_server, tmp_path_factory):
    """A `calq worker --gpus none` (one CPU worker process) on redis-server and a moto S3 bucket."""
    from tests.services import S3_KEY, S3_REGION, S3_SECRET, s3_client

    bucket = "calq-cancel"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    root = tmp_path_factory.mktemp("cancel-fleet")
    url = redis_server.url.rsplit("/", 1)[0] + "/3"  # a database of its own: other fleet tests keep theirs
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CALQ_")}
    environ.update(
        CALQ_BROKER_URL=url, CALQ_STORAGE_URL=f"s3://{bucket}/calq", CALQ_S3__ENDPOINT_URL=s3_server,
        CALQ_S3__ACCESS_KEY_ID=S3_KEY, CALQ_S3__SECRET_ACCESS_KEY=S3_SECRET, CALQ_S3__REGION=S3_REGION,
        CALQ_COMPILE_CACHE_DIR=str(root / "jax-cache"), PYTHONPATH=str(ROOT), **CONVERGENCE,
    )
    settings = Settings(
        broker_url=url, storage_url=f"s3://{bucket}/calq", compile_cache_dir=None,
        s3=S3Settings(endpoint_url=s3_server, access_key_id=S3_KEY, secret_access_key=S3_SECRET, region=S3_REGION),
    )
    with calq_worker(environ, root):
        yield environ, root, CalibrationClient(settings)


@pytest.mark.integration
def test_cancel_on_a_real_worker_running_and_queued(fleet, dataset):
    environ, root, client = fleet
    running_id = client.submit(dataset, "intermediate", events=EVENTS, **LONG)
    next_id = client.submit(dataset, "road_course", events=EVENTS, **TINY)
    queued_id = client.submit(dataset, "superspeedway", events=EVENTS, **TINY)

    until(lambda: sampling(client.status(running_id)), timeout=240, what="the long job sampling")
    # queued behind it: cancelled at once, and never starts
    record, changed = client.cancel(queued_id, "not needed")
    assert changed and record.state is JobState.CANCELLED and record.finished_at is not None

    asked = time.monotonic()
    flagged = json.loads(calq(environ, root, "cancel", running_id, "--reason", "superseded", "--json").stdout)
    assert flagged == {"job_id": running_id, "state": "running"}  # flagged; its worker stops at the next check
    with pytest.raises(JobDidNotSucceed) as ended:
        client.wait(running_id, timeout=60)
    stopped_s = time.monotonic() - asked
    final = ended.value.status
    assert final.state is JobState.CANCELLED and "superseded" in final.reason and final.finished_at is not None
    assert stopped_s < 15, f"took {stopped_s:.1f} s to stop"
    assert final.started_at is not None and final.progress is None  # it had started; a finished record keeps no progress
    assert not any(running_id in uri for uri in client.store.list("posteriors"))  # nothing written
    assert calq(environ, root, "wait", running_id, "--timeout", "5").returncode == ExitCode.CANCELLED

    # the worker goes on with the next job; the cancelled queued one is dropped when its message comes
    assert client.wait(next_id, timeout=240).archetype == "road_course"
    time.sleep(2)
    dropped = client.status(queued_id)
    assert dropped.state is JobState.CANCELLED and dropped.started_at is None and dropped.worker is None
    assert client.registry.latest("intermediate", "top_5") is None  # the cancelled job moved no pointer

    # a cancelled job can be submitted again, and runs
    assert client.submit(dataset, "superspeedway", events=EVENTS, **TINY) == queued_id
    assert client.wait(queued_id, timeout=240).job_id == queued_id
    listed = json.loads(calq(environ, root, "jobs", "--json", "--limit", "10").stdout)
    states = {r["job_id"]: r["state"] for r in listed}
    assert states == {running_id: "cancelled", next_id: "succeeded", queued_id: "succeeded"}
    assert listed[0]["job_id"] == queued_id  # newest first


@pytest.mark.integration
def test_malformed_messages_on_a_real_worker_change_no_record(fleet, dataset):
    """Issue 8: a malformed message carrying a succeeded job's id turned it rejected, for good."""
    from shared.jobs.celery_app import TASK_NAME, make_app

    _, _, client = fleet
    job = client.make_job(dataset, "short_track", events=EVENTS, **TINY)
    client.submit_job(job)
    client.wait(job.job_id, timeout=240)
    done = client.status(job.job_id)
    before = client.registry.invalid_count()

    app = make_app(client.settings)
    for poison in ({"archetype": "oval"}, {"archetype": "intermediate"}, {"sampler": {"warmup": 0}}):
        app.send_task(TASK_NAME, args=[{**job.to_message(), **poison}], queue="calq.cpu")
    until(lambda: client.registry.invalid_count() >= before + 3, timeout=60, what="three refused messages counted")
    assert client.status(job.job_id) == done
    reasons = [m["reason"] for m in client.registry.invalid_messages(limit=3)]
    assert all(m["job_id"] == job.job_id for m in client.registry.invalid_messages(limit=3))
    assert any("does not match" in r for r in reasons) and any("sampler.warmup" in r for r in reasons)
    # resubmitting is still one job, and still succeeded
    assert client.submit_job(job) == job.job_id and client.status(job.job_id) == done

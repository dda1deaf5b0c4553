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
import signal
import subprocess
import time
from pathlib import Path

import pytest

from producer.client import CalibrationClient, JobDidNotSucceed
from producer.exit_codes import ExitCode
from shared.contract.job import JobState, JobStatus
from shared.contract.settings import Settings
from shared.jobs.registry import StoreRegistry
from shared.storage.store import Store
from tests.services import calq_environ, calq_worker, convergence_environ, new_s3_store, run_calq, season_file, start_calq, until

ROOT = Path(__file__).resolve().parents[1]
TINY = {"warmup": 30, "samples": 30, "chains": 1}
#: Long enough to be still sampling when the cancel comes (it is never run to its end); within the worker's
#: default cap on draws per chain.
LONG = {"warmup": 10_000, "samples": 10_000, "chains": 1}
EVENTS = "top_5"
CONVERGENCE = convergence_environ({"min_ess_bulk": 5, "max_rhat": 1.5, "max_divergences": 50})


def calq(environ: dict[str, str], cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_calq(environ, cwd, *args, check=False, timeout=timeout)


def sampling(status: JobStatus | None) -> bool:
    if status is not None and status.state.finished:
        raise AssertionError(f"job {status.job_id} ended {status.state.value} before it was cancelled: {status.reason}")
    return (status is not None and status.state is JobState.RUNNING and status.progress is not None
            and status.progress.phase in ("warmup", "sampling"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return season_file(tmp_path_factory.mktemp("cancel-data"), scenarios=100, seed=11)


# -- embedded ----------------------------------------------------------------------


@pytest.fixture
def embedded(tmp_path) -> tuple[dict[str, str], Path, Settings]:
    environ = calq_environ(CALQ_STORAGE_URL=str(tmp_path / "store"), **CONVERGENCE)
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
    proc = start_calq(environ, cwd, *args, text=True)
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
    bucket = "calq-cancel"
    root = tmp_path_factory.mktemp("cancel-fleet")
    url = redis_server.url.rsplit("/", 1)[0] + "/3"  # a database of its own: other fleet tests keep theirs
    store, settings = new_s3_store(s3_server, bucket, broker_url=url)
    environ = calq_environ(CALQ_BROKER_URL=url, **store, **CONVERGENCE)
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

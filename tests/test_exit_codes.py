"""Exit codes: one table (producer/exit_codes.py) that the README shows, and `calq wait` against a real Redis that goes away.

The outage tests run their own redis-server (AOF on, so records survive a
restart on the same port) and the real `calq wait` process.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.exit_codes import ExitCode, for_error, for_state, worst
from shared.contract.errors import BrokerUnavailable, StorageUnavailable
from shared.contract.job import JobState
from shared.jobs.registry import RedisRegistry, WaitTimeout
from shared.storage.store import Store
from tests.services import free_port
from tests.test_catalog import make_summary
from tests.test_registry import make_job

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_shows_the_table_in_the_module():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d) \| (.+?) \|$", readme, flags=re.MULTILINE))
    assert {int(code) for code in rows} == {code.value for code in ExitCode}
    for code, words in [(0, "succeeded"), (1, "failed or rejected"), (2, "usage"), (3, "timed out"),
                        (4, "cancelled"), (5, "could not reach the fleet")]:
        assert words in rows[str(code)]


def test_codes_by_outcome():
    assert [for_state(s) for s in JobState] == [
        ExitCode.TIMED_OUT, ExitCode.TIMED_OUT, ExitCode.OK, ExitCode.FAILED, ExitCode.FAILED, ExitCode.CANCELLED,
    ]
    assert for_error(BrokerUnavailable("down")) == for_error(StorageUnavailable("down")) == ExitCode.UNREACHABLE
    assert for_error(WaitTimeout("still running", None)) == ExitCode.TIMED_OUT
    assert for_error(KeyboardInterrupt()) == ExitCode.CANCELLED
    assert for_error(ValueError("x")) == ExitCode.FAILED
    assert worst([ExitCode.OK, ExitCode.TIMED_OUT, ExitCode.FAILED]) == ExitCode.FAILED
    assert worst([ExitCode.FAILED, ExitCode.CANCELLED]) == ExitCode.CANCELLED
    assert worst([ExitCode.CANCELLED, ExitCode.UNREACHABLE]) == ExitCode.UNREACHABLE
    assert worst([]) == ExitCode.OK


# -- calq wait against a Redis that goes away ------------------------------------------------


class OwnRedis:
    """A redis-server on a fixed port with AOF, that a test can stop and start again."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not on PATH (CI is set, so this is an error, not a skip)")
            pytest.skip("redis-server is not on PATH")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path):
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def subscribed(url: str, timeout: float = 60) -> None:
    """Return once a `calq wait` listens on the job-change channel (its process is up and waiting)."""
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while dict(client.pubsub_numsub("calq:jobs")).get(b"calq:jobs", 0) < 1:
        assert time.monotonic() < deadline, "calq wait never started waiting"
        time.sleep(0.1)
    client.close()


def wait_process(url: str, store: Path, job_id: str, timeout: float) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CALQ_")}
    environ.update(CALQ_BROKER_URL=url, CALQ_STORAGE_URL=str(store), PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "producer.cli", "wait", job_id, "--timeout", str(timeout), "--json"],
                            env=environ, cwd=store.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.integration
def test_wait_rides_through_a_redis_restart(own_redis, tmp_path):
    registry = RedisRegistry.from_url(own_redis.url)
    store = Store(str(tmp_path / "store"))
    job = make_job()
    registry.claim(job)
    registry.mark_running(job.job_id, worker="w")
    waiting = wait_process(own_redis.url, tmp_path / "store", job.job_id, timeout=90)
    try:
        subscribed(own_redis.url)  # waiting: it has read the record and listens for changes
        own_redis.stop()
        time.sleep(4)  # the fleet is unreachable for a while
        own_redis.start()
        summary = make_summary(job.job_id, store=store)
        RedisRegistry.from_url(own_redis.url).succeed(job.job_id, summary)
        stdout, stderr = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == ExitCode.OK, stderr[-2000:]
    assert job.job_id in stdout
    assert "cannot reach the fleet" in stderr and "Traceback" not in stderr


@pytest.mark.integration
def test_wait_exits_5_when_the_fleet_stays_unreachable(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    started = time.monotonic()
    waiting = wait_process(url, tmp_path / "store", "cj-000000000000000000000000", timeout=3)
    _, stderr = waiting.communicate(timeout=60)
    assert waiting.returncode == ExitCode.UNREACHABLE, stderr[-2000:]
    assert time.monotonic() - started >= 3  # it tried for its whole timeout
    assert "Traceback" not in stderr and "cannot reach the fleet" in stderr


@pytest.mark.integration
def test_wait_exits_3_when_the_job_is_still_running(own_redis, tmp_path):
    registry = RedisRegistry.from_url(own_redis.url)
    job = make_job()
    registry.claim(job)
    registry.mark_running(job.job_id, worker="w")
    waiting = wait_process(own_redis.url, tmp_path / "store", job.job_id, timeout=1)
    _, stderr = waiting.communicate(timeout=60)
    assert waiting.returncode == ExitCode.TIMED_OUT, stderr[-2000:]
    assert "still running" in stderr


def test_a_usage_error_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "producer.cli", "wait"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == ExitCode.USAGE


@pytest.mark.integration
def test_sigint_while_waiting_exits_4_without_a_traceback(own_redis, tmp_path):
    registry = RedisRegistry.from_url(own_redis.url)
    job = make_job()
    registry.claim(job)
    waiting = wait_process(own_redis.url, tmp_path / "store", job.job_id, timeout=60)
    subscribed(own_redis.url)
    waiting.send_signal(signal.SIGINT)
    _, stderr = waiting.communicate(timeout=30)
    assert waiting.returncode == ExitCode.CANCELLED and "Traceback" not in stderr
    assert registry.get(job.job_id).state is JobState.QUEUED  # waiting stopped; the fleet's job did not


def test_the_worker_table_is_its_enum_and_each_code_means_one_thing():
    import worker.exit_codes as module
    from worker.exit_codes import MEANING, WorkerExit

    rows = re.findall(r"^(\d+)\s+``(\w+)``", module.__doc__, flags=re.MULTILINE)
    assert {int(code): name for code, name in rows} == {code.value: code.name for code in WorkerExit}
    assert set(MEANING) <= set(WorkerExit) and WorkerExit.DEVICE_UNAVAILABLE != WorkerExit.CREDENTIALS
    assert "78" in (ROOT / "README.md").read_text() and "exits 69" in (ROOT / "README.md").read_text()

"""Fixtures that start real services for integration tests (a pytest plugin).

- ``redis_server`` (session): a real ``redis-server`` on a free local port,
  with persistence off; ``redis_url`` (function) flushes it and gives its URL.
- ``s3_server`` (session): moto's S3-compatible HTTP server on a free local
  port; ``s3_bucket`` (function) creates a fresh bucket on it; ``s3_settings``
  (function) is a :class:`~shared.contract.settings.Settings` whose store is that bucket.

A missing service binary or package skips the test on a laptop and fails it
in CI (when ``CI`` is set), so CI can never go green by skipping. Nothing
here is marked: test modules that use these fixtures mark themselves
``pytest.mark.integration``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from shared.contract.settings import S3Settings, Settings

S3_KEY = "testing"
S3_SECRET = "testing"
S3_REGION = "us-east-1"
_START_TIMEOUT_S = 10.0


def _unavailable(reason: str) -> None:
    """Skip the test locally, fail it in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)", pytrace=False)
    pytest.skip(reason)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# -- Redis ---------------------------------------------------------------------


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def _start_redis(binary: str, workdir: Path) -> tuple[subprocess.Popen[bytes], RedisServer]:
    import redis

    host = "127.0.0.1"
    port = free_port(host)
    log_path = workdir / f"redis-{port}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            binary,
            "--port", str(port),
            "--bind", host,
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
            "--dir", str(workdir),
            "--daemonize", "no",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    client = redis.Redis(host=host, port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    deadline = time.monotonic() + _START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}"
                )
            try:
                if client.ping():
                    return proc, RedisServer(host, port)
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError(
                    f"redis-server did not answer PING within {_START_TIMEOUT_S:.0f} s:\n"
                    f"{log_path.read_text(errors='replace')}"
                )
            time.sleep(0.05)
    finally:
        client.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1 and a free port, persistence off.

    Yields an object with ``.host``, ``.port`` and ``.url``
    (``redis://127.0.0.1:PORT/0``); the server is terminated at session end.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("redis-server is not on PATH")
    workdir = tmp_path_factory.mktemp("redis")
    # Another process may grab the free port between probe and bind: retry.
    for attempt in range(3):
        try:
            proc, server = _start_redis(binary, workdir)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        yield server
    finally:
        _stop(proc)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of ``redis_server``, emptied (FLUSHALL) before the test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


# -- S3 (moto) -----------------------------------------------------------------


class S3Bucket(NamedTuple):
    endpoint_url: str
    bucket: str


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 and a free port; yields its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        _unavailable("moto[server] is not installed")
    # Port 0: the OS picks a free port at bind time, so there is no race.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint_url: str):
    """A boto3 S3 client for ``endpoint_url`` with the dummy test credentials."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name=S3_REGION,
    )


@pytest.fixture
def s3_bucket(s3_server: str) -> S3Bucket:
    """A new, empty bucket on ``s3_server``: ``(endpoint_url, bucket)``."""
    bucket = f"calq-test-{uuid.uuid4().hex[:16]}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    return S3Bucket(s3_server, bucket)


@pytest.fixture
def s3_settings(s3_bucket: S3Bucket) -> Settings:
    """Settings whose store is ``s3://<s3_bucket>/calq`` on the moto endpoint."""
    return Settings(
        storage_url=f"s3://{s3_bucket.bucket}/calq",
        s3=S3Settings(
            endpoint_url=s3_bucket.endpoint_url,
            access_key_id=S3_KEY,
            secret_access_key=S3_SECRET,
            region=S3_REGION,
        ),
        compile_cache_dir=None,
    )


# -- a calq worker ---------------------------------------------------------------


@contextlib.contextmanager
def calq_worker(environ: dict[str, str], cwd: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A ``calq worker --gpus none`` process (logging to ``cwd/worker.log``), stopped warm (SIGTERM) at the end."""
    log = open(cwd / "worker.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--gpus", "none", *args],
                            env=environ, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


def until(predicate: Any, *, timeout: float, what: str, every: float = 0.2) -> Any:
    """``predicate()``'s first truthy value, polled every ``every`` seconds; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")

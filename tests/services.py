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


# -- a network between a client and a server -------------------------------------


class TcpProxy:
    """A loopback TCP proxy with the faults of a network: a hung NAT, a cut link.

    ``TcpProxy(host, port)`` listens on 127.0.0.1 and a free port (``.port``,
    ``.url_for(url)``) and forwards every connection to ``host:port`` (a
    loopback address only), from one thread with bounded buffers and at most
    ``max_connections`` connections. Faults:

    - :meth:`freeze`: every open connection stays open and goes silent both
      ways (no byte, no FIN, no RST: the peers see a half-open link, as a hung
      NAT or load balancer leaves it); a connection accepted while frozen is
      silent too (``new="silent"``), refused (``"refused"``: closed at once with
      a reset), or forwarded (``"forwarded"``: the link is dead for existing
      connections only);
    - :meth:`thaw`: every connection forwards again, what its peers sent meanwhile included;
    - :meth:`cut`: every connection is closed (new ones are still accepted).

    Each fault has taken effect when its method returns. Use it as a context
    manager (or call :meth:`close`): the thread stops and every socket is closed.
    """

    _LOOPBACK = ("127.0.0.1", "localhost", "::1")
    _CHUNK = 65536
    _BUFFER = 1 << 20

    def __init__(self, host: str, port: int, *, max_connections: int = 64) -> None:
        import threading

        if host not in self._LOOPBACK:
            raise ValueError(f"TcpProxy forwards to a loopback address only, not {host!r}")
        self.target = (host, port)
        self.max_connections = max_connections
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._pipes: list[_Pipe] = []
        self._frozen = False
        self._new = "silent"
        self._cut = False
        self._silence = False  # freeze() asked: silence the connections open now
        self._stopped = False
        self._lock = threading.Lock()
        self._applied = threading.Condition(self._lock)
        self._generation = 0  # changes the loop has taken in
        self._seen = 0
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name=f"tcp-proxy-{self.port}", daemon=True)
        self._thread.start()

    def url_for(self, url: str) -> str:
        """``url`` (``redis://host:port/db``) with its address replaced by this proxy's."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    # -- faults --

    def freeze(self, *, new: str = "silent") -> None:
        """Silence every connection both ways, keeping each open; ``new`` says what a connection accepted meanwhile meets."""
        if new not in ("silent", "refused", "forwarded"):
            raise ValueError(f"new must be silent, refused or forwarded, not {new!r}")
        self._change(frozen=True, new=new, silence=True)

    def thaw(self) -> None:
        """Forward on every connection again."""
        self._change(frozen=False)

    def cut(self) -> None:
        """Close every connection (the link went down); new connections are forwarded as before."""
        self._change(cut=True)

    def close(self) -> None:
        """Stop the thread and close every socket."""
        self._change(stopped=True)
        self._thread.join(10)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _change(self, **flags: object) -> None:
        with self._lock:
            for name, value in flags.items():
                setattr(self, f"_{name}", value)
            self._generation += 1
            wanted = self._generation
            if not self._applied.wait_for(lambda: self._seen >= wanted or not self._thread.is_alive(), 10):
                raise RuntimeError("the proxy's thread did not take in the change within 10 s")

    # -- the loop --

    def _run(self) -> None:
        import select

        try:
            while True:
                with self._lock:
                    if self._stopped:
                        break
                    if self._cut:
                        for pipe in self._pipes:
                            pipe.close()
                        self._pipes.clear()
                        self._cut = False
                    if self._silence or not self._frozen:
                        for pipe in self._pipes:
                            pipe.frozen = self._silence
                        self._silence = False
                    self._seen = self._generation
                    self._applied.notify_all()
                    frozen, new = self._frozen, self._new
                readers = [self._listener]
                writers = []
                for pipe in self._pipes:
                    if pipe.frozen:
                        continue
                    readers += pipe.readable()
                    writers += pipe.writable()
                ready_r, ready_w, _ = select.select(readers, writers, [], 0.05)
                for sock in ready_r:
                    if sock is self._listener:
                        self._accept(frozen, new)
                for pipe in list(self._pipes):
                    if not pipe.frozen and not pipe.pump(ready_r, ready_w):
                        pipe.close()
                        self._pipes.remove(pipe)
        finally:
            with self._lock:
                for pipe in self._pipes:
                    pipe.close()
                self._pipes.clear()
                self._listener.close()
                self._seen = self._generation
                self._applied.notify_all()

    def _accept(self, frozen: bool, new: str) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.accepted += 1
        if (frozen and new == "refused") or len(self._pipes) >= self.max_connections:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            client.close()  # a reset, as a refused connection reads
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        self._pipes.append(_Pipe(client, upstream, frozen=frozen and new == "silent"))


class _Pipe:
    """One proxied connection: the accepted socket, its upstream, and the bytes each way not yet written."""

    def __init__(self, client: socket.socket, upstream: socket.socket, *, frozen: bool) -> None:
        for sock in (client, upstream):
            sock.setblocking(False)
        self.peer = {client: upstream, upstream: client}
        self.pending: dict[socket.socket, bytearray] = {client: bytearray(), upstream: bytearray()}
        self.frozen = frozen

    def readable(self) -> list[socket.socket]:
        """Sockets to read from: those whose peer's buffer has room."""
        return [s for s, peer in self.peer.items() if len(self.pending[peer]) < TcpProxy._BUFFER]

    def writable(self) -> list[socket.socket]:
        return [s for s, data in self.pending.items() if data]

    def pump(self, ready_r: list, ready_w: list) -> bool:
        """Move bytes one step; False once either side has closed or failed."""
        try:
            for sock, peer in self.peer.items():
                if sock in ready_r:
                    data = sock.recv(TcpProxy._CHUNK)
                    if not data:
                        return False
                    self.pending[peer] += data
            for sock, data in self.pending.items():
                if sock in ready_w and data:
                    del data[:sock.send(data)]
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return True

    def close(self) -> None:
        for sock in self.peer:
            sock.close()

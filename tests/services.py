"""Fixtures that start real services for integration tests (a pytest plugin).

- ``redis_server`` (session): a real ``redis-server`` on a free local port,
  with persistence off; ``redis_url`` (function) flushes it and gives its URL.
- ``s3_server`` (session): moto's S3-compatible HTTP server on a free local
  port; ``s3_bucket`` (function) creates a fresh bucket on it; ``s3_settings``
  (function) is a :class:`~shared.contract.settings.Settings` whose store is that bucket
  (:func:`s3_store_settings`; :func:`new_s3_store` makes a named bucket and gives
  its store's settings and, :func:`s3_environ`, its ``CALQ_*`` variables).

And the one harness for the calq processes a test (or a bench/ script) starts:

- the session's JAX compile cache (:func:`share_compile_cache`, opened by
  ``tests/conftest.py``; :func:`session_compile_cache`), which every process
  started from :func:`calq_environ` compiles through;
- :func:`calq_environ`: this process's environment without ``CALQ_*``, on the
  CPU, importing this checkout, plus the variables a test names
  (:func:`convergence_environ` for lenient criteria);
- :func:`run_calq` (``calq ...`` to its end), :func:`start_calq` (in the
  background), :func:`calq_worker` (``calq worker``, stopped warm) and
  :class:`Worker` (``python -m worker``: a supervisor and its children, killed
  or stopped at will);
- :func:`start_redis` / :func:`stop_process` (a redis-server of its own, AOF or
  not, on a port of its choosing), :func:`local_fleet` (one with a ``calq
  worker`` on a local store), :func:`children_of` / :func:`alive` (processes, from
  /proc) and :func:`until` (the one wait loop);
- :func:`season_file`: a synthetic dataset on disk.

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
ROOT = Path(__file__).resolve().parents[1]
#: Convergence criteria that tiny test runs (far short of 400 effective draws) can meet.
LENIENT = {"min_ess_bulk": 10, "max_rhat": 1.2, "max_divergences": 5}


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


# -- the session's compile cache and a calq process's environment ------------------

#: JAX reads these at import: a process started with them compiles through the session's cache.
_JAX_CACHE_VARIABLES = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    # A size limit turns on JAX's file lock around each read and write of an entry (the filelock
    # package), so the test process and its workers never read an entry while another writes it.
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(16 << 30),
}


def share_compile_cache(folder: Path) -> None:
    """Compile through ``folder`` in this process and in every process started from here.

    Sets JAX's variables in ``os.environ`` (JAX reads them at import; if JAX
    is already imported, its config is updated too), so workers and CLI
    processes inherit the cache, and :func:`calq_environ` names it to calq's
    settings as well.
    """
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.update(_JAX_CACHE_VARIABLES, JAX_COMPILATION_CACHE_DIR=str(folder))
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(folder))
        for name, value in _JAX_CACHE_VARIABLES.items():
            jax.config.update(name.lower(), type(getattr(jax.config, name.lower()))(value))


def session_compile_cache() -> str | None:
    """The compile cache folder :func:`share_compile_cache` opened (None outside a test session)."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR")


def convergence_environ(criteria: dict[str, float] = LENIENT) -> dict[str, str]:
    """``CALQ_CONVERGENCE__*`` variables for ``criteria`` (``{"min_ess_bulk": 10, ...}``)."""
    return {f"CALQ_CONVERGENCE__{name.upper()}": str(value) for name, value in criteria.items()}


def calq_environ(**variables: str) -> dict[str, str]:
    """The environment of a calq process a test starts.

    This process's variables without ``CALQ_*`` (a developer's never reach a
    test), ``PYTHONPATH`` on this checkout, ``JAX_PLATFORMS=cpu``, the
    session's compile cache as ``CALQ_COMPILE_CACHE_DIR`` (when there is one),
    then ``variables`` (which may override any of these).
    """
    environ = {name: value for name, value in os.environ.items() if not name.startswith("CALQ_")}
    environ.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    if (cache := session_compile_cache()) is not None:
        environ["CALQ_COMPILE_CACHE_DIR"] = cache
    environ.update(variables)
    return environ


# -- Redis ---------------------------------------------------------------------


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def start_redis(workdir: Path, *, port: int | None = None, args: tuple[str, ...] = (),
                binary: str | None = None) -> tuple[subprocess.Popen[bytes], RedisServer]:
    """A redis-server on 127.0.0.1 (``port``, or a free one), persistence off unless ``args`` say otherwise.

    It answers PING before this returns; it logs to ``workdir/redis-PORT.log``
    (appended to, so a restart on the same port keeps the earlier lines).
    ``args`` are more options (``"--appendonly", "yes"``, ``"--requirepass", ...``).
    RuntimeError if it exits or does not answer within 10 s.
    """
    import redis

    binary = binary or shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH")
    host = "127.0.0.1"
    port = port or free_port(host)
    log_path = workdir / f"redis-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no",
             "--maxmemory-policy", "noeviction", "--dir", str(workdir), "--daemonize", "no", *args],
            stdout=log, stderr=subprocess.STDOUT,
        )
    password = args[args.index("--requirepass") + 1] if "--requirepass" in args else None
    client = redis.Redis(host=host, port=port, password=password, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        until(lambda: _answers(proc, client, log_path), timeout=_START_TIMEOUT_S, what="redis-server to answer PING",
              every=0.05)
    except AssertionError as exc:
        stop_process(proc)
        raise RuntimeError(f"{exc}:\n{log_path.read_text(errors='replace')}") from None
    finally:
        client.close()
    return proc, RedisServer(host, port)


def _answers(proc: subprocess.Popen[bytes], client: Any, log_path: Path) -> bool:
    import redis

    if proc.poll() is not None:
        raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 5) -> None:
    """SIGTERM ``proc`` and wait ``timeout`` s for it, then SIGKILL it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


_stop = stop_process  # the name tests/test_hostile_worker.py imports


@contextlib.contextmanager
def redis_running(workdir: Path, **options: Any) -> Iterator[RedisServer]:
    """:func:`start_redis` (same options) for the ``with`` block, stopped at its end."""
    proc, server = start_redis(workdir, **options)
    try:
        yield server
    finally:
        stop_process(proc)


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
            proc, server = start_redis(workdir, binary=binary)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        yield server
    finally:
        stop_process(proc)


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
    return s3_store_settings(s3_bucket.endpoint_url, s3_bucket.bucket)


def s3_store_settings(endpoint_url: str, bucket: str, **fields: Any) -> Settings:
    """Settings whose store is ``s3://bucket/calq`` on ``endpoint_url`` with the test credentials, plus ``fields``."""
    s3 = S3Settings(endpoint_url=endpoint_url, access_key_id=S3_KEY, secret_access_key=S3_SECRET, region=S3_REGION)
    return Settings(**{"storage_url": f"s3://{bucket}/calq", "s3": s3, "compile_cache_dir": None, **fields})


def new_s3_store(endpoint_url: str, bucket: str, **fields: Any) -> tuple[dict[str, str], Settings]:
    """Create ``bucket`` on ``endpoint_url``; its store's ``CALQ_*`` variables (:func:`s3_environ`) and settings (plus ``fields``)."""
    s3_client(endpoint_url).create_bucket(Bucket=bucket)
    return s3_environ(endpoint_url, bucket), s3_store_settings(endpoint_url, bucket, **fields)


def s3_environ(endpoint_url: str, bucket: str) -> dict[str, str]:
    """The ``CALQ_*`` variables of :func:`s3_store_settings`' store, for a calq process."""
    return {"CALQ_STORAGE_URL": f"s3://{bucket}/calq", "CALQ_S3__ENDPOINT_URL": endpoint_url,
            "CALQ_S3__ACCESS_KEY_ID": S3_KEY, "CALQ_S3__SECRET_ACCESS_KEY": S3_SECRET, "CALQ_S3__REGION": S3_REGION}


# -- calq processes ----------------------------------------------------------------


def run_calq(environ: dict[str, str], cwd: Path, *args: str, check: bool = True, timeout: float = 600,
             explain: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``calq *args`` run to its end (output captured as text).

    With ``check``, an exit status other than 0 is an AssertionError that
    quotes its stderr (and the tail of the log ``explain``, a worker's, if given).
    """
    result = subprocess.run([sys.executable, "-m", "producer.cli", *args], env=environ, cwd=cwd,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        log = f"\n{explain.read_text(errors='replace')[-2000:]}" if explain is not None else ""
        raise AssertionError(f"calq {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}{log}")
    return result


def start_calq(environ: dict[str, str], cwd: Path, *args: str, log: Path | None = None,
               text: bool = False) -> subprocess.Popen:
    """``calq *args`` in the background: its output to ``log`` (appended) if given, else to pipes."""
    if log is None:
        return subprocess.Popen([sys.executable, "-m", "producer.cli", *args], env=environ, cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "producer.cli", *args], env=environ, cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def calq_worker(environ: dict[str, str], cwd: Path, *args: str, log: Path | None = None,
                ) -> Iterator[subprocess.Popen[bytes]]:
    """A ``calq worker --gpus none`` process, stopped warm (SIGTERM) at the end.

    It logs to ``log`` (by default ``cwd/worker.log``), emptied first.
    """
    log = log or cwd / "worker.log"
    log.write_bytes(b"")
    proc = start_calq(environ, cwd, "worker", "--gpus", "none", *args, log=log)
    try:
        yield proc
    finally:
        stop_process(proc, timeout=60)


class LocalFleet(NamedTuple):
    """What :func:`local_fleet` started: Redis's URL, the worker's environment and settings for a client."""

    url: str
    environ: dict[str, str]
    settings: Settings


@contextlib.contextmanager
def local_fleet(workdir: Path, **variables: str) -> Iterator[LocalFleet]:
    """A redis-server of its own and one ``calq worker --gpus none`` on the store ``workdir/store``.

    The worker's environment is :func:`calq_environ` with the broker, the
    store and ``variables``; it logs to ``workdir/worker.log``. Both are
    stopped at the end of the ``with`` block (the worker warm).
    """
    with redis_running(workdir) as redis:
        store = str(workdir / "store")
        environ = calq_environ(CALQ_BROKER_URL=redis.url, CALQ_STORAGE_URL=store, **variables)
        with calq_worker(environ, workdir):
            yield LocalFleet(redis.url, environ, Settings(broker_url=redis.url, storage_url=store, compile_cache_dir=None))


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Worker:
    """``python -m worker --gpus none`` (a supervisor and its Celery children), logging to a file."""

    def __init__(self, env: dict[str, str], log: Path, *, children: int = 1) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker", "--gpus", "none", "--cpu-workers", str(children)],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )
        self.n = children

    def children(self) -> list[int]:
        return children_of(self.proc.pid)

    def child_named(self, name: str) -> int | None:
        """The pid of the child a record's ``worker`` names (``{hostname}#{pid}``, or a Celery hostname)."""
        held = name.partition("#")[2]
        if held.isdigit():
            return int(held) if int(held) in self.children() else None
        for pid in self.children():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if name.encode() in argv:
                return pid
        return None

    def wait_ready(self, timeout: float = 120) -> None:
        until(lambda: self.log.read_text(errors="replace").count(" ready.") >= self.n, timeout=timeout,
              what=f"{self.n} Celery worker(s) ready in {self.log}", every=0.25)

    def kill_all(self) -> None:
        """SIGKILL the supervisor and its children: the whole worker is gone at once."""
        kids = self.children()
        self.proc.kill()
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (a warm stop), then :meth:`kill_all` after ``timeout`` s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_all()


def until(predicate: Any, *, timeout: float, what: str, every: float = 0.2) -> Any:
    """``predicate()``'s first truthy value, polled every ``every`` seconds; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


# -- factories -------------------------------------------------------------------


def season_file(folder: Path, *, name: str = "season.nc", **synth: Any) -> Path:
    """A synthetic dataset, ``synthesize(seasons=1, **synth)`` (seasons may be overridden), saved as ``folder/name``."""
    from shared.data.dataset import save_dataset
    from shared.data.synth import synthesize

    return save_dataset(synthesize(**{"seasons": 1, **synth}), folder / name)


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

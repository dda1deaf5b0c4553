"""One Celery worker process per GPU, started, watched and stopped by one command.

:func:`plan_workers` (pure) decides the children: one per GPU, pinned with
``CUDA_VISIBLE_DEVICES`` before Python starts, each consuming ``calq.gpu``
then ``calq.cpu``; or CPU workers consuming ``calq.cpu`` when there is no
GPU. Each child is ``celery -A worker.tasks worker --pool solo`` (JAX is
not fork-safe, so no prefork pool), with the environment JAX reads at
import: ``JAX_PLATFORMS=cuda`` (a missing GPU is an error, not a silent CPU
run), no preallocation and a memory cap on GPUs; four host devices on CPUs,
so chains run in parallel.

:class:`Supervisor` runs them: a child that exits on its own is restarted
with exponential backoff (reset once it has stayed up a while), except one
that exits with :attr:`~worker.exit_codes.WorkerExit.DEVICE_UNAVAILABLE`
(wrong device: a restart cannot help). The first SIGTERM or SIGINT is forwarded to every
child as SIGTERM, Celery's warm shutdown (finish the current job, then
exit); a second one is a cold shutdown: each child gets
:data:`~worker.protocol.HAND_BACK_SIGNAL` and hands its running job back at the
next sampling chunk (Celery's own SIGQUIT would fail the job under the solo
pool), and a child still alive ``kill_after_s`` later is killed.

Each child beats (:func:`worker.protocol.beat`: a file the supervisor names,
touched by Celery's loop while idle and by the lease heartbeat while a job
runs); a child silent for ``recovery.silent_child_s`` (a loop hung on a dead
connection) gets SIGTERM, then SIGKILL ``kill_after_s`` later, and is
restarted like any child that died.

With a :class:`Fleet` (what :func:`run` builds from the settings) the
supervisor also keeps jobs moving when processes die: a child that dies
holding a job has it handed back at once (:func:`shared.jobs.lease.hand_back`;
the delivery counts, unless the supervisor itself stopped the child), and a
reaper thread hands back jobs whose lease lapsed anywhere in the fleet (a
whole worker killed). Each child knows its supervisor's pid: when the
supervisor dies, the child stops at its next chunk and hands its job back.

With a port (``CALQ_METRICS__PORT``, :func:`run` reads it) the supervisor
serves ``/metrics`` (:mod:`shared.jobs.metrics`): a fresh multiprocess folder
is made before any metric exists, every child inherits it, and a child that
exits is marked dead so its gauges leave the sums; the folder is removed at
exit. The queue depths are read from Redis at each scrape.

:func:`run` is what ``calq worker --gpus auto|none|0,1 [--queues ...]`` calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.contract.retry import backoff
from shared.fit.device import HOST_DEVICES, with_host_devices, without_host_devices
from shared.jobs import metrics
from shared.jobs.celery_app import ALL_QUEUES, CPU_QUEUE, GPU_QUEUE, consumed_queues, queue_for
from worker.exit_codes import MEANING, WorkerExit
from worker.protocol import BEAT_FILE_ENV, HAND_BACK_SIGNAL, SUPERVISOR_PID_ENV, lease_holder

if TYPE_CHECKING:
    from shared.jobs.services import Services

log = logging.getLogger(__name__)

GPU_MEM_FRACTION = "0.9"
#: JAX's names for the share of GPU memory a process may take, old and new. Only one may be set: with both,
#: JAX 0.11's CUDA plugin does not start (seen on an H200: "Backend 'cuda' is not in the list of known backends").
MEM_FRACTION_VARIABLES = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")
GPU_QUEUES = (GPU_QUEUE, CPU_QUEUE)
CPU_QUEUES = (CPU_QUEUE,)
_GPU_ID = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z/\-]+)$")


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """One child worker: its Celery node name, GPU, queues, environment overrides and command."""

    name: str
    gpu: str | None
    queues: tuple[str, ...]
    env: Mapping[str, str] = dataclasses.field(hash=False)
    argv: tuple[str, ...] = ()

    def describe(self) -> str:
        device = f"GPU {self.gpu}" if self.gpu is not None else "CPU"
        return f"{self.name}: {device}, queues {','.join(self.queues)}"


# -- planning --------------------------------------------------------------------


def parse_gpu_list(text: str) -> list[str]:
    """``"0,1"`` → ``["0", "1"]``; GPU/MIG UUIDs are accepted too. ValueError if malformed."""
    items = [item.strip() for item in text.split(",")]
    if not items or any(not item for item in items):
        raise ValueError(f"invalid GPU list {text!r}: expected auto, none, or comma-separated GPU indices like 0,1")
    for item in items:
        if not _GPU_ID.match(item):
            raise ValueError(
                f"invalid GPU {item!r} in {text!r}: expected a GPU index (0, 1, …) or a GPU-/MIG- UUID"
            )
    normalised = [str(int(item)) if item.isdigit() else item for item in items]
    duplicates = sorted({g for g in normalised if normalised.count(g) > 1})
    if duplicates:
        raise ValueError(f"GPU list {text!r} names {', '.join(duplicates)} more than once: one worker per GPU")
    return normalised


def detect_gpus(environ: Mapping[str, str] | None = None, *, timeout_s: float = 10.0) -> list[str]:
    """The GPUs this machine offers: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi``'s indices.

    No ``nvidia-smi`` binary, or one that fails (no driver), means no GPU.
    """
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        value = environ["CUDA_VISIBLE_DEVICES"].strip()
        if value in ("", "-1", "none", "NoDevFiles"):
            return []
        return parse_gpu_list(value)
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        out = subprocess.run(
            [binary, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=timeout_s, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s); assuming no GPU", exc)
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def worker_argv(name: str, queues: Sequence[str], *, loglevel: str = "INFO") -> tuple[str, ...]:
    """The command of one child: a solo-pool Celery worker (JAX is not fork-safe)."""
    return (
        sys.executable, "-m", "celery", "-A", "worker.tasks", "worker",
        "--pool", "solo", "--concurrency", "1",
        "--hostname", name, "-Q", ",".join(consumed_queues(queues)),  # interactive first, then batch
        "--loglevel", loglevel, "--without-gossip", "--without-mingle",
    )


def plan_workers(
    gpus: str,
    *,
    queues: Sequence[str] | None = None,
    visible: Sequence[str] | None = None,
    cpu_workers: int = 1,
    hostname: str | None = None,
    loglevel: str = "INFO",
    environ: Mapping[str, str] | None = None,
) -> list[WorkerSpec]:
    """The children to start for ``gpus`` (``auto``, ``none`` or a list such as ``0,1``).

    ``auto`` uses ``visible`` when given, else :func:`detect_gpus`; no GPU
    means ``cpu_workers`` CPU workers. ``queues`` (``gpu``/``cpu`` or full
    names) overrides every child's queues; by default GPU workers consume
    ``calq.gpu`` then ``calq.cpu``, CPU workers ``calq.cpu``. ``environ``
    (default ``os.environ``) supplies ``XLA_FLAGS`` to extend.
    Raises ValueError for an invalid specification.
    """
    environ = os.environ if environ is None else environ
    hostname = hostname or socket.gethostname()
    if not isinstance(cpu_workers, int) or cpu_workers < 1:
        raise ValueError(f"cpu_workers must be a positive integer, got {cpu_workers!r}")
    chosen = _queues(queues)

    spec = (gpus or "").strip().lower()
    if spec == "auto":
        devices = [str(g).strip() for g in visible] if visible is not None else detect_gpus(environ)
        devices = parse_gpu_list(",".join(devices)) if devices else []
    elif spec in ("none", "cpu"):
        devices = []
    else:
        devices = parse_gpu_list((gpus or "").strip())

    inherited = without_host_devices(environ.get("XLA_FLAGS", ""))
    # the operator's own memory share wins; else the old name, which every JAX version reads
    memory = {} if any(name in environ for name in MEM_FRACTION_VARIABLES) else {MEM_FRACTION_VARIABLES[0]: GPU_MEM_FRACTION}
    specs = []
    if devices:
        for gpu in devices:
            name = f"calq-gpu{gpu}@{hostname}" if gpu.isdigit() else f"calq-{gpu.lower()[:12]}@{hostname}"
            worker_queues = chosen or GPU_QUEUES
            env = {
                "CUDA_VISIBLE_DEVICES": gpu,
                "JAX_PLATFORMS": "cuda",
                "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                **memory,
                "XLA_FLAGS": inherited,
            }
            specs.append(WorkerSpec(name, gpu, worker_queues, env, worker_argv(name, worker_queues, loglevel=loglevel)))
    else:
        for i in range(cpu_workers):
            name = f"calq-cpu{i}@{hostname}"
            worker_queues = chosen or CPU_QUEUES
            env = {
                "CUDA_VISIBLE_DEVICES": "",
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": with_host_devices(inherited, HOST_DEVICES),
            }
            specs.append(WorkerSpec(name, None, worker_queues, env, worker_argv(name, worker_queues, loglevel=loglevel)))
    return specs


def _queues(queues: Sequence[str] | None) -> tuple[str, ...] | None:
    if queues is None:
        return None
    names: list[str] = []
    for item in queues:
        for part in str(item).split(","):
            if part.strip():
                name = queue_for(part)
                if name not in names:
                    names.append(name)
    if not names:
        raise ValueError("queues is empty: name at least one of gpu, cpu")
    return tuple(names)


# -- supervising -----------------------------------------------------------------


@dataclasses.dataclass
class _Child:
    spec: WorkerSpec
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None
    restarts: int = 0
    given_up: bool = False
    oom_kills_at_start: int | None = None
    silenced_at: float | None = None  # when it was sent SIGTERM for not beating

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _exit_text(code: int, *, oom_killed: bool = False) -> str:
    """How a child ended, in words; "out of memory" only when the kernel says its OOM killer acted."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if -code == signal.SIGKILL:
            return "was killed by the kernel's OOM killer (out of memory)" if oom_killed else f"was killed by {name} (signal 9)"
        return f"was killed by {name}"
    if code in MEANING:
        return f"exited with status {code} ({MEANING[code]})"
    return f"exited with status {code}"


#: cgroup v2 (then v1) files whose ``oom_kill`` line counts the kernel's OOM kills in this container.
_OOM_EVENTS = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")


def oom_kills(paths: Sequence[str] = _OOM_EVENTS) -> int | None:
    """The kernel's OOM-kill count for this cgroup, or None where the kernel does not say."""
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


@dataclasses.dataclass
class Fleet:
    """What a supervisor needs to hand jobs back: the fleet's services and the reaper's interval."""

    services: Services
    reaper_interval_s: float = 15.0

    @classmethod
    def from_settings(cls, settings: Any) -> Fleet:
        """The fleet's services (:meth:`shared.jobs.services.Services.from_settings`; Celery only at a first hand-back)."""
        from shared.jobs.services import Services

        return cls(Services.from_settings(settings), settings.recovery.reaper_interval_s)

    def hand_back_held(self, worker: str, *, why: str, count_delivery: bool) -> str | None:
        """Hand back the job the dead process ``worker`` held; what was done, or None if it held none."""
        from shared.jobs.lease import hand_back

        job_id = self.services.leases.claim_held(worker)
        if job_id is None:
            return None
        return hand_back(job_id, services=self.services, reason=f"{worker} {why}", count_delivery=count_delivery)

    def reaper(self) -> Any:
        from shared.jobs.lease import Reaper

        return Reaper(self.services, interval_s=self.reaper_interval_s)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec function asking Linux to SIGTERM the child if the supervisor dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    term = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, term, 0, 0, 0)

    return preexec


class Supervisor:
    """Starts every child, restarts the ones that die, and stops them all on request.

    ``restart_backoff_s`` is (first, max) delay: each quick failure doubles it,
    and it resets once a child stayed up ``stable_after_s``. :meth:`run`
    blocks until shutdown and returns 0 after a warm shutdown, 1 when children
    had to be killed or none is left running. :meth:`stop` (any thread, or the
    SIGTERM/SIGINT handlers :meth:`run` installs in the main thread) asks for
    shutdown; a second request makes it cold. ``stop_timeout_s`` bounds the
    warm shutdown (None: wait for the running jobs, however long).
    """

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        *,
        restart_backoff_s: tuple[float, float] = (1.0, 30.0),
        stable_after_s: float = 60.0,
        stop_timeout_s: float | None = None,
        kill_after_s: float = 10.0,
        poll_s: float = 0.1,
        environ: Mapping[str, str] | None = None,
        fleet: Fleet | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        silent_after_s: float | None = None,
    ) -> None:
        if not specs:
            raise ValueError("nothing to supervise: no worker specs")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"worker names must be unique: {names}")
        first, most = restart_backoff_s
        if first <= 0 or most < first:
            raise ValueError(f"restart_backoff_s must be (first, max) with 0 < first <= max, got {restart_backoff_s}")
        self.children = [_Child(spec) for spec in specs]
        self._backoff = (float(first), float(most))
        self._stable_after = stable_after_s
        self._stop_timeout = stop_timeout_s
        self._kill_after = kill_after_s
        self._poll = poll_s
        self._environ = dict(os.environ if environ is None else environ)
        self._stop_requests = 0  # plain int: set from signal handlers, no locks there
        self._started = threading.Event()
        self._fleet = fleet
        self._cold = False
        self._metrics_at = (metrics_host, metrics_port) if metrics_port is not None else None
        self._metrics_env: dict[str, str] = {}
        self.metrics_port: int | None = None
        self._silent_after = silent_after_s
        self._beats: str | None = None  # the folder of the children's beat files, while running

    # -- control --

    def stop(self, *, force: bool = False) -> None:
        """Ask for shutdown: warm the first time, cold the second (or with ``force``)."""
        self._stop_requests = max(self._stop_requests + 1, 2 if force else 1)

    def wait_started(self, timeout: float | None = None) -> bool:
        """Block until every child has been started once (for tests and callers on other threads)."""
        return self._started.wait(timeout)

    @property
    def pids(self) -> dict[str, int | None]:
        return {c.spec.name: (c.proc.pid if c.proc else None) for c in self.children}

    # -- the loop --

    def run(self) -> int:
        """Start the children and supervise them until shutdown; return the exit status."""
        previous = self._install_signal_handlers()
        server, folder = self._serve_metrics()  # first: the reaper's counters go to the multiprocess folder
        reaper = self._fleet.reaper().start() if self._fleet is not None else None
        if self._silent_after is not None:
            self._beats = tempfile.mkdtemp(prefix="calq-beats-")
        try:
            for child in self.children:
                self._start(child)
            self._started.set()
            return self._loop()
        finally:
            self._restore_signal_handlers(previous)
            self._kill_leftovers()
            if reaper is not None:
                reaper.stop()
            if server is not None:
                server.shutdown()
                server.server_close()
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            if self._beats is not None:
                shutil.rmtree(self._beats, ignore_errors=True)

    def _loop(self) -> int:
        term_sent_at: float | None = None
        quit_sent_at: float | None = None
        escalated = False
        while True:
            now = time.monotonic()
            requests = self._stop_requests
            if requests >= 1 and term_sent_at is None:
                log.info("shutting down: asking %d worker(s) to finish their current job", self._live_count())
                self._signal_all(signal.SIGTERM)
                term_sent_at = now
            timed_out = (
                term_sent_at is not None and self._stop_timeout is not None
                and now - term_sent_at >= self._stop_timeout
            )
            if (requests >= 2 or timed_out) and quit_sent_at is None:
                log.warning("cold shutdown: workers hand their running jobs back at the next chunk")
                self._signal_all(HAND_BACK_SIGNAL)
                quit_sent_at, escalated, self._cold = now, True, True
            if quit_sent_at is not None and now - quit_sent_at >= self._kill_after:
                if self._live_count():
                    log.warning("killing %d worker(s) still running %.0f s after the cold shutdown",
                                self._live_count(), self._kill_after)
                self._signal_all(signal.SIGKILL)

            stopping = term_sent_at is not None
            for child in self.children:
                if not stopping:
                    self._watch(child, now)
                self._check(child, now, stopping=stopping)

            if stopping and not self._live_count():
                log.info("all workers stopped")
                return 1 if escalated else 0
            if not stopping and all(c.given_up for c in self.children):
                log.error("no worker left running: every child failed in a way a restart cannot fix")
                return 1
            time.sleep(self._poll)

    def _restart_delay(self, child: _Child) -> float:
        """The pause before restarting ``child``: the shared backoff after its quick failures in a row."""
        first, most = self._backoff
        return backoff(child.quick_failures, first=first, most=most)

    def _check(self, child: _Child, now: float, *, stopping: bool) -> None:
        proc = child.proc
        if proc is not None and proc.poll() is not None:
            code = proc.returncode
            child.proc = None
            uptime = now - child.started_at
            kills = oom_kills()
            oom = kills is not None and child.oom_kills_at_start is not None and kills > child.oom_kills_at_start
            how = _exit_text(code, oom_killed=oom)
            metrics.mark_process_dead(proc.pid)
            self._hand_back(child, proc.pid, how, count_delivery=not (stopping and self._cold) and code != 0)
            if stopping:
                log.info("%s %s", child.spec.name, how)
                return
            if code == WorkerExit.DEVICE_UNAVAILABLE:
                child.given_up = True
                log.error(
                    "%s %s: its device is not usable (see its log); not restarting it",
                    child.spec.name, how,
                )
                return
            child.quick_failures = 0 if uptime >= self._stable_after else child.quick_failures + 1
            delay = self._restart_delay(child)
            child.restart_at = now + delay
            log.warning(
                "%s %s after %.1f s; restarting in %.1f s", child.spec.name, how, uptime, delay
            )
        if child.proc is None and child.restart_at is not None and not stopping and now >= child.restart_at:
            child.restarts += 1
            log.info("restarting %s (restart #%d)", child.spec.name, child.restarts)
            self._start(child)

    def _watch(self, child: _Child, now: float) -> None:
        """Restart a child that stopped beating (:func:`worker.protocol.beat`): SIGTERM, then SIGKILL ``kill_after_s`` later.

        A child whose loop hangs (a connection that went dead without an
        error) takes no job again and may ignore SIGTERM; once it exits it is
        handled as any child that died (its job handed back, a restart).
        """
        if self._beats is None or self._silent_after is None or child.proc is None or not child.alive:
            return
        if child.silenced_at is not None:
            if now - child.silenced_at >= self._kill_after:
                log.warning("%s ignored SIGTERM for %.0f s: killing it", child.spec.name, now - child.silenced_at)
                child.proc.kill()
            return
        silent = now - self._last_beat(child, now)
        if silent >= self._silent_after:
            log.warning("%s has not beaten for %.0f s (a hung loop or a dead connection): restarting it",
                        child.spec.name, silent)
            child.proc.terminate()
            child.silenced_at = now

    def _beat_file(self, child: _Child) -> str:
        return os.path.join(self._beats or "", f"{child.spec.name}.beat")

    def _last_beat(self, child: _Child, now: float) -> float:
        """When ``child`` last beat, on the monotonic clock (its start while it has not beaten yet)."""
        try:
            age = time.time() - os.stat(self._beat_file(child)).st_mtime
        except OSError:
            return child.started_at
        return max(child.started_at, now - age)

    def _hand_back(self, child: _Child, pid: int, how: str, *, count_delivery: bool) -> None:
        """Hand back the job a dead child held, at once (not after its lease lapses)."""
        if self._fleet is None:
            return
        try:
            done = self._fleet.hand_back_held(lease_holder(child.spec.name, pid), why=how, count_delivery=count_delivery)
        except Exception as exc:  # Redis out: the lease lapses and the reaper hands the job back
            log.warning("could not hand back %s's job (%s: %s); the reaper will", child.spec.name,
                        type(exc).__name__, exc)
            return
        if done is not None:
            metrics.handed_back("worker_lost", done=done)
            log.info("%s's job: %s", child.spec.name, done)

    def _start(self, child: _Child) -> None:
        spec = child.spec
        env = {**self._environ, **spec.env, **self._metrics_env, SUPERVISOR_PID_ENV: str(os.getpid())}
        if self._beats is not None:
            env[BEAT_FILE_ENV] = self._beat_file(child)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._beat_file(child))  # the last process's beats are not this one's
        child.silenced_at = None
        child.restart_at = None
        child.started_at = time.monotonic()
        child.oom_kills_at_start = oom_kills()
        try:
            child.proc = subprocess.Popen(
                list(spec.argv), env=env, process_group=0, preexec_fn=_die_with_parent()
            )
        except OSError as exc:
            child.proc = None
            child.quick_failures += 1
            delay = self._restart_delay(child)
            child.restart_at = time.monotonic() + delay
            log.error("could not start %s (%s); trying again in %.1f s", spec.name, exc, delay)
            return
        log.info("started %s (pid %d)", spec.describe(), child.proc.pid)

    def _serve_metrics(self) -> tuple[Any, str | None]:
        """Start ``/metrics`` (with a fleet and a port): a fresh multiprocess folder, inherited by every child.

        Returns the server and the folder to remove at exit; (None, None) when
        metrics are off or the port cannot be had (the fleet runs without them).
        """
        if self._metrics_at is None or self._fleet is None:
            return None, None
        host, port = self._metrics_at
        own = os.environ.get(metrics.MULTIPROC_ENV) is None
        folder = tempfile.mkdtemp(prefix="calq-metrics-") if own else os.environ[metrics.MULTIPROC_ENV]
        metrics.prepare_multiprocess(Path(folder))
        self._metrics_env = {metrics.MULTIPROC_ENV: folder}
        try:
            server = metrics.serve(port, host=host, redis_client=self._fleet.services.registry.redis, queues=ALL_QUEUES)
        except OSError as exc:
            log.error("no metrics: cannot listen on %s:%d (%s); set CALQ_METRICS__PORT", host, port, exc)
            return None, folder if own else None
        self.metrics_port = server.server_port
        return server, folder if own else None

    def _live_count(self) -> int:
        return sum(1 for c in self.children if c.alive)

    def _signal_all(self, sig: signal.Signals) -> None:
        for child in self.children:
            if child.alive:
                try:
                    child.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def _kill_leftovers(self) -> None:
        # Only reached with live children if run() itself failed: never leave orphans.
        for child in self.children:
            if child.alive:
                log.error("killing %s, left running by an error in the supervisor", child.spec.name)
                child.proc.kill()
                child.proc.wait()

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: Mapping[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Runs in the main thread between bytecodes: only bump the counter.
        self._stop_requests += 1


def run(
    gpus: str = "auto",
    queues: Sequence[str] | None = None,
    *,
    cpu_workers: int = 1,
    loglevel: str = "INFO",
    hostname: str | None = None,
    stop_timeout_s: float | None = None,
    restart_backoff_s: tuple[float, float] = (1.0, 30.0),
    require_broker: bool = True,
) -> int:
    """Plan the workers for ``gpus``/``queues``, log the plan, supervise until shutdown.

    Returns the supervisor's exit status (0 after a warm shutdown). Raises
    ValueError for an invalid GPU list or queue name, or when no broker is
    configured (``CALQ_BROKER_URL``): workers need one.
    """
    if require_broker:
        from shared.contract.settings import get_settings

        if get_settings().embedded:
            raise ValueError(
                "calq worker needs a broker: set CALQ_BROKER_URL (e.g. redis://localhost:6379/0); "
                "without one, jobs run in-process and need no worker"
            )
    specs = plan_workers(gpus, queues=queues, cpu_workers=cpu_workers, hostname=hostname, loglevel=loglevel)
    log.info("starting %d worker(s):", len(specs))
    for spec in specs:
        log.info("  %s", spec.describe())
        if spec.gpu is None and GPU_QUEUE in spec.queues:
            log.warning("  %s consumes %s without a GPU: GPU jobs will run on the CPU", spec.name, GPU_QUEUE)
    fleet, port, host = None, None, "127.0.0.1"
    if require_broker:
        from shared.contract.settings import get_settings
        from worker.observe import apply_log_format

        settings = get_settings()
        apply_log_format(settings)
        fleet = Fleet.from_settings(settings)
        if settings.metrics.enabled:
            port, host = settings.metrics.port, settings.metrics.host
    silent = settings.recovery.silent_child_s if require_broker else None
    return Supervisor(specs, restart_backoff_s=restart_backoff_s, stop_timeout_s=stop_timeout_s, fleet=fleet,
                      metrics_port=port, metrics_host=host, silent_after_s=silent).run()

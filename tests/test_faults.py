"""The fault suite: faults cost seconds, never jobs.

Real ``redis-server`` with AOF (restarted on the same port and folder), moto's
S3 server (stopped and started on the same port; its buckets live in this
process, so they survive), real ``python -m worker`` supervisors with their
Celery children. Leases and backoff are shortened through the settings
(:data:`FAST`), except in the one test at default settings.

Every test asserts that no job was lost (each ends succeeded, or
dead-lettered where that is the point), that no job has more than one
summary and one posterior and moved ``latest`` at most once, and how long
recovery took. Sampler runs are counted in each job's record (``sampler_runs``),
so a finished fit that ran again would show.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.contract.job import JobState
from tests.services import TcpProxy, Worker, alive, calq_environ, convergence_environ, free_port, new_s3_store, start_redis, until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "calq-faults"
EVENTS = "top_5,top_10"
#: Tiny runs cannot reach 400 effective draws: these criteria let them count as converged.
CONVERGENCE = convergence_environ()
#: Leases and backoff shortened, so a lapse or an outage costs seconds in the suite.
FAST = {"CALQ_RECOVERY__LEASE_S": "4", "CALQ_RECOVERY__HEARTBEAT_S": "1", "CALQ_RECOVERY__REAPER_INTERVAL_S": "1",
        "CALQ_RECOVERY__RETRY_FIRST_S": "0.5", "CALQ_RECOVERY__RETRY_MAX_S": "2"}
#: A job long enough to be killed in the middle of sampling (20 chunks): about 3 s of sampling on 2 cores. With
#: 2,000 draws (logit-hier/2's shorter trees: under 2 s) a cold shutdown 0.5 s after a tenth of the run was seen could
#: come after the job had succeeded; 4,000 were enough until the hand-written potential made a leapfrog step about a
#: third cheaper (shared.fit.model.potential), so 6,000.
LONG = {"warmup": 100, "samples": 6000, "chains": 2}
SHORT = {"warmup": 100, "samples": 200, "chains": 2}


# -- services that can be stopped and started again ---------------------------------


class AofRedis:
    """A redis-server with ``appendonly yes`` (fsync always) that can be restarted on its port."""

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not on PATH (CI is set)")
            pytest.skip("redis-server is not on PATH")
        self.workdir, self.port = workdir, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc, _ = start_redis(self.workdir, port=self.port, binary=self.binary,
                                   args=("--appendonly", "yes", "--appendfsync", "always"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class Moto:
    """moto's S3 server on a fixed port; stopping it is an S3 outage (the buckets stay in this process)."""

    def __init__(self) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            if os.environ.get("CI"):
                pytest.fail("moto[server] is not installed (CI is set)")
            pytest.skip("moto[server] is not installed")
        self._cls, self.port, self.server = ThreadedMotoServer, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        for _ in range(50):  # the port may linger a moment after a stop
            try:
                self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
                self.server.start()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"moto could not listen on {self.port} again")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


# -- the fleet under test --------------------------------------------------------------


class Faults:
    """Everything a fault test touches: services, workers, a client, and the checks."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = AofRedis(tmp)
        self.s3 = Moto()
        self.workers: list[Worker] = []
        self.phases: dict[str, list[str]] = {}
        self._listening = False

    def start(self) -> None:
        from shared.data.dataset import save_dataset
        from shared.data.synth import synthesize

        self.redis.start()
        self.s3.start()
        store, self.settings = new_s3_store(self.s3.url, BUCKET, broker_url=self.redis.url)
        self.env = calq_environ(
            CALQ_BROKER_URL=self.redis.url, **store,
            CALQ_RECOVERY__SPOOL_DIR=str(self.tmp / "spool"),
            # Each test needs its job still sampling when the fault strikes; a warm start (from the fits of
            # earlier tests) shortens jobs by how near a fit is. Warm starts have their own tests.
            CALQ_WARM_START="false",
            **CONVERGENCE,
        )
        self.dataset = self.tmp / "season.nc"
        save_dataset(synthesize(seasons=1, scenarios=200, seed=5), self.dataset)
        self.client = self.new_client()
        self.dataset_ref = self.client.upload(self.dataset)
        self.listen()

    def new_client(self):
        from producer.client import CalibrationClient

        return CalibrationClient(self.settings)

    def close(self) -> None:
        self._listening = False
        for worker in self.workers:
            worker.stop()
        self.s3.stop()
        self.redis.stop()

    # -- workers and jobs --

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()

    def worker(self, *, children: int = 1, fast: bool = True, **env: str) -> Worker:
        worker = Worker({**self.env, **(FAST if fast else {}), **env}, self.tmp / f"worker{len(self.workers)}.log",
                        children=children)
        self.workers.append(worker)
        return worker

    def submit(self, seed: int, sampler: dict[str, int] = LONG, archetype: str = "intermediate") -> str:
        return self.client.submit(self.dataset, archetype, events=EVENTS, seed=seed, dataset_ref=self.dataset_ref,
                                  **sampler)

    def record(self, job_id: str):
        try:
            return self.client.registry.find(job_id)
        except Exception:
            return None  # Redis may be the fault

    def wait_state(self, job_id: str, states: set[JobState], timeout: float):
        return until(lambda: (r := self.record(job_id)) is not None and r.state in states and r,
                     timeout=timeout, what=f"{job_id} to be {', '.join(s.value for s in states)}")

    def wait_sampling(self, job_id: str, fraction: float = 0.1, timeout: float = 120):
        def sampling():
            r = self.record(job_id)
            return r is not None and r.state is JobState.RUNNING and r.progress is not None and \
                r.progress.phase == "sampling" and r.progress.fraction >= fraction and r
        return until(sampling, timeout=timeout, what=f"{job_id} to be sampling", every=0.05)

    def wait_finishing(self, job_id: str, timeout: float = 120):
        """Running and near its end: sampling past 90 %, or already in diagnostics or the write.

        Progress within one phase is throttled (two records a second), so the last tenth of a
        fast sampling run can pass unseen; phase changes are always recorded.
        """
        def finishing():
            r = self.record(job_id)
            if r is None or r.state is not JobState.RUNNING or r.progress is None:
                return False
            phase = r.progress.phase
            near_end = (phase == "sampling" and r.progress.fraction >= 0.9) or phase in ("diagnostics", "write")
            return near_end and r
        return until(finishing, timeout=timeout, what=f"{job_id} to be finishing", every=0.02)

    def listen(self) -> None:
        """Collect every progress phase each job reports (the registry's pub/sub), across Redis restarts."""
        import redis

        self._listening = True

        def run() -> None:
            while self._listening:
                try:
                    pubsub = redis.Redis.from_url(self.redis.url).pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe("calq:jobs")
                    while self._listening:
                        message = pubsub.get_message(timeout=0.5)
                        if message and message.get("type") == "message":
                            body = json.loads(message["data"])
                            phase = (body.get("progress") or {}).get("phase") or body.get("state")
                            seen = self.phases.setdefault(body["job_id"], [])
                            if not seen or seen[-1] != phase:
                                seen.append(phase)
                except Exception:
                    time.sleep(0.2)

        threading.Thread(target=run, daemon=True).start()

    # -- the checks every test makes --

    def worker_logs(self) -> str:
        return "".join(w.log.read_text(errors="replace") for w in self.workers)

    def assert_done_once(self, job_id: str, *, sampler_runs: int | None = None) -> None:
        """Succeeded, one summary and one posterior, ``latest`` moved at most once, the sampler run as often as said."""
        record = self.record(job_id)
        assert record is not None and record.state is JobState.SUCCEEDED, record
        objects = [uri for uri in self.client.store.list("posteriors") if job_id in uri]
        assert sorted(Path(u).suffix for u in objects) == [".json", ".nc"], objects
        summary = self.client.result(job_id)
        assert summary.job_id == job_id
        moves = self.worker_logs().count(f"latest now {job_id}")
        assert moves <= 1, f"latest moved {moves} times for {job_id}"
        if sampler_runs is not None:
            assert record.sampler_runs == sampler_runs


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Iterator[Faults]:
    fleet = Faults(tmp_path_factory.mktemp("faults"))
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture(scope="module")
def pair(faults) -> Worker:
    """One worker with two children and short leases, shared by the tests that do not kill it."""
    worker = faults.worker(children=2)
    worker.wait_ready()
    return worker


def report(what: str, seconds: float) -> None:
    print(f"\n[faults] {what}: {seconds:.1f} s")


# -- the faults ------------------------------------------------------------------------


def test_child_sigkilled_mid_sampling_runs_again_within_90_s_at_default_settings(faults):
    """The one test at default settings (lease 60 s, heartbeat 10 s, reaper 15 s)."""
    worker = faults.worker(children=1, fast=False)
    worker.wait_ready()
    job_id = faults.submit(seed=101)
    first = faults.wait_sampling(job_id)
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)
    killed = time.monotonic()
    until(lambda: (r := faults.record(job_id)) and r.state is JobState.RUNNING and
               r.started_at != first.started_at and r, timeout=90, what="the job to run again")
    recovery = time.monotonic() - killed
    report("SIGKILL of the child → running again (default settings)", recovery)
    assert recovery < 90
    faults.wait_state(job_id, {JobState.SUCCEEDED}, 240)
    faults.assert_done_once(job_id, sampler_runs=2)
    assert "killed by SIGKILL (signal 9)" in worker.log.read_text() and "out of memory" not in worker.log.read_text()
    assert faults.record(job_id).deliveries == 2
    worker.stop()


def test_twenty_concurrent_submits_of_one_job_with_two_workers_run_it_once(faults, pair):
    from concurrent.futures import ThreadPoolExecutor

    start = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        ids = set(pool.map(lambda _: faults.new_client().submit(
            faults.dataset, "intermediate", events=EVENTS, seed=201, dataset_ref=faults.dataset_ref, **SHORT), range(20)))
    (job_id,) = ids
    record = faults.wait_state(job_id, {JobState.SUCCEEDED}, 180)
    report("20 concurrent submits → succeeded", time.monotonic() - start)
    faults.assert_done_once(job_id, sampler_runs=1)
    assert record.deliveries == 1
    assert pair.log.read_text().count(f"calq.calibrate[{job_id}] received") == 1


def restart_redis(faults, down_s: float) -> None:
    faults.redis.stop()
    time.sleep(down_s)
    faults.redis.start()


def test_redis_restart_mid_run_loses_nothing(faults, pair):
    job_id = faults.submit(seed=301)
    faults.wait_sampling(job_id, 0.1)
    restart_redis(faults, 3)
    back = time.monotonic()
    faults.wait_state(job_id, {JobState.SUCCEEDED}, 240)
    report("Redis restarted mid-run (3 s down) → succeeded after", time.monotonic() - back)
    faults.assert_done_once(job_id, sampler_runs=1)


def test_redis_out_at_the_moment_of_finishing_orphans_nothing(faults, pair):
    job_id = faults.submit(seed=302)
    faults.wait_finishing(job_id)
    restart_redis(faults, 8)  # longer than the lease: the worker's succeed waits, then the record is made right
    back = time.monotonic()
    faults.wait_state(job_id, {JobState.SUCCEEDED}, 120)
    report("Redis out 8 s as the job finished → succeeded after", time.monotonic() - back)
    faults.assert_done_once(job_id, sampler_runs=1)


@pytest.mark.parametrize("down_s", [10, 25], ids=["10s", "longer-than-backoff"])
def test_s3_stopped_mid_write_costs_waiting_not_the_fit(faults, pair, down_s):
    job_id = faults.submit(seed=400 + down_s)
    faults.wait_sampling(job_id, 0.1)  # sampling reads and writes nothing in S3: the write is the first to meet the outage
    faults.s3.stop()
    try:
        until(lambda: "waiting for storage" in faults.phases.get(job_id, []), timeout=60, what="the write to wait for S3")
        assert faults.record(job_id).state is JobState.RUNNING
        time.sleep(down_s)
    finally:
        faults.s3.start()
    back = time.monotonic()
    faults.wait_state(job_id, {JobState.SUCCEEDED}, 120)
    report(f"S3 stopped {down_s} s mid-write → succeeded after", time.monotonic() - back)
    faults.assert_done_once(job_id, sampler_runs=1)


def test_a_child_killed_while_its_draws_wait_for_storage_loses_nothing(faults, pair):
    job_id = faults.submit(seed=450)
    faults.wait_sampling(job_id, 0.1)
    faults.s3.stop()
    try:
        until(lambda: "waiting for storage" in faults.phases.get(job_id, []), timeout=60, what="the write to wait for S3")
        pid = pair.child_named(faults.record(job_id).worker)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the draws and the summary are in the spool, not yet in the store
    finally:
        faults.s3.start()
    killed = time.monotonic()
    faults.wait_state(job_id, {JobState.SUCCEEDED}, 180)
    report("child SIGKILLed while its draws waited for S3 → succeeded after", time.monotonic() - killed)
    faults.assert_done_once(job_id, sampler_runs=1)  # the spooled draws were written, not fitted again
    assert f"job {job_id}: its draws were waiting in the spool" in faults.worker_logs()


def test_a_job_that_kills_its_worker_every_time_is_dead_lettered(faults, pair):
    job_id = faults.submit(seed=501, sampler=SHORT)
    started = time.monotonic()
    kills, seen = 0, set()
    while True:
        record = faults.record(job_id)
        if record is not None and record.state.finished:
            break
        if record is not None and record.state is JobState.RUNNING and record.started_at not in seen:
            pid = pair.child_named(record.worker)
            if pid is not None:
                seen.add(record.started_at)
                os.kill(pid, signal.SIGKILL)  # the poison: its worker dies every time it runs
                kills += 1
        assert time.monotonic() - started < 180, f"not dead-lettered after {kills} kills: {record}"
        time.sleep(0.05)
    report(f"poison job dead-lettered after {kills} kills", time.monotonic() - started)
    assert record.state is JobState.FAILED and "dead-lettered" in record.reason
    assert kills == faults.settings.max_deliveries
    assert [u for u in faults.client.store.list("posteriors") if job_id in u] == []


def test_the_whole_worker_sigkilled_then_a_new_one_started(faults, pair):
    pair.stop()  # only the worker under test and its successor
    worker = faults.worker(children=1)
    worker.wait_ready()
    job_id = faults.submit(seed=601)
    first = faults.wait_sampling(job_id, 0.1)
    worker.kill_all()
    killed = time.monotonic()
    successor = faults.worker(children=1)
    record = until(lambda: (r := faults.record(job_id)) and r.state is JobState.RUNNING and
                        r.started_at != first.started_at and r, timeout=120, what="the job to run again on the new worker")
    report("whole worker SIGKILLed → running on the new worker", time.monotonic() - killed)
    faults.wait_state(job_id, {JobState.SUCCEEDED}, 240)
    faults.assert_done_once(job_id, sampler_runs=2)
    assert "lease lapsed" in successor.log.read_text()
    assert record.deliveries == 2


def test_a_cold_shutdown_hands_the_job_back_without_counting_it(faults):
    faults.stop_workers()  # the job must land on the worker under test
    worker = faults.worker(children=1)
    worker.wait_ready()
    job_id = faults.submit(seed=701)
    faults.wait_sampling(job_id, 0.1)
    worker.proc.send_signal(signal.SIGTERM)  # warm: would finish the job
    time.sleep(0.5)
    worker.proc.send_signal(signal.SIGTERM)  # cold: hand it back
    asked = time.monotonic()
    record = faults.wait_state(job_id, {JobState.QUEUED, JobState.FAILED}, 30)
    report("cold shutdown → job queued again", time.monotonic() - asked)
    assert record.state is JobState.QUEUED and record.deliveries == 0 and record.progress is None
    assert worker.proc.wait(30) == 1  # stopped without finishing its job
    assert "NotImplementedError" not in worker.log.read_text()
    faults.worker(children=1)  # the next deploy runs it
    faults.wait_state(job_id, {JobState.SUCCEEDED}, 240)
    faults.assert_done_once(job_id, sampler_runs=2)
    assert faults.record(job_id).deliveries == 1  # three deploys cannot dead-letter a healthy job


def test_children_of_a_dead_supervisor_stop_and_hand_their_jobs_back(faults):
    (worker,) = [w for w in faults.workers if w.proc.poll() is None]  # the one the last test started
    worker.wait_ready()
    job_id = faults.submit(seed=801)
    faults.wait_sampling(job_id, 0.1)
    (child,) = worker.children()
    worker.proc.kill()  # the supervisor only; its child is left alone
    worker.proc.wait(10)
    killed = time.monotonic()
    faults.wait_state(job_id, {JobState.QUEUED}, 30)
    until(lambda: not alive(child), timeout=30, what="the orphaned child to exit")
    report("supervisor SIGKILLed → its child handed the job back and exited", time.monotonic() - killed)
    assert faults.record(job_id).deliveries == 0
    faults.worker(children=1)
    faults.wait_state(job_id, {JobState.SUCCEEDED}, 240)
    faults.assert_done_once(job_id, sampler_runs=2)


# -- issue 18: exactly once under partitions ------------------------------------------------------
#
# Two worker "hosts": two supervisors with their own spool folders, sharing one Redis and one S3. A
# worker frozen past its lease, a flushed Redis, a Redis out of memory, a spool on a full disk.


def two_hosts(faults, **spools: Path) -> list[Worker]:
    """One supervisor (one child) per name in ``spools``, each spooling in its own folder; every other worker stopped."""
    faults.stop_workers()
    hosts = [faults.worker(children=1, CALQ_RECOVERY__SPOOL_DIR=str(folder)) for folder in spools.values()]
    for host in hosts:
        host.wait_ready()
    return hosts


def host_of(hosts: list[Worker], worker: str) -> tuple[Worker, int]:
    """The host whose child a record's ``worker`` names, and that child's pid."""
    for host in hosts:
        pid = host.child_named(worker)
        if pid is not None:
            return host, pid
    raise AssertionError(f"no host runs {worker}")


def assert_one_publication(faults, job_id: str) -> None:
    """The store holds exactly the summary and the posterior the record names: record, store and ``latest`` agree."""
    record = faults.record(job_id)
    summary = faults.client.result(job_id)
    objects = sorted(u for u in faults.client.store.list("posteriors") if job_id in u)
    assert objects == sorted([summary.summary_uri, summary.posterior_uri]), objects
    assert (record.summary_uri, record.posterior_uri) == (summary.summary_uri, summary.posterior_uri)
    for event in summary.events if summary.converged else ():
        pointer = faults.client.registry.latest(summary.archetype, event)
        assert pointer is None or pointer.job_id != job_id or pointer.posterior_uri == summary.posterior_uri


def runs_of(faults, job_id: str) -> int:
    """How many times a worker started fitting ``job_id`` (its log lines; a flush loses the record's counter)."""
    return sum(1 for line in faults.worker_logs().splitlines() if job_id in line and "running intermediate on" in line)


def test_a_worker_frozen_at_the_write_phase_writes_nothing_when_it_wakes(faults):
    hosts = two_hosts(faults, a=faults.tmp / "spool-a", b=faults.tmp / "spool-b")
    job_id = faults.submit(seed=901, sampler=SHORT)
    record = faults.wait_finishing(job_id)
    stale, pid = host_of(hosts, record.worker)
    os.kill(pid, signal.SIGSTOP)  # frozen (a partition, a GC pause, a VM migration) just before its write
    frozen = time.monotonic()
    try:
        winner = faults.wait_state(job_id, {JobState.SUCCEEDED}, 240)
        report("worker frozen at the write phase → succeeded on the other host", time.monotonic() - frozen)
        assert winner.worker != record.worker
    finally:
        os.kill(pid, signal.SIGCONT)
    until(lambda: "stopped: its lease was" in stale.log.read_text(errors="replace"),
          timeout=60, what="the woken worker to stop without writing")
    time.sleep(2)  # anything it would still write, it has written by now
    faults.assert_done_once(job_id, sampler_runs=2)
    assert_one_publication(faults, job_id)
    assert faults.record(job_id).worker == winner.worker  # no stale record change (progress included)
    stale_spool = faults.tmp / ("spool-a" if stale is hosts[0] else "spool-b")
    assert not any(stale_spool.glob(f"{job_id}*")), "the stale host kept draws it will never write"
    assert "published its summary first" not in stale.log.read_text(errors="replace")  # it never reached the store
    assert stale.log.read_text(errors="replace").count(f"latest now {job_id}") == 0


def test_flushall_with_a_running_job_and_queued_jobs_loses_nothing_after_reindex(faults):
    import redis

    from shared.jobs.submissions import reindex

    (host,) = two_hosts(faults, a=faults.tmp / "spool-flush")
    for key in faults.client.store.list("submissions/"):  # earlier tests' jobs (a dead-lettered one has no summary)
        faults.client.store.delete(key)  # would be lost to the flush too, and queued again by the reindex
    running = faults.submit(seed=911)
    faults.wait_sampling(running, 0.1)
    queued = [faults.submit(seed=912 + i, sampler=SHORT) for i in range(3)]
    redis.Redis.from_url(faults.redis.url).flushall()
    flushed = time.monotonic()
    faults.wait_state(running, {JobState.SUCCEEDED}, 240)  # its worker re-asserted the lease and finished it
    report("FLUSHALL mid-run → the running job succeeded after", time.monotonic() - flushed)
    assert "re-asserted" in host.log.read_text(errors="replace")
    assert all(faults.record(job_id) is None for job_id in queued)  # gone with the queue, until reindex
    with pytest.raises(Exception, match="calq reindex"):
        faults.client.status(queued[0])
    fresh = faults.new_client()  # as `calq reindex` is: a new process, whose Celery declares the queues again
    done = reindex(registry=fresh.registry, store=fresh.store, publish=fresh.send)
    assert done["requeued"] == 3
    for job_id in queued:
        faults.wait_state(job_id, {JobState.SUCCEEDED}, 240)
        faults.assert_done_once(job_id, sampler_runs=1)
        assert_one_publication(faults, job_id)
    report("FLUSHALL → every queued job succeeded after reindex", time.monotonic() - flushed)
    faults.assert_done_once(running)
    assert_one_publication(faults, running)
    assert runs_of(faults, running) == 1


def test_redis_out_of_memory_as_the_job_finishes_is_waited_through(faults):
    import redis

    two_hosts(faults, a=faults.tmp / "spool-oom")
    job_id = faults.submit(seed=921, sampler=SHORT)
    faults.wait_finishing(job_id)
    client = redis.Redis.from_url(faults.redis.url)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    try:
        time.sleep(3)  # within the lease (4 s): renewals fail and are tried again
    finally:
        client.config_set("maxmemory", "0")
    freed = time.monotonic()
    faults.wait_state(job_id, {JobState.SUCCEEDED}, 120)
    report("Redis out of memory 3 s as the job finished → succeeded after", time.monotonic() - freed)
    faults.assert_done_once(job_id, sampler_runs=1)
    assert_one_publication(faults, job_id)


def test_a_spool_on_a_full_disk_hands_the_job_back_and_another_host_runs_it(faults):
    full = faults.tmp / "spool-full"
    full.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        (host,) = two_hosts(faults, a=full)
        job_id = faults.submit(seed=931, sampler=SHORT)
        until(lambda: f"no space in {full}" in host.log.read_text(errors="replace"),
              timeout=240, what="the worker with the full spool to say so")
        handed = time.monotonic()
        assert faults.record(job_id).state is not JobState.FAILED
        healthy = faults.worker(children=1, CALQ_RECOVERY__SPOOL_DIR=str(faults.tmp / "spool-free"))
        host.stop()  # the full host is taken out: the healthy one runs the job
        healthy.wait_ready()
        faults.wait_state(job_id, {JobState.SUCCEEDED, JobState.FAILED}, 240)
        report("spool disk full → handed back, succeeded on another host after", time.monotonic() - handed)
        assert faults.record(job_id).state is JobState.SUCCEEDED
        faults.assert_done_once(job_id)
        assert_one_publication(faults, job_id)
    finally:
        faults.stop_workers()
        subprocess.run(["umount", str(full)], check=False)


# -- issue 18: a real partition between one host and Redis (a loopback proxy) ----------------------
#
# Host 1 reaches Redis (broker, result backend, registry, leases) only through a TcpProxy; host 2
# directly. Freezing the proxy is a partition of host 1 alone: its connections stay open and silent
# (no FIN, no RST), as a hung NAT or load balancer leaves them.

def behind_proxy(faults, proxy: TcpProxy, spool: Path) -> Worker:
    """A host whose every Redis connection goes through ``proxy`` (one child, its own spool), ready."""
    host = faults.worker(children=1, CALQ_BROKER_URL=proxy.url_for(faults.redis.url),
                         CALQ_RECOVERY__SPOOL_DIR=str(spool))
    host.wait_ready()
    return host


def test_the_proxy_silences_thaws_and_cuts_connections(faults):
    import redis

    with TcpProxy("127.0.0.1", faults.redis.port) as proxy:
        client = redis.Redis.from_url(proxy.url_for(faults.redis.url), socket_timeout=1)
        assert client.ping()
        proxy.freeze(new="forwarded")
        with pytest.raises(redis.exceptions.TimeoutError):
            client.execute_command("PING")  # the open connection is silent: no reply, no reset
        assert redis.Redis.from_url(proxy.url_for(faults.redis.url), socket_timeout=1).ping()  # a new one works
        proxy.freeze(new="refused")
        with pytest.raises(redis.exceptions.ConnectionError):
            redis.Redis.from_url(proxy.url_for(faults.redis.url), socket_timeout=1).ping()
        proxy.thaw()
        assert redis.Redis.from_url(proxy.url_for(faults.redis.url), socket_timeout=1).ping()
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        raw.sendall(b"PING\r\n")
        assert raw.recv(64) == b"+PONG\r\n"
        proxy.cut()
        assert raw.recv(64) == b""  # closed by the cut
    with pytest.raises(ValueError, match="loopback"):
        TcpProxy("10.0.0.1", 6379)


def test_a_host_partitioned_from_redis_writes_nothing_while_the_other_host_finishes_the_job(faults):
    faults.stop_workers()
    spool_near, spool_far = faults.tmp / "spool-partitioned", faults.tmp / "spool-reachable"
    with TcpProxy("127.0.0.1", faults.redis.port) as proxy:
        near = behind_proxy(faults, proxy, spool_near)
        job_id = faults.submit(seed=941)
        first = faults.wait_sampling(job_id, 0.01)
        assert near.child_named(first.worker) is not None, first.worker
        far = faults.worker(children=1, CALQ_RECOVERY__SPOOL_DIR=str(spool_far))  # its reaper starts at once
        proxy.freeze()  # host 1 is cut off from Redis, mid-sampling; its connections hang open
        frozen = time.monotonic()
        assert faults.record(job_id).worker == first.worker
        try:
            moved = until(lambda: (r := faults.record(job_id)) and r.state is JobState.RUNNING and
                               r.worker != first.worker and r, timeout=120, what="the job to run on host 2")
            report("host 1 partitioned from Redis → running on host 2", time.monotonic() - frozen)
            assert far.child_named(moved.worker) is not None, moved.worker
            winner = faults.wait_state(job_id, {JobState.SUCCEEDED}, 240)
            report("host 1 partitioned from Redis → succeeded on host 2", time.monotonic() - frozen)
        finally:
            proxy.thaw()
        until(lambda: "stopped: its lease was lost" in near.log.read_text(errors="replace"),
              timeout=120, what="host 1 to stop without writing once it reaches Redis again")
        time.sleep(3)  # anything host 1 would still write, it has written by now
        near.stop()
    faults.assert_done_once(job_id)
    assert_one_publication(faults, job_id)
    summary = faults.client.result(job_id)
    record = faults.record(job_id)
    assert record.worker == winner.worker and record.summary_uri == summary.summary_uri
    stored = sorted(u for u in faults.client.store.list("posteriors") if job_id in u)
    assert stored == sorted([summary.summary_uri, summary.posterior_uri]), stored  # no second posterior key
    assert not any(spool_near.glob(f"{job_id}*")), "host 1 kept a finished write in its spool"
    assert "the job is another worker's now (nothing written)" in near.log.read_text(errors="replace")
    assert near.log.read_text(errors="replace").count(f"latest now {job_id}") == 0
    if summary.converged:
        assert faults.worker_logs().count(f"latest now {job_id}") == 1
        for event in summary.events:
            pointer = faults.client.registry.latest(summary.archetype, event)
            assert pointer is not None and pointer.job_id == job_id and pointer.summary_uri == summary.summary_uri


#: How long a host behind a half-open link may take to run a new job (the issue saw 150 s and 330 s, never).
HALF_OPEN_BOUND_S = 60


def test_a_half_open_link_to_redis_does_not_stop_a_worker_taking_new_jobs(faults):
    """Scenario 2 of issue 18: the link dies for the connections open now only, as a hung NAT leaves it.

    The consumer's BRPOP never answers and its pooled connections hang; kombu drops the BRPOP
    connection once its reply is overdue, and the unacked record of the message it then pops is
    written on a new connection (``retry_on_timeout``): without that the consumer restarted on a
    TimeoutError and the popped message was lost, the job queued for good; and the task's first write
    to the result backend (``redis_retry_on_timeout``) met a dead connection and failed the task, its
    record left queued. A first job runs before the freeze so those pools hold connections. The job is submitted 2 s
    after the freeze: a message Redis hands to a BRPOP already waiting on the dead connection (its
    server-side timeout is 1 s) is lost with that connection, which no client setting can prevent.
    """
    faults.stop_workers()
    with TcpProxy("127.0.0.1", faults.redis.port) as proxy:
        host = behind_proxy(faults, proxy, faults.tmp / "spool-half-open")
        warm = faults.submit(seed=950, sampler=SHORT)  # so its pools hold connections that will hang (backend included)
        faults.wait_state(warm, {JobState.SUCCEEDED}, 240)
        time.sleep(2)  # idle: its consumer waits on the broker
        opened = proxy.accepted
        proxy.freeze(new="forwarded")  # every open connection hangs for good; a new one gets through
        frozen = time.monotonic()
        time.sleep(2)
        job_id = faults.submit(seed=951, sampler=SHORT)
        try:
            taken = until(lambda: (r := faults.record(job_id)) and r.state is not JobState.QUEUED and r,
                          timeout=HALF_OPEN_BOUND_S, what="the host behind the half-open link to take the new job")
        finally:
            report("half-open link to Redis (open connections dead) → new job taken after", time.monotonic() - frozen)
        assert host.child_named(taken.worker) is not None, taken.worker
        faults.wait_state(job_id, {JobState.SUCCEEDED}, 240)
        report("half-open link to Redis → new job succeeded after", time.monotonic() - frozen)
        assert proxy.accepted > opened  # it got out by connecting again: the old connections never came back
        host.stop()  # while the proxy still forwards: its last acknowledgement goes through
    faults.assert_done_once(job_id, sampler_runs=1)
    assert_one_publication(faults, job_id)
    assert "Connection to broker lost" not in host.log.read_text(errors="replace")  # the consumer never restarted

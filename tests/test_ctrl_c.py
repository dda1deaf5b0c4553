"""Ctrl-C anywhere cancels what it started, and the record says so (issue 22).

- ``calq backfill``, embedded: the first Ctrl-C cancels the job running here
  (its record ends ``cancelled``), submits no more, prints the table of done,
  cancelled and not-run jobs and exits 4; the bar has counted every job that
  ended.
- ``calq backfill`` on the fleet (a real redis-server, no worker: its jobs stay
  queued): the first Ctrl-C cancels the jobs it submitted, through the client.
- A second Ctrl-C during an embedded ``calq calibrate`` quits at once, and the
  record still ends ``cancelled`` (it stayed ``queued`` or ``running``).
- A Ctrl-C while Python tears calq down, after its exit handlers, leaves calq's
  own exit code (it was killed by the signal, exit -2).

Each runs ``calq`` as a person does, in a subprocess, and sends it SIGINT.
"""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
from rich.console import Console

import producer.backfill as backfill_module
from producer.backfill import NOT_RUN, Backfill, Outcome, outcome_table
from producer.client import CalibrationClient
from producer.exit_codes import ExitCode
from shared.contract.job import JobState
from shared.contract.settings import Settings
from shared.jobs.registry import RedisRegistry, StoreRegistry
from shared.storage.store import Store
from tests.services import calq_environ, convergence_environ, season_file, start_calq, until

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--warmup", "30", "--samples", "30", "--chains", "1"]
#: Long enough to be still sampling when the Ctrl-C comes (never run to its end).
LONG = ["--warmup", "10000", "--samples", "10000", "--chains", "1"]
CONVERGENCE = convergence_environ({"min_ess_bulk": 5, "max_rhat": 1.5, "max_divergences": 50})
#: The season's intermediate races from 2024-03-03 to 2024-06-02: one data window each after the first.
WIDER = ("--from", "2024-03-01", "--to", "2024-06-05")


@pytest.fixture(scope="module")
def season(tmp_path_factory) -> Path:
    return season_file(tmp_path_factory.mktemp("ctrl-c-data"), scenarios=20, seed=3, drivers_per_race=8, pool_size=10)


def environment(store: Path, **extra: str) -> dict[str, str]:
    return calq_environ(COLUMNS="80", CALQ_STORAGE_URL=str(store), **CONVERGENCE, **extra)


def start(environ: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen[str]:
    return start_calq(environ, cwd, *args, text=True)


def interrupt(proc: subprocess.Popen[str], *, when, what: str, times: int = 1, timeout: float = 240):
    """Send SIGINT ``times`` (0.3 s apart) once ``when()`` holds; the process's (code, stdout, stderr)."""
    try:
        until(lambda: proc.poll() is not None or when(), timeout=timeout, what=what, every=0.05)
        assert proc.poll() is None, (what, proc.communicate())
        for i in range(times):
            if i:
                time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    return proc.returncode, stdout, stderr


def records(store: Path) -> list:
    return StoreRegistry(Store(str(store))).jobs(limit=None) if store.exists() else []


def counts(stdout: str) -> dict[str, int]:
    """The totals in the backfill table's title: {"done": 1, "reused": 2, ...} (zeros are not said)."""
    title = " ".join(line.strip() for line in stdout.splitlines()[:3])
    return {name: int(n) for n, name in re.findall(r"(\d+) (done|reused|failed|rejected|cancelled|not run)", title)}


# -- in-process: the loop ---------------------------------------------------------------


@pytest.fixture
def client(tmp_path) -> CalibrationClient:
    return CalibrationClient(Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None))


def plan(client, season, end=date(2024, 6, 5)) -> Backfill:
    return Backfill(client, season, start=date(2024, 3, 1), end=end, archetypes=["intermediate"], window_days=365,
                    events="top_5", sampler={"warmup": 30, "samples": 30, "chains": 1})


def test_embedded_the_bar_counts_each_job_before_the_next_starts(client, season, monkeypatch):
    """It read 0/18 with 2 jobs done: four embedded jobs ran before the loop looked at any of them."""
    advanced: list[str] = []

    class Bar(backfill_module._NoBar):
        def advance(self, *args, **kwargs):
            advanced.append("+")

    seen_at_start: list[int] = []

    def run_here(job, on_update):  # a job that fails at once: no sampler needed to count
        seen_at_start.append(len(advanced))
        client.registry.mark_running(job.job_id, worker="embedded")
        client.registry.fail(job.job_id, "made to fail by the test")

    monkeypatch.setattr(backfill_module, "counting_bar", lambda console: Bar())
    monkeypatch.setattr(client, "_run_here", run_here)
    outcomes = plan(client, season).run(max_in_flight=4)
    assert len(outcomes) >= 3
    assert seen_at_start == list(range(len(outcomes)))  # each job counted before the next one ran
    assert len(advanced) == len(outcomes)


def test_an_interrupted_embedded_backfill_submits_no_more_and_says_not_run(client, season, monkeypatch):
    ran: list[str] = []

    def run_here(job, on_update):
        ran.append(job.job_id)
        client.registry.mark_running(job.job_id, worker="embedded")
        if len(ran) == 2:  # Ctrl-C while the second job runs: it ends cancelled at its next check
            client.interrupt("interrupted (Ctrl-C)")
            client.registry.finish_cancelled(job.job_id, "cancelled: interrupted (Ctrl-C)")
        else:
            client.registry.fail(job.job_id, "made to fail by the test")

    monkeypatch.setattr(client, "_run_here", run_here)
    outcomes = plan(client, season).run()
    jobs = [o.job_id for o in outcomes]
    assert len(jobs) >= 3 and ran == jobs[:2]
    assert [o.state for o in outcomes] == ["failed", "cancelled", *[NOT_RUN] * (len(jobs) - 2)]
    assert all(o.reason == "not submitted: the backfill was interrupted first" for o in outcomes[2:])
    assert client.status(jobs[1]).state is JobState.CANCELLED
    assert all(client.registry.find(j) is None for j in jobs[2:])  # never submitted


def test_the_outcome_table_at_80_columns_keeps_whole_job_ids_one_line_per_job():
    reason = "the dataset's race 'Daytona 500' is dated after the time of validation " * 3
    outcomes = [Outcome(archetype, date(2024, 3, 4), f"cj-{i:024x}", state, None if state == "succeeded" else reason)
                for i, (archetype, state) in enumerate([("intermediate", "succeeded"), ("superspeedway", "rejected"),
                                                         ("short_track", "cancelled"), ("road_course", NOT_RUN)])]
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(outcome_table(outcomes))
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for o in outcomes[1:3]:  # each job that ran and did not succeed: one line holding its id whole, its reason below
        lines = [line for line in text.splitlines() if o.job_id in line]
        assert lines == [f"{o.archetype} as of 2024-03-04  {o.state}  {o.job_id}"], text
    assert outcomes[3].job_id not in text  # never submitted: counted, not listed
    assert "1 job(s) not run: the backfill was interrupted before it submitted them" in " ".join(text.split())
    assert "…" not in text
    assert "backfill: 4 jobs — 1 done, 1 rejected, 1 cancelled, 1 not run" in " ".join(text.split())


def test_a_ctrl_c_that_surfaces_as_another_error_is_still_a_cancellation(monkeypatch, capsys):
    """A Ctrl-C raised while a C extension initialises comes out as ``ImportError: initialization failed``."""
    from producer import cli

    def interrupted_import(**_):
        cli.Interrupted.seen = True  # as the SIGINT handler does before it raises
        raise ImportError("initialization failed")

    monkeypatch.setattr(cli.Interrupted, "seen", False)
    monkeypatch.setattr(cli, "app", interrupted_import)
    monkeypatch.setattr(sys, "argv", ["calq", "calibrate"])
    assert cli._run() == ExitCode.CANCELLED
    assert capsys.readouterr().err.strip() == "interrupted"
    monkeypatch.setattr(cli.Interrupted, "seen", False)
    monkeypatch.setattr(cli, "app", lambda **_: (_ for _ in ()).throw(ImportError("a real one")))
    assert cli._run() == ExitCode.FAILED  # without a Ctrl-C, an ImportError is the error it is
    assert "unexpected ImportError: a real one" in capsys.readouterr().err


# -- subprocesses: Ctrl-C as a person sends it ------------------------------------------------


def test_ctrl_c_in_an_embedded_backfill_cancels_its_job_reports_it_and_exits_4(tmp_path, season):
    """Ctrl-C once the first job is done and the second started (reused jobs: test_backfill's rerun, and the table)."""
    store = tmp_path / "calq-store"
    proc = start(environment(store), tmp_path, "backfill", str(season), *WIDER, "--archetypes", "intermediate",
                 "--events", "top_5", *TINY)

    def one_done_and_the_next_claimed() -> bool:
        states = [r.state for r in records(store)]
        return len(states) == 2 and states.count(JobState.SUCCEEDED) == 1

    code, stdout, stderr = interrupt(proc, when=one_done_and_the_next_claimed, what="a job done, the next one started")
    assert code == ExitCode.CANCELLED, (code, stderr[-3000:])
    total = int(re.search(r"backfill: (\d+) jobs", stdout).group(1))
    assert total >= 3 and counts(stdout) == {"done": 1, "cancelled": 1, "not run": total - 2}, stdout
    cancelled = [r for r in records(store) if r.state is JobState.CANCELLED]
    assert len(cancelled) == 1 and "interrupted (Ctrl-C)" in cancelled[0].reason
    assert len(records(store)) == 2  # nothing submitted after the Ctrl-C
    assert f"cancelled  {cancelled[0].job_id}" in stdout  # its line in the report, its id whole
    assert max(len(line) for line in stdout.splitlines()) <= 80 and "…" not in stdout  # COLUMNS=80
    assert f"2/{total}" in stderr  # the bar counted both jobs that ended
    assert not list(store.rglob(f"{cancelled[0].job_id}*.nc"))  # the cancelled job wrote nothing


@pytest.mark.integration
def test_ctrl_c_in_a_fleet_backfill_cancels_the_jobs_it_submitted(tmp_path, season, redis_url):
    store = tmp_path / "calq-store"
    proc = start(environment(store, CALQ_BROKER_URL=redis_url), tmp_path, "backfill", str(season), *WIDER,
                 "--archetypes", "intermediate", "--events", "top_5", "--max-in-flight", "2", *TINY)
    registry = RedisRegistry.from_url(redis_url)
    code, stdout, stderr = interrupt(proc, when=lambda: len(registry.jobs(limit=None)) == 2,
                                     what="two jobs queued on the fleet (no worker runs them)")
    assert code == ExitCode.CANCELLED, (code, stderr[-3000:])
    submitted = registry.jobs(limit=None)
    assert len(submitted) == 2
    for record in submitted:
        assert record.state is JobState.CANCELLED and record.reason == "cancelled: backfill interrupted (Ctrl-C)"
        assert f"cancelled  {record.job_id}\n" in stdout  # one line, its id whole, at 80 columns
    assert max(len(line) for line in stdout.splitlines()) <= 80 and "…" not in stdout
    total = int(re.search(r"backfill: (\d+) jobs", stdout).group(1))
    assert counts(stdout) == {"cancelled": 2, "not run": total - 2}


@pytest.mark.parametrize("moment", ["starting", "sampling"])
def test_a_second_ctrl_c_during_an_embedded_calibrate_still_ends_the_record_cancelled(tmp_path, season, moment):
    """Quitting at once used to leave the record ``queued`` (stopped while JAX loaded) or ``running``."""
    store = tmp_path / "calq-store"
    proc = start(environment(store), tmp_path, "calibrate", str(season), "--archetype", "intermediate",
                 "--events", "top_5", *LONG)

    def ready() -> bool:
        found = records(store)
        if moment == "starting":
            return bool(found)  # claimed: the job is starting (importing JAX, loading, compiling)
        return bool(found) and found[0].progress is not None and found[0].progress.phase in ("warmup", "sampling")

    code, _, stderr = interrupt(proc, when=ready, what=f"the job {moment}", times=2)
    assert code == ExitCode.CANCELLED, (code, stderr[-3000:])
    [record] = records(store)
    assert record.state is JobState.CANCELLED, (record.state, record.reason)
    assert "interrupted (Ctrl-C)" in record.reason and record.finished_at is not None
    assert not list(store.rglob("posteriors/**/*.nc"))


#: calq run as its entry point runs it, with one slow object torn down with ``__main__`` after the exit
#: handlers (as JAX's are), and a line on stdout when the exit handlers begin: calq's come after it.
SLOW_TEARDOWN = """
import atexit, sys, time
from producer import cli

class SlowTeardown:
    def __del__(self):
        time.sleep(3)

keep = SlowTeardown()
atexit.register(lambda: print("finalising", flush=True))
sys.argv = ["calq", "calibrate", "no-such-file.nc"]
cli.main()
"""


def test_a_ctrl_c_while_python_tears_calq_down_leaves_calqs_exit_code(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TEARDOWN], cwd=ROOT, env=calq_environ(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "finalising\n", proc.communicate()
        time.sleep(0.5)  # the exit handlers are done: the modules are being torn down
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == ExitCode.USAGE, (proc.returncode, stderr)  # not -2: killed by the signal

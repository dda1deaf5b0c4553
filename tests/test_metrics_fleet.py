"""The fleet, seen: a real `calq worker` runs real jobs; /metrics is scraped over HTTP, `calq fleet --json` read.

One CPU worker on redis-server and moto's S3, with ``CALQ_METRICS__PORT`` and
JSON logs. It runs a long job that is cancelled mid-sampling (two tiny jobs
wait behind it, one on a dataset the validator rejects), the two tiny jobs,
and an invalid message. The scrape is parsed with prometheus_client's own
parser, and every counter is checked against what happened: each moved by
exactly what it should, and the ones nothing touched did not move.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from producer.client import CalibrationClient
from shared.contract.job import JobState
from shared.data.dataset import open_dataset, save_dataset
from tests.services import calq_environ, calq_worker, convergence_environ, free_port, new_s3_store, run_calq, until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TINY = {"warmup": 10, "samples": 10, "chains": 1}
LONG = {"warmup": 10_000, "samples": 10_000, "chains": 1}
EVENTS = "top_5"
CONVERGENCE = convergence_environ({"min_ess_bulk": 1, "max_rhat": 10, "max_divergences": 1000, "max_attempts": 1})


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one /metrics request: (name, sorted labels) → value, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels`` (0 when there is none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def fleet_json(environ, cwd) -> dict:
    result = run_calq(environ, cwd, "fleet", "--json", check=False, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from shared.data.synth import synthesize

    root = tmp_path_factory.mktemp("metrics-data")
    good = root / "season.nc"
    save_dataset(synthesize(seasons=1, scenarios=100, seed=13), good)
    ds = open_dataset(good)
    finish = ds["finish_position"].values.copy()
    finish[0, ~np.isnan(finish[0])] = 7.0  # everyone finished 7th: the validator rejects it
    ds["finish_position"].values = finish
    bad = root / "broken.nc"
    save_dataset(ds, bad)
    return good, bad


@pytest.fixture(scope="module")
def fleet(redis_server, s3_server, tmp_path_factory):
    bucket = "calq-metrics"
    root = tmp_path_factory.mktemp("metrics-fleet")
    url = redis_server.url.rsplit("/", 1)[0] + "/5"  # a database of its own
    import redis

    redis.Redis.from_url(url).flushdb()
    port = free_port()
    store, settings = new_s3_store(s3_server, bucket, broker_url=url, warm_start=False)
    environ = calq_environ(
        CALQ_BROKER_URL=url, **store, CALQ_WARM_START="false",
        CALQ_METRICS__PORT=str(port), CALQ_METRICS__HOST="127.0.0.1", CALQ_METRICS__HEARTBEAT_S="0.5",
        CALQ_LOG__FORMAT="json", **CONVERGENCE,
    )
    for name in [name for name in environ if name.startswith("PROMETHEUS_")]:
        del environ[name]
    with calq_worker(environ, root):
        yield environ, root, CalibrationClient(settings), port, settings


def test_a_real_worker_is_seen_busy_then_idle_and_every_counter_moves_as_it_should(fleet, datasets):
    environ, root, client, port, settings = fleet
    good, bad = datasets

    # Up: one idle worker in calq fleet, and a scrape that answers with its info series.
    idle = until(lambda: [w for w in fleet_json(environ, root)["workers"] if w["state"] == "idle"], timeout=180,
                 what="the worker's first heartbeat")
    assert len(idle) == 1 and idle[0]["device"] == "cpu" and idle[0]["worker"].startswith("calq-cpu0@")
    worker_name = idle[0]["worker"]
    before = until(lambda: scrape(port), timeout=30, what="/metrics answering")
    scraped_before = time.monotonic()
    assert value(before, "calq_worker_info", worker=worker_name, device="cpu") == 1
    assert value(before, "calq_worker_busy", worker=worker_name) == 0

    # Busy: a long job sampling, with two jobs queued behind it.
    long_id = client.submit(good, "intermediate", events=EVENTS, **LONG)
    until(lambda: (s := client.status(long_id)).state is JobState.RUNNING and s.progress is not None
          and s.progress.phase in ("warmup", "sampling"), timeout=240, what="the long job sampling")
    rejected_id = client.submit(bad, "intermediate", events=EVENTS, **TINY)
    good_id = client.submit(good, "road_course", events=EVENTS, lane="batch", **TINY)
    busy = until(lambda: [w for w in fleet_json(environ, root)["workers"]
                          if w["state"] == "busy" and w["phase"] in ("warmup", "sampling")],
                 timeout=30, what="calq fleet showing the worker busy")
    assert busy[0]["job_id"] == long_id and busy[0]["archetype"] == "intermediate"
    assert busy[0]["lease_age_s"] is not None and busy[0]["heartbeat_age_s"] < 5
    view = fleet_json(environ, root)
    assert view["queues"] == {"calq.gpu": 0, "calq.cpu": 1, "calq.gpu.batch": 0, "calq.cpu.batch": 1}
    during = scrape(port)
    assert value(during, "calq_worker_busy", worker=worker_name) == 1
    assert value(during, "calq_queue_depth", queue="calq.cpu") == 1
    assert value(during, "calq_queue_depth", queue="calq.cpu.batch") == 1
    assert value(during, "calq_queue_depth", queue="calq.gpu") == 0

    # Cancelled mid-sampling; then the two queued jobs run: one rejected, one succeeded.
    client.cancel(long_id, "seen enough")
    until(lambda: client.status(long_id).state is JobState.CANCELLED, timeout=120, what="the long job cancelled")
    until(lambda: client.status(good_id).state.finished and client.status(rejected_id).state.finished,
          timeout=300, what="the queued jobs finishing")
    assert client.status(long_id).state is JobState.CANCELLED
    assert client.status(rejected_id).state is JobState.REJECTED
    assert client.status(good_id).state is JobState.SUCCEEDED

    # An invalid message: dropped and counted.
    from shared.jobs.celery_app import CPU_QUEUE, TASK_NAME, make_app

    make_app(settings).send_task(TASK_NAME, args=[{"job_id": "cj-bogus", "archetype": 7}], queue=CPU_QUEUE)
    until(lambda: fleet_json(environ, root)["invalid_messages"] == 1, timeout=60, what="the invalid message counted")

    # Idle again, and the fleet view agrees with what happened.
    after_view = until(lambda: (v := fleet_json(environ, root)) and v["workers"]
                       and v["workers"][0]["state"] == "idle" and v, timeout=30, what="the worker idle again")
    w = after_view["workers"][0]
    assert w["jobs_done"] == 3 and w["job_id"] is None and w["lease_age_s"] is None
    assert "position 7" in (w["last_error"] or "")  # the rejected job's reason
    assert after_view["finished_last_hour"] == {"cancelled": 1, "rejected": 1, "succeeded": 1}
    assert set(after_view["queues"].values()) == {0} and len(after_view["queues"]) == 4
    assert after_view["dead_letters"] == 0 and after_view["jobs_per_minute_5m"] == pytest.approx(3 / 5)
    assert after_view["archetypes"]["road_course"]["jobs"] == 1
    assert after_view["archetypes"]["road_course"]["p50_s"] > 0

    after = scrape(port)
    seconds = time.monotonic() - scraped_before
    finished = {(dict(ls)["archetype"], dict(ls)["state"], dict(ls)["lane"]): v
                for (n, ls), v in after.items() if n == "calq_jobs_finished_total"}
    assert finished == {("intermediate", "cancelled", "interactive"): 1, ("intermediate", "rejected", "interactive"): 1,
                        ("road_course", "succeeded", "batch"): 1}
    assert value(after, "calq_sampler_runs_total", archetype="intermediate", outcome="interrupted") == 1
    assert value(after, "calq_sampler_runs_total", archetype="road_course") == 1  # one run, max_attempts 1
    assert value(after, "calq_sampler_runs_total", archetype="intermediate") == 1  # the rejected job never sampled
    summary = client.result(good_id)
    assert value(after, "calq_divergences_total", archetype="road_course") == summary.diagnostics.divergences
    assert value(after, "calq_remedies_total") == 0
    assert value(after, "calq_remedies_total", archetype="road_course", remedy="target_accept") == 0  # a series
    for phase in ("queued", "load", "compile", "sample", "diagnostics", "write"):
        assert value(after, "calq_job_seconds_count", archetype="road_course", phase=phase) == 1, phase
    assert value(after, "calq_job_seconds_sum", archetype="road_course", phase="sample") == pytest.approx(
        summary.timings.sample_s)
    assert value(after, "calq_job_seconds_count", archetype="intermediate", phase="queued") == 2
    assert value(after, "calq_job_rows_count", archetype="road_course") == 1
    assert value(after, "calq_job_rows_sum", archetype="road_course") == summary.n_rows
    assert value(after, "calq_job_rows_count", archetype="intermediate") == 0
    assert value(after, "calq_invalid_messages_total") == 1
    for untouched in ("calq_dead_letters_total", "calq_leases_reaped_total", "calq_handbacks_total",
                      "calq_store_write_retries_total"):
        assert value(after, untouched) == 0, untouched
    assert value(after, "calq_worker_busy", worker=worker_name) == 0
    assert value(after, "calq_queue_depth", queue="calq.cpu") == 0

    # The dashboard, rendered from these two scrapes: every panel shows data.
    from tests.dashboard import Scrapes, as_text, render

    panels = render(Scrapes(before, after, seconds))
    print(as_text(panels))
    shown = {}
    for title, _legend, vector in panels:
        shown.setdefault(title, {}).update(vector)
    api = {title for title in shown if title.startswith("API ")}  # the API's own /metrics, not a worker's
    assert api and all(not shown[title] for title in api)
    assert all(series for title, series in shown.items() if title not in api), [
        title for title, series in shown.items() if not series and title not in api]
    assert shown["Queue depth"] == {(("queue", q),): 0 for q in ("calq.cpu", "calq.gpu", "calq.cpu.batch", "calq.gpu.batch")}
    per_minute = {dict(ls)["state"]: v for ls, v in shown["Jobs per minute by state"].items()}
    assert per_minute == pytest.approx({s: 60 / seconds for s in ("cancelled", "rejected", "succeeded")})
    p50 = {dict(ls)["phase"]: v for ls, v in shown["Job seconds by phase (p50)"].items()}
    assert set(p50) == {"queued", "load", "compile", "sample", "diagnostics", "write"}
    assert all(v >= 0 for v in p50.values())

    # JSON logs: one object per line, naming the worker, the job, its archetype and phase.
    lines = [json.loads(line) for line in (root / "worker.log").read_text().splitlines() if line.startswith("{")]
    assert {"time", "level", "worker", "job_id", "archetype", "phase", "message"} <= set(lines[-1])
    mine = [entry for entry in lines if entry["job_id"] == good_id]
    assert mine and any(e["worker"] == worker_name and e["archetype"] == "road_course" and e["phase"] for e in mine)


def test_a_killed_worker_process_is_a_hand_back_and_leaves_the_busy_sum(fleet, datasets):
    """SIGKILL the busy child: its supervisor hands the job back (worker_lost) and marks the process dead."""
    environ, root, client, port, _ = fleet
    good, _ = datasets
    start = scrape(port)
    job_id = client.submit(good, "superspeedway", events=EVENTS, **LONG)
    busy = until(lambda: [w for w in fleet_json(environ, root)["workers"]
                          if w["job_id"] == job_id and w["phase"] in ("warmup", "sampling")],
                 timeout=240, what="the long job sampling")
    killed = busy[0]["pid"]
    os.kill(killed, signal.SIGKILL)

    # A new process takes the job back; its heartbeat replaces the dead one's (which expires).
    again = until(lambda: [w for w in fleet_json(environ, root)["workers"]
                           if w["job_id"] == job_id and w["pid"] != killed and w["phase"] in ("warmup", "sampling")],
                  timeout=240, what="the job running again in a new worker process")
    until(lambda: [w["pid"] for w in fleet_json(environ, root)["workers"]] == [again[0]["pid"]], timeout=30,
          what="the dead process's record expiring")
    during = scrape(port)
    assert value(during, "calq_handbacks_total", cause="worker_lost") == 1
    assert value(during, "calq_leases_reaped_total") == 0  # handed back at once, not after the lease lapsed
    # the dead process's busy 1 left the sum when its supervisor marked it dead
    assert value(during, "calq_worker_busy", worker=busy[0]["worker"]) == 1
    assert client.status(job_id).deliveries == 2

    client.cancel(job_id, "enough")
    until(lambda: client.status(job_id).state is JobState.CANCELLED, timeout=120, what="the job cancelled")
    after = until(lambda: (s := scrape(port)) and value(s, "calq_worker_busy") == 0 and s, timeout=30,
                  what="the worker idle")
    moved = {name: value(after, name) - value(start, name) for name in (
        "calq_jobs_finished_total", "calq_handbacks_total", "calq_leases_reaped_total", "calq_dead_letters_total")}
    assert moved == {"calq_jobs_finished_total": 1, "calq_handbacks_total": 1, "calq_leases_reaped_total": 0,
                     "calq_dead_letters_total": 0}
    assert value(after, "calq_jobs_finished_total", archetype="superspeedway", state="cancelled") == 1

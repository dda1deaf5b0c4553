"""What ``calq fleet`` and ``/metrics`` read from Redis is untrusted: hostile records, entries and queues.

Anyone holding Redis's keys can write a heartbeat record, a recent-jobs entry,
a total or a queue key. Each case writes such a value into a real
redis-server and checks the final state: the view leaves it out and counts
it, the command exits 0 without a traceback, nothing it printed carries a
raw control character, and the well-formed records beside it are intact.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import redis

from shared.jobs import metrics, telemetry
from shared.jobs.celery_app import CPU_QUEUE, GPU_QUEUE, QUEUES
from tests.services import calq_environ, run_calq

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "calq"


def beat(worker: str = "calq-cpu0@host", pid: int = 101, **over) -> telemetry.WorkerBeat:
    now = time.time()
    fields = dict(worker=worker, pid=pid, node="host", device="cpu", version="0.1.0", state="idle",
                  heartbeat_at=now, started_at=now - 60, jobs_done=2)
    fields.update(over)
    return telemetry.WorkerBeat(**fields)


def finished(job_id: str, *, archetype: str = "intermediate", state: str = "succeeded", seconds: float = 10.0,
             converged: bool | None = True, ago: float = 30.0) -> telemetry.FinishedJob:
    return telemetry.FinishedJob(job_id=job_id, archetype=archetype, state=state, seconds=seconds,
                                 converged=converged, finished_at=time.time() - ago)


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def calq_fleet(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_calq(calq_environ(CALQ_BROKER_URL=redis_url, COLUMNS="400"), ROOT, "fleet", *args, check=False,
                    timeout=120)


# -- the view, from well-formed records --------------------------------------------


def test_the_view_counts_rates_percentiles_and_convergence_failures(r):
    telemetry.publish_beat(r, PREFIX, beat(), ttl_s=30)
    telemetry.publish_beat(r, PREFIX, beat("calq-gpu0@host", 102, device="gpu:0", state="busy", job_id="cj-1",
                                           archetype="road_course", phase="sampling",
                                           lease_since=time.time() - 42), ttl_s=30)
    for i, seconds in enumerate([10, 20, 30, 40, 100]):
        telemetry.record_finish(r, PREFIX, finished(f"cj-a{i}", seconds=seconds, converged=i != 4, ago=30 + i))
    telemetry.record_finish(r, PREFIX, finished("cj-old", ago=1200))  # in the hour, not in the 5 minutes
    telemetry.record_finish(r, PREFIX, finished("cj-r", archetype="road_course", state="rejected", seconds=1))
    telemetry.record_finish(r, PREFIX, finished("cj-gone", ago=4000))  # older than the window: dropped
    telemetry.count(r, PREFIX, "dead_letters")
    telemetry.count(r, PREFIX, "invalid_messages", 3)
    r.rpush(CPU_QUEUE, "m1", "m2")
    r.rpush(metrics.priority_lists(CPU_QUEUE)[2], "m3")  # kombu's list for priority 6

    view = telemetry.read_fleet(r, PREFIX, QUEUES)

    assert [(w.beat.worker, w.beat.state) for w in view.workers] == [("calq-cpu0@host", "idle"),
                                                                      ("calq-gpu0@host", "busy")]
    busy = view.workers[1]
    assert busy.lease_age_s == pytest.approx(42, abs=5) and busy.heartbeat_age_s < 5
    assert view.queues == {GPU_QUEUE: 0, CPU_QUEUE: 3}
    assert view.dead_letters == 1 and view.invalid_messages == 3
    assert view.finished_last_hour == {"rejected": 1, "succeeded": 6}
    assert view.jobs_per_minute_5m == pytest.approx(6 / 5)
    assert view.jobs_per_minute_60m == pytest.approx(7 / 60)
    inter = view.archetypes["intermediate"]
    assert inter.jobs == 6 and inter.convergence_failures == 1
    assert inter.p50_s == pytest.approx(25.0)  # 10, 10, 20, 30, 40, 100
    assert inter.p95_s == pytest.approx(telemetry.percentile([10, 10, 20, 30, 40, 100], 0.95))
    assert view.archetypes["road_course"].p50_s is None  # no succeeded job: no time
    assert view.skipped == 0


def test_percentile_matches_numpy_linear_interpolation():
    import numpy as np

    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 100):
        values = rng.exponential(10, size=n).tolist()
        for q in (0.5, 0.95):
            assert telemetry.percentile(values, q) == pytest.approx(float(np.quantile(values, q)))
    assert telemetry.percentile([], 0.5) is None


def test_the_recent_list_is_bounded(r):
    for i in range(30):
        telemetry.record_finish(r, PREFIX, finished(f"cj-{i}", ago=30 - i), keep=10)
    assert r.zcard(f"{PREFIX}:fleet:recent") == 10


def test_an_expired_record_leaves_the_index(r):
    telemetry.publish_beat(r, PREFIX, beat(), ttl_s=0.2)
    time.sleep(0.4)
    assert telemetry.read_fleet(r, PREFIX, QUEUES).workers == []
    assert r.zcard(f"{PREFIX}:fleet:workers") == 0


# -- hostile values ---------------------------------------------------------------------


def test_hostile_worker_records_are_skipped_and_counted(r):
    """Garbage, wrong types, NaN and negative times, a name that disagrees with its key, oversize text."""
    telemetry.publish_beat(r, PREFIX, beat(), ttl_s=30)
    hostile = {
        "w1#1": b"\xff\xfe not json",
        "w2#2": json.dumps({"worker": "w2", "pid": "two"}),
        "w3#3": json.dumps({**beat("w3", 3).model_dump(), "heartbeat_at": float("nan")}),
        "w4#4": json.dumps({**beat("w4", 4).model_dump(), "lease_since": -5.0}),
        "w5#5": beat("impostor", 9).model_dump_json(),  # the record's own name is not its key's
        "w6#6": json.dumps({**beat("w6", 6).model_dump(), "last_error": "x" * 10_000}),
        "w7#7": json.dumps({**beat("w7", 7).model_dump(), "state": "on fire"}),
    }
    for holder, raw in hostile.items():
        r.set(f"{PREFIX}:fleet:worker:{holder}", raw, ex=30)
        r.zadd(f"{PREFIX}:fleet:workers", {holder: time.time()})

    view = telemetry.read_fleet(r, PREFIX, QUEUES)
    assert [w.beat.worker for w in view.workers] == ["calq-cpu0@host"]
    assert view.skipped == len(hostile)

    shown = calq_fleet(_url(r), "--json")
    assert shown.returncode == 0 and "Traceback" not in shown.stderr
    data = json.loads(shown.stdout)
    assert [w["worker"] for w in data["workers"]] == ["calq-cpu0@host"] and data["skipped"] == len(hostile)


def test_hostile_recent_entries_and_totals_are_skipped(r):
    telemetry.record_finish(r, PREFIX, finished("cj-ok"))
    now = time.time()
    for raw in (b"\x00\x01", json.dumps({"job_id": "cj-x", "archetype": "a", "state": "exploded", "seconds": 1,
                                         "finished_at": now}),
                json.dumps({"job_id": "cj-y", "archetype": "a", "state": "succeeded", "seconds": -1,
                            "finished_at": now}),
                json.dumps({"job_id": "cj-z", "archetype": "a" * 5000, "state": "succeeded", "seconds": 1,
                            "finished_at": now})):
        r.zadd(f"{PREFIX}:fleet:recent", {raw: now})
    r.hset(f"{PREFIX}:fleet:totals", mapping={"dead_letters": "lots", "invalid_messages": "-4"})

    view = telemetry.read_fleet(r, PREFIX, QUEUES)
    assert view.finished_last_hour == {"succeeded": 1} and list(view.archetypes) == ["intermediate"]
    assert view.dead_letters == 0 and view.invalid_messages == 0
    assert view.skipped == 6


def test_a_queue_key_of_the_wrong_type_reads_as_unknown_not_a_traceback(r):
    r.set(CPU_QUEUE, "not a list")
    view = telemetry.read_fleet(r, PREFIX, QUEUES)
    assert view.queues == {GPU_QUEUE: None, CPU_QUEUE: None}
    # the scrape still answers, without the queue depth series
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry(r, QUEUES)).decode()
    assert "calq_queue_depth{" not in text


def test_escape_sequences_in_a_record_are_shown_visibly_in_calq_fleet(r):
    """A worker name, phase and last error carrying ESC, CSI, OSC 8, bidi and rich markup: shown, never acted on."""
    nasty = "\x1b[2J\x1b]8;;http://evil\x07click\x1b]8;;\x07\u202e[red]x[/red]\r"
    telemetry.publish_beat(r, PREFIX, beat("calq-cpu0@host", 101, state="busy", job_id="cj-1", phase=nasty[:60],
                                           last_error=nasty, lease_since=time.time()), ttl_s=30)
    shown = calq_fleet(_url(r))
    assert shown.returncode == 0, shown.stderr
    for raw in ("\x1b", "\x07", "\u202e", "\r"):
        assert raw not in shown.stdout
    assert "\\x1b[2J" in shown.stdout and "\\u202e[red]x[/red]\\x0d" in shown.stdout  # visible, markup as text
    as_json = calq_fleet(_url(r), "--json")
    assert as_json.returncode == 0 and as_json.stdout.isascii()
    assert json.loads(as_json.stdout)["workers"][0]["last_error"] == nasty


def test_calq_fleet_without_a_broker_is_a_usage_error():
    shown = run_calq(calq_environ(), ROOT, "fleet", check=False, timeout=120)
    assert shown.returncode == 2 and "needs a broker" in shown.stderr and "Traceback" not in shown.stderr


def _url(r: redis.Redis) -> str:
    kw = r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def test_calq_fleet_with_redis_unreachable_exits_5_without_the_password():
    from tests.services import free_port

    shown = calq_fleet(f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0", "--json")
    assert shown.returncode == 5 and "Redis unavailable" in shown.stderr
    assert "hunter2-secret" not in shown.stderr + shown.stdout and "Traceback" not in shown.stderr

"""The worker's observer, the metric recorders and the JSON log formatter, in this process (no worker, no Celery).

The real worker path is tests/test_metrics_fleet.py; here each rule on its own:
a dead letter is a ``fail`` before the job started, remedies are read from
the attempts' settings, recorders never raise and never grow a label beyond
its set, queue depths sum kombu's priority lists, and a JSON log line is one
ASCII line whatever its message holds.
"""

from __future__ import annotations

import io
import json
import logging
from datetime import timedelta
from types import SimpleNamespace

import pytest
import redis
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared.contract.job import JobState, JobStatus, utcnow
from shared.contract.settings import Settings
from shared.jobs import metrics, telemetry
from shared.jobs.celery_app import CPU_QUEUE, GPU_QUEUE, QUEUES
from shared.jobs.handle import bound_job_id
from worker import observe


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Recorded:
    """A registry whose every change is accepted, returning a record like the real one's."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _status(self, job_id: str, state: JobState) -> JobStatus:
        now = utcnow()
        return JobStatus(job_id=job_id, archetype="short_track", state=state, submitted_at=now - timedelta(seconds=3),
                         started_at=now)

    def mark_running(self, job_id, *, worker):
        self.calls.append("mark_running")
        return self._status(job_id, JobState.RUNNING)

    def progress(self, job_id, progress):
        self.calls.append(f"progress:{progress.phase}")

    def fail(self, job_id, reason):
        self.calls.append("fail")
        return self._status(job_id, JobState.FAILED)

    def reject(self, job_id, reason):
        return self._status(job_id, JobState.REJECTED)

    def record_invalid(self, reason, *, job_id=None):
        self.calls.append("record_invalid")

    def find(self, job_id):
        return "passed through"


@pytest.fixture
def fleet_redis(redis_url, monkeypatch):
    monkeypatch.setattr(observe, "_fleet_redis", None)
    monkeypatch.setattr(observe, "activity", observe.Activity(worker="calq-cpu9@test"))
    client = redis.Redis.from_url(redis_url)
    yield Settings(broker_url=redis_url), client
    client.close()


@pytest.mark.integration
def test_a_fail_before_the_job_started_is_a_dead_letter_and_one_after_is_not(fleet_redis):
    settings, client = fleet_redis
    before = (sample("calq_dead_letters_total"),
              sample("calq_jobs_finished_total", archetype="short_track", state="failed", lane="interactive"))

    dead = observe.ObservedRegistry(Recorded(), settings=settings)
    dead.fail("cj-dead", "dead-lettered after 3 deliveries")
    ran = observe.ObservedRegistry(Recorded(), settings=settings, lane="batch")
    ran.mark_running("cj-ran", worker="calq-cpu9@test")
    ran.progress("cj-ran", SimpleNamespace(phase="sampling"))
    assert observe.activity.job_id == "cj-ran" and observe.activity.phase == "sampling"
    ran.fail("cj-ran", "JobFailed: out of time")

    assert sample("calq_dead_letters_total") == before[0] + 1
    assert sample("calq_jobs_finished_total", archetype="short_track", state="failed", lane="interactive") == before[1] + 1
    assert sample("calq_jobs_finished_total", archetype="short_track", state="failed", lane="batch") >= 1
    view = telemetry.read_fleet(client, "calq", QUEUES)
    assert view.dead_letters == 1 and view.finished_last_hour == {"failed": 2}
    # the job that ran was sampling when it failed: one interrupted run; it leaves the process idle
    assert sample("calq_sampler_runs_total", archetype="short_track", outcome="interrupted") >= 1
    assert observe.activity.job_id is None and observe.activity.jobs_done == 2
    assert observe.activity.last_error == "JobFailed: out of time"
    assert dead.find("cj-dead") == "passed through"  # everything else is the registry's own


@pytest.mark.integration
def test_an_invalid_message_is_counted_in_metrics_and_in_the_fleet_totals(fleet_redis):
    settings, client = fleet_redis
    before = sample("calq_invalid_messages_total")
    inner = Recorded()
    observe.ObservedRegistry(inner, settings=settings).record_invalid("invalid job message")
    assert inner.calls == ["record_invalid"]
    assert sample("calq_invalid_messages_total") == before + 1
    assert telemetry.read_fleet(client, "calq", QUEUES).invalid_messages == 1


def test_remedies_are_read_from_what_each_run_changed():
    def attempt(target=0.8, warmup=100, samples=100, warm=False):
        return SimpleNamespace(target_accept_prob=target, warmup=warmup, samples=samples, warm_start=warm)

    runs = [attempt(warm=True), attempt(), attempt(target=0.9), attempt(target=0.9, warmup=200, samples=200),
            attempt(target=0.9, warmup=200, samples=500)]
    assert observe.remedies_of(runs) == ["cold_start", "target_accept", "warmup", "draws"]
    assert observe.remedies_of(runs[:1]) == []


def test_a_lane_is_the_queue_the_job_was_delivered_from():
    assert observe.lane_of("calq.cpu.batch") == "batch" and observe.lane_of("calq.gpu.batch") == "batch"
    for other in ("calq.cpu", "calq.gpu", "evil.batch", "calq.cpu.batch\x1b[2J", 3, None):
        assert observe.lane_of(other) == "interactive"


def test_recorders_keep_labels_in_their_sets_and_never_raise():
    before = sample("calq_jobs_finished_total", archetype="intermediate", state="other", lane="interactive")
    metrics.job_finished(archetype="intermediate", state="exploded", lane="interactive",
                         phase_seconds={"queued": -1.0, "teleport": 5.0, "load": 0.5}, runs=["weird"],
                         remedies=["magic"])
    assert sample("calq_jobs_finished_total", archetype="intermediate", state="other", lane="interactive") == before + 1
    assert sample("calq_job_seconds_count", archetype="intermediate", phase="teleport") == 0
    assert sample("calq_sampler_runs_total", archetype="intermediate", outcome="other") >= 1
    metrics.job_finished(archetype=None, state=None, lane=None, rows="many")  # wrong types: logged, not raised
    metrics.handed_back("stopped", done="finished")  # nothing was put back on the queue: not a hand-back
    assert sample("calq_handbacks_total", cause="stopped") == 0


@pytest.mark.integration
def test_queue_depth_sums_kombus_priority_lists_at_scrape_time(redis_url):
    client = redis.Redis.from_url(redis_url)
    lists = metrics.priority_lists(CPU_QUEUE)
    assert lists[0] == CPU_QUEUE and lists[1] == f"{CPU_QUEUE}\x06\x163" and len(lists) == 4
    for name, n in zip(lists, (2, 1, 0, 4)):
        for i in range(n):
            client.rpush(name, f"m{i}")
    text = generate_latest(metrics.registry(client, QUEUES)).decode()
    depths = {s.labels["queue"]: s.value for f in text_string_to_metric_families(text) if f.name == "calq_queue_depth"
              for s in f.samples}
    assert depths == {CPU_QUEUE: 7, GPU_QUEUE: 0}
    client.rpush(GPU_QUEUE, "one")  # read again at the next scrape, not cached
    assert "calq_queue_depth{queue=\"calq.gpu\"} 1.0" in generate_latest(metrics.registry(client, QUEUES)).decode()


def test_a_json_log_line_is_one_ascii_object_naming_the_job():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(observe.JsonFormatter())
    logger = logging.getLogger("calq.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    act = observe.activity
    saved = (act.worker, act.job_id, act.archetype, act.phase)
    try:
        act.worker, act.job_id, act.archetype, act.phase = "calq-cpu0@h", "cj-1", "road_course", "sampling"
        with bound_job_id("cj-1"):
            logger.warning("two\nlines \x1b[2J and \u202e bidi")
        logger.info("outside any job")
    finally:
        act.worker, act.job_id, act.archetype, act.phase = saved
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and all(line.isascii() for line in lines)
    first, second = (json.loads(line) for line in lines)
    assert {k: first[k] for k in ("level", "worker", "job_id", "archetype", "phase")} == {
        "level": "WARNING", "worker": "calq-cpu0@h", "job_id": "cj-1", "archetype": "road_course", "phase": "sampling"}
    assert first["message"] == "two\nlines \x1b[2J and \u202e bidi" and first["time"].endswith("+00:00")
    assert second["job_id"] is None and second["archetype"] is None


def test_the_log_format_setting_picks_the_formatter():
    assert isinstance(observe.log_formatter("%(message)s", Settings(log={"format": "json"})), observe.JsonFormatter)
    text = observe.log_formatter("%(message)s", Settings())
    assert type(text) is logging.Formatter
    with pytest.raises(ValueError):
        Settings(log={"format": "xml"})

"""Hostile values in Redis (and in the embedded store's record files): issue 16, part C.

Anyone with Redis access can write any bytes at a job record's key or in a
``latest`` slot. Each case plants one such value in a real redis-server and
checks that every reader skips it with a warning naming the key (never a
traceback, never the value's bytes, never another archetype's answer), that
``calq jobs --all`` lists it as corrupt, and that the next honest write
replaces it.
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import date
from pathlib import Path

import pytest
import redis

from producer.client import CalibrationClient
from shared.contract.errors import CorruptRecord, NotFound
from shared.contract.job import JobState
from shared.contract.settings import Settings
from shared.jobs.registry import RedisRegistry, StoreRegistry
from shared.storage.store import Store, summary_key
from tests.services import calq_environ, run_calq
from tests.test_catalog import make_summary
from tests.test_registry import make_job

pytestmark = pytest.mark.integration

#: Bytes a planted value carries; no output may ever contain them.
SECRET = "PLANTED-SECRET-7f3a"
NOT_JSON = f"{SECRET}\x1b[2J{{{{not json".encode()


@pytest.fixture
def fleet(redis_url, tmp_path):
    """A Redis registry (prefix ``calq``), a raw client, the store, and the environment of a fleet CLI."""
    store = Store(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    client = redis.Redis.from_url(redis_url)
    registry = RedisRegistry(client, holds=store.holds)
    environ = calq_environ(CALQ_BROKER_URL=redis_url, CALQ_STORAGE_URL=str(tmp_path / "store"), COLUMNS="400")
    yield registry, client, store, environ
    client.close()


def calq(environ, *args: str) -> subprocess.CompletedProcess:
    return run_calq(environ, Path.cwd(), *args, check=False, timeout=120)


def no_leak(result: subprocess.CompletedProcess) -> None:
    both = result.stdout + result.stderr
    assert "Traceback" not in both and SECRET not in both and "\x1b[2J" not in both, both[-3000:]


def plant_record(client, job_id: str, raw: bytes) -> None:
    client.set(f"calq:job:{job_id}", raw)
    client.zadd("calq:index", {job_id: 1e10})  # newest of all: the listing meets it first


def bad_records(registry, client) -> dict[str, str]:
    """Three corrupt records (not JSON, unknown state, another job's) beside one good succeeded one: {id: why}."""
    good = make_job(seed=1)
    registry.claim(good)
    registry.mark_running(good.job_id, worker="w")
    registry.fail(good.job_id, "planted for the listing")
    other = make_job(seed=2)
    registry.claim(other)
    exploded, wrong, garbage = (make_job(seed=s).job_id for s in (3, 4, 5))
    record = json.loads(client.get(f"calq:job:{other.job_id}"))
    plant_record(client, garbage, NOT_JSON)
    plant_record(client, exploded, json.dumps({**record, "job_id": exploded, "state": "exploded",
                                               "reason": SECRET}).encode())
    plant_record(client, wrong, json.dumps({**record, "reason": SECRET}).encode())  # other's record at wrong's key
    return {garbage: "not JSON", exploded: "fails the schema (state)", wrong: "the record is of another job"}


# -- records ---------------------------------------------------------------------------


def test_corrupt_records_are_skipped_by_the_listing_and_named_by_get(fleet):
    registry, client, _, _ = fleet
    bad = bad_records(registry, client)
    listed = registry.jobs(limit=None)
    assert {r.job_id for r in listed} == {make_job(seed=1).job_id, make_job(seed=2).job_id}
    assert [r.state for r in registry.jobs(state="failed")] == [JobState.FAILED]
    for job_id, why in bad.items():
        assert registry.find(job_id) is None
        with pytest.raises(CorruptRecord, match=re.escape(f"calq:job:{job_id} is corrupt ({why})")) as caught:
            registry.get(job_id)
        assert SECRET not in str(caught.value)
        with pytest.raises(CorruptRecord):
            registry.cancel(job_id)
    assert {(c.key, c.why) for c in registry.corrupt()} == {(f"calq:job:{i}", why) for i, why in bad.items()}


def test_calq_jobs_status_and_cancel_survive_corrupt_records(fleet):
    registry, client, _, environ = fleet
    bad = bad_records(registry, client)
    for args in (["jobs"], ["jobs", "--state", "failed"], ["jobs", "--state", "succeeded"]):
        result = calq(environ, *args)
        assert result.returncode == 0, result.stderr[-3000:]
        no_leak(result)
    listing = calq(environ, "jobs", "--all", "--json")
    assert listing.returncode == 0, listing.stderr[-3000:]
    no_leak(listing)
    shown = json.loads(listing.stdout)
    assert {j["job_id"] for j in shown["jobs"]} == {make_job(seed=1).job_id, make_job(seed=2).job_id}
    assert {(c["key"], c["why"]) for c in shown["corrupt"]} == {(f"calq:job:{i}", w) for i, w in bad.items()}
    table = calq(environ, "jobs", "--all")
    assert table.returncode == 0 and "not JSON" in table.stdout and "corrupt" in table.stdout
    no_leak(table)
    for job_id in bad:
        for args in (["status", job_id], ["cancel", job_id]):
            result = calq(environ, *args)
            assert result.returncode == 1, (args, result.stderr[-3000:])
            said = " ".join(result.stderr.split())
            assert f"calq:job:{job_id} is corrupt" in said and "submitting the job again replaces it" in said
            no_leak(result)
    assert client.get(f"calq:job:{next(iter(bad))}") == NOT_JSON  # a read never rewrites anything


def test_a_corrupt_record_never_blocks_a_resubmission(fleet):
    registry, client, _, _ = fleet
    job = make_job(seed=7)
    plant_record(client, job.job_id, NOT_JSON)
    record, enqueue = registry.claim(job)
    assert enqueue and record.state is JobState.QUEUED
    assert registry.get(job.job_id) == record and registry.corrupt() == []


def test_a_worker_finishing_into_a_corrupt_record_repairs_it(fleet):
    registry, client, store, _ = fleet
    job = make_job(seed=8)
    registry.claim(job)
    registry.mark_running(job.job_id, worker="w")
    client.set(f"calq:job:{job.job_id}", b'{"job_id": "' + job.job_id.encode() + b'", "state": "exploded"}')
    assert registry.mark_running(job.job_id, worker="w2") is None  # the corrupt record is no record to move
    summary = make_summary(job.job_id, store=store)
    done = registry.succeed(job.job_id, summary)
    assert done is not None and done.state is JobState.SUCCEEDED and registry.get(job.job_id) == done
    assert registry.latest("intermediate", "top_5").job_id == job.job_id


def test_an_index_entry_with_control_characters_is_named_escaped(fleet, caplog):
    registry, client, _, _ = fleet
    client.set("calq:job:\x1b]8;;x\x07evil", NOT_JSON)
    client.zadd("calq:index", {"\x1b]8;;x\x07evil": 1e10})
    assert registry.jobs() == []
    (corrupt,) = registry.corrupt()
    assert "\x1b" not in corrupt.key and "\\x1b" in corrupt.key and corrupt.why == "not JSON"
    assert "\x1b" not in caplog.text and SECRET not in caplog.text


# -- latest pointers ----------------------------------------------------------------------


def good_pointer(store, client, archetype: str = "road_course", job_seed: int = 20) -> str:
    """A real converged summary of ``archetype`` in the store, with its latest pointer: its job id."""
    registry = RedisRegistry(client, holds=store.holds)
    job_id = make_job(seed=job_seed, archetype=archetype).job_id
    summary = make_summary(job_id, archetype=archetype, store=store, data_through=date(2024, 5, 1))
    assert registry.update_latest(summary)
    return job_id


def bad_pointers(store, client) -> dict[str, str]:
    """A corrupt pointer of every kind in the superspeedway slots: {field: why}."""
    road = good_pointer(store, client)
    pointer = json.loads(client.hget("calq:latest", "road_course:top_5"))
    outside = {**pointer, "archetype": "superspeedway", "event": "top_10",
               "summary_uri": f"file:///elsewhere/{summary_key('superspeedway', road)}",
               "posterior_uri": f"file:///elsewhere/posteriors/superspeedway/{road}.nc"}
    planted = {
        "superspeedway:top_1": (NOT_JSON, "not JSON"),
        "superspeedway:top_5": (json.dumps({**pointer, "archetype": "superspeedway"}),
                                "the pointer names another job's or another archetype's summary"),
        "superspeedway:top_10": (json.dumps(outside), "the pointer names a summary outside the store"),
        "superspeedway:top_15": (json.dumps({**pointer, "archetype": "superspeedway", "event": "top_15",
                                             "summary_uri": None}),
                                 "the pointer names no summary or no posterior"),
        "superspeedway:top_20": (json.dumps({**pointer, "archetype": "superspeedway", "event": "top_5"}),
                                 "the pointer names another archetype or event than its slot"),
    }
    client.hset("calq:latest", mapping={field: raw for field, (raw, _) in planted.items()})
    return {field: why for field, (_, why) in planted.items()}


def test_corrupt_pointers_are_skipped_and_listed(fleet):
    registry, client, store, _ = fleet
    bad = bad_pointers(store, client)
    assert set(registry.latest_all()) == {("road_course", "top_5")}
    for field in bad:
        assert registry.latest(*field.split(":")) is None
    assert {(c.key, c.why) for c in registry.corrupt()} == {(f"calq:latest[{f}]", why) for f, why in bad.items()}


def test_calq_latest_and_report_never_answer_with_another_archetype(fleet, tmp_path):
    _, client, store, environ = fleet
    bad_pointers(store, client)
    for args in (["latest", "superspeedway"], ["latest", "superspeedway", "--event", "top_5"],
                 ["report", "--latest", "--archetype", "superspeedway", "--md", str(tmp_path / "r.md")]):
        result = calq(environ, *args)
        assert result.returncode == 1, (args, result.stdout[-2000:], result.stderr[-3000:])
        assert "no converged calibration" in result.stderr and "road_course" not in result.stdout
        no_leak(result)
    ok = calq(environ, "latest", "road_course", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["archetype"] == "road_course", ok.stderr[-3000:]


def test_client_calibrate_refuses_a_corrupt_slot(fleet, redis_url):
    _, client, store, _ = fleet
    bad_pointers(store, client)
    settings = Settings(broker_url=redis_url, storage_url=store.url)
    calq_client = CalibrationClient(settings, store=store)
    with pytest.raises(NotFound, match="no converged calibration for superspeedway / top_5"):
        calq_client.calibrate("superspeedway", None, "top_5", [0.2, 0.4])


def test_a_job_finishing_into_a_corrupt_slot_repairs_it(fleet):
    registry, client, store, _ = fleet
    client.hset("calq:latest", "intermediate:top_5", NOT_JSON)
    job = make_job(seed=30)
    registry.claim(job)
    registry.mark_running(job.job_id, worker="w")
    done = registry.succeed(job.job_id, make_summary(job.job_id, store=store))
    assert done.state is JobState.SUCCEEDED
    assert registry.latest("intermediate", "top_5").job_id == job.job_id and registry.corrupt() == []


# -- the embedded registry: the same rules for files in the store ---------------------------------


def test_embedded_records_and_pointers_that_do_not_parse_are_skipped_and_replaced(tmp_path):
    store = Store(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    registry = StoreRegistry(store, holds=store.holds)
    job = make_job(seed=40)
    store.put_bytes(f"jobs/{job.job_id}.json", NOT_JSON)
    store.put_bytes("latest/intermediate/top_5.json", NOT_JSON)
    store.put_bytes("deliveries/" + job.job_id + ".json", NOT_JSON)
    assert registry.jobs() == [] and registry.latest_all() == {}
    assert {c.why for c in registry.corrupt()} == {"not JSON"} and len(registry.corrupt()) == 2
    with pytest.raises(CorruptRecord):
        registry.get(job.job_id)
    record, enqueue = registry.claim(job)
    assert enqueue and record.state is JobState.QUEUED
    assert registry.record_delivery(job.job_id) == 1
    registry.mark_running(job.job_id, worker="w")
    assert registry.succeed(job.job_id, make_summary(job.job_id, store=store)).state is JobState.SUCCEEDED
    assert registry.latest("intermediate", "top_5").job_id == job.job_id and registry.corrupt() == []

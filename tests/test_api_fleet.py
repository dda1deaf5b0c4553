"""The whole loop over HTTP: a producer with only a token, a real API, a real worker, a real Redis.

The producer's commands run as ``calq`` subprocesses whose environment holds
``CALQ_API__URL`` and ``CALQ_API__TOKEN`` and no ``CALQ_BROKER_URL``, store
URL or S3 key: upload, submit, wait, latest, calibrate (``calq apply`` and
``POST /v1/calibrate``), report. The worker is bench/faults.py's launcher
(``python -m worker``), the API runs on a thread of this process; each
connects to Redis as its own ACL user from ``calq acl`` (:mod:`shared.jobs.acl`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from producer.api.app import ApiContext, create_app
from producer.api.server import in_background
from shared.contract.settings import Settings
from shared.contract.summary import CalibrationSummary
from shared.data.dataset import save_dataset
from shared.data.synth import synthesize
from shared.jobs.acl import acl_rules, setuser_args
from tests.services import Worker, calq_environ, convergence_environ, free_port, run_calq

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SAMPLER = ["--warmup", "100", "--samples", "150", "--chains", "2"]

#: The endpoints of issue 19, the API's whole surface: a producer's token reaches nothing else.
CONTRACT = {
    ("GET", "/healthz"), ("PUT", "/v1/datasets/{sha256}"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{job_id}"), ("POST", "/v1/jobs/{job_id}/cancel"), ("GET", "/v1/jobs/{job_id}/summary"),
    ("GET", "/v1/jobs/{job_id}/posterior"), ("GET", "/v1/jobs/{job_id}/report"), ("GET", "/v1/latest/{archetype}"),
    ("POST", "/v1/calibrate"), ("POST", "/v1/reindex"), ("GET", "/v1/fleet"),
}


@pytest.fixture(scope="module")
def acl_users(redis_server):
    """The worker and api users of ``calq acl`` on the test server (its default user stays on for other tests)."""
    import redis

    admin = redis.Redis.from_url(redis_server.url)
    admin.flushall()
    passwords = {"worker": "worker-secret", "api": "api-secret"}
    for line in acl_rules(passwords)[1:]:
        admin.execute_command("ACL", "SETUSER", *setuser_args(line))
    yield {name: f"redis://{name}:{pw}@{redis_server.host}:{redis_server.port}/0" for name, pw in passwords.items()}
    admin.execute_command("ACL", "DELUSER", *passwords)
    admin.close()


@pytest.fixture(scope="module")
def fleet(acl_users, tmp_path_factory):
    """A worker and the API, each as its ACL user, on one Redis and store: ``(url, ctx, producer_env, producer_dir)``."""
    root = tmp_path_factory.mktemp("api-fleet")
    store = root / "store"
    fleet_env = calq_environ(CALQ_BROKER_URL=acl_users["worker"], CALQ_STORAGE_URL=str(store), CALQ_WARM_START="false",
                             **convergence_environ())
    worker = Worker(fleet_env, root / "worker.log", children=1)
    settings = Settings(broker_url=acl_users["api"], storage_url=str(store), compile_cache_dir=None)
    ctx = ApiContext.from_settings(settings)
    producer_dir = root / "producer"
    producer_dir.mkdir()
    try:
        with in_background(create_app(ctx=ctx), port=free_port()) as url:
            secret, _ = ctx.tokens.create("optimizer", role="producer")
            producer_env = calq_environ(CALQ_API__URL=url, CALQ_API__TOKEN=secret)
            worker.wait_ready(180)
            yield url, ctx, producer_env, producer_dir
    finally:
        worker.stop(120)


def calq(fleet, *args, check=True) -> subprocess.CompletedProcess:
    _, _, environ, cwd = fleet
    return run_calq(environ, cwd, *args, check=check)


@pytest.fixture(scope="module")
def finished(fleet):
    """Upload + submit + wait, through the CLI with only a token: the job's summary."""
    _, _, _, cwd = fleet
    dataset = save_dataset(synthesize(seasons=1, scenarios=200, seed=5), cwd / "season.nc")
    submitted = calq(fleet, "submit", str(dataset), "--archetype", "intermediate", "--events", "top_5,top_10",
                     *SAMPLER, "--json")
    job_id = json.loads(submitted.stdout)["job_id"]
    waited = calq(fleet, "wait", job_id, "--timeout", "400", "--json")
    return CalibrationSummary.model_validate_json(waited.stdout)


def test_the_producer_environment_holds_a_token_and_nothing_of_the_fleet(fleet):
    _, _, environ, _ = fleet
    assert not {k for k in environ if k.startswith("CALQ_")} - {"CALQ_API__URL", "CALQ_API__TOKEN", "CALQ_COMPILE_CACHE_DIR"}


def test_upload_submit_wait_latest_over_http_with_a_worker(fleet, finished):
    _, _, _, cwd = fleet
    assert finished.converged and finished.archetype == "intermediate"
    record = json.loads(calq(fleet, "status", finished.job_id, "--json").stdout)
    assert record["state"] == "succeeded" and record["worker"].startswith("calq-cpu0@")
    latest = CalibrationSummary.model_validate_json(calq(fleet, "latest", "intermediate", "--event", "top_5", "--json").stdout)
    assert latest.job_id == finished.job_id
    assert [j["job_id"] for j in json.loads(calq(fleet, "jobs", "--json").stdout)] == [finished.job_id]
    assert not (cwd / "calq-store").exists()  # the producer wrote no store of its own


def test_calibrate_over_http_agrees_with_calq_apply_and_borrows_for_an_unseen_track(fleet, finished):
    url, _, environ, _ = fleet
    p = [0.05, 0.2, 0.5]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {environ['CALQ_API__TOKEN']}"}) as client:
        known = client.post("/v1/calibrate", json={"archetype": "intermediate", "track": "Kansas", "event": "top_5", "p": p}).json()
        unseen = client.post("/v1/calibrate", json={"archetype": "intermediate", "track": "Nowhere Speedway",
                                                    "event": "top_5", "p": p}).json()
        out_of_range = client.post("/v1/calibrate", json={"archetype": "intermediate", "event": "top_5", "p": [1.5]})
        no_fit = client.post("/v1/calibrate", json={"archetype": "road_course", "event": "top_5", "p": p})
        wrong_case = client.post("/v1/calibrate", json={"archetype": "intermediate", "track": "kansas", "event": "top_5", "p": p})
    assert known["job_id"] == unseen["job_id"] == finished.job_id
    applied = json.loads(calq(fleet, "apply", finished.posterior_uri, "--event", "top_5", "--p", "0.05,0.2,0.5",
                              "--track", "Kansas", "--json").stdout)
    np.testing.assert_allclose(known["q_mean"], [r["mean"] for r in applied], rtol=1e-9)
    np.testing.assert_allclose(known["q_low"], [r["low"] for r in applied], rtol=1e-9)
    borrowed = json.loads(calq(fleet, "apply", finished.posterior_uri, "--event", "top_5", "--p", "0.05,0.2,0.5",
                               "--track", "Nowhere Speedway", "--archetype", "intermediate", "--json").stdout)
    np.testing.assert_allclose(unseen["q_mean"], [r["mean"] for r in borrowed], rtol=1e-9)  # the archetype's new track
    assert unseen["q_mean"] != known["q_mean"] and (known["track_seen"], unseen["track_seen"]) == (True, False)
    assert out_of_range.status_code == 422 and out_of_range.json()["detail"] == "p must be a list of probabilities in [0, 1]"
    assert no_fit.status_code == 404
    assert wrong_case.status_code == 422 and "Kansas" in wrong_case.json()["detail"]  # a typo never borrows silently


def test_report_of_a_job_over_http(fleet, finished):
    url, _, environ, cwd = fleet
    calq(fleet, "report", "--job", finished.job_id, "--html", str(cwd / "report.html"))
    assert finished.job_id in (cwd / "report.html").read_text()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {environ['CALQ_API__TOKEN']}"}, timeout=300) as client:
        page = client.get(f"/v1/jobs/{finished.job_id}/report")
        posterior = client.get(f"/v1/jobs/{finished.job_id}/posterior")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and finished.job_id in page.text
    assert posterior.content[:4] == b"\x89HDF"


def test_the_calibrate_cache_follows_latest(fleet, finished):
    """A newer converged fit moves latest: the next calibrate answers from it, not from the draws in memory."""
    _, ctx, _, cwd = fleet
    before = ctx.calibrations.calibrate("intermediate", "Kansas", "top_5", [0.2])
    newer = calq(fleet, "submit", str(cwd / "season.nc"), "--archetype", "intermediate", "--events", "top_5,top_10",
                 *SAMPLER, "--seed", "7", "--json")
    job_id = json.loads(newer.stdout)["job_id"]
    calq(fleet, "wait", job_id, "--timeout", "400", "--json")
    pointer = ctx.client.registry.latest("intermediate", "top_5")
    after = ctx.calibrations.calibrate("intermediate", "Kansas", "top_5", [0.2])
    assert before[0] == finished.job_id and after[0] == pointer.job_id
    if pointer.job_id != finished.job_id:  # same data, later created: latest moved
        assert finished.job_id not in {k[0] for k in ctx.calibrations._draws}


def test_a_producer_token_reaches_nothing_but_the_contract(fleet, finished):
    """The route table is exactly the contract; every other path or method is a 404 or 405, operator ones a 403."""
    url, ctx, environ, _ = fleet
    paths = create_app(ctx=ctx, feed=False).openapi()["paths"]
    assert {(method.upper(), path) for path, methods in paths.items() for method in methods} == CONTRACT
    job = finished.job_id
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {environ['CALQ_API__TOKEN']}"}) as client:
        for method, path in (("PUT", f"/v1/jobs/{job}"), ("DELETE", f"/v1/jobs/{job}"), ("PATCH", f"/v1/jobs/{job}"),
                             ("PUT", "/v1/latest/intermediate"), ("DELETE", "/v1/latest/intermediate"),
                             ("PUT", f"/v1/jobs/{job}/summary"), ("PUT", f"/v1/jobs/{job}/posterior"),
                             ("GET", "/v1/leases"), ("PUT", f"/v1/leases/{job}"), ("GET", "/v1/store/datasets"),
                             ("DELETE", "/v1/datasets/" + "0" * 64), ("GET", "/v1/datasets/" + "0" * 64)):
            answer = client.request(method, path, content=b"{}")
            assert answer.status_code in (404, 405), (method, path, answer.status_code)
        assert client.post("/v1/reindex").status_code == 403 and client.get("/v1/fleet").status_code == 403
        # a succeeded job cannot be cancelled into another state, even by its owner
        cancelled = client.post(f"/v1/jobs/{job}/cancel").json()
    assert not cancelled["changed"] and cancelled["job"]["state"] == "succeeded"
    assert ctx.client.status(job).state.value == "succeeded"


def test_an_operator_token_reindexes_and_sees_the_fleet_through_the_api_user(fleet, finished):
    """The operator endpoints work under the API's Redis ACL user: reindex rewrites pointers, fleet reads heartbeats."""
    url, ctx, _, _ = fleet
    secret, _ = ctx.tokens.create("ops", role="operator")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=120) as client:
        reindexed = client.post("/v1/reindex")
        fleet_view = client.get("/v1/fleet").json()
    assert reindexed.status_code == 200 and reindexed.json()["pointers"] >= 2
    assert ctx.client.registry.latest("intermediate", "top_5") is not None
    assert [w["worker"] for w in fleet_view["workers"]] and set(fleet_view["queues"]) >= {"calq.cpu", "calq.cpu.batch"}


def test_bad_requests_with_a_worker_running_get_clear_errors_and_lose_nothing(fleet, finished):
    """Each hostile request is refused with its reason; no record, message or dataset appears, the worker goes on."""
    import hashlib

    url, ctx, environ, cwd = fleet
    registry, store = ctx.client.registry, ctx.client.store
    jobs_before = [r.job_id for r in registry.jobs(limit=None)]
    datasets_before = sorted(store.list("datasets"))
    revoked, _ = ctx.tokens.create("leaver", role="producer")
    ctx.tokens.revoke("leaver")
    data = (cwd / "season.nc").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    job = {"dataset_sha256": sha, "archetype": "intermediate", "events": ["top_5"]}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {environ['CALQ_API__TOKEN']}"}, timeout=60) as client:
        answers = {
            "malformed JSON": client.post("/v1/jobs", content=b"{'archetype':", headers={"Content-Type": "application/json"}),
            "wrong type": client.post("/v1/jobs", json={**job, "window_days": "ten"}),
            "huge body": client.post("/v1/jobs", json={**job, "events": ["top_5"] * 200_000}),
            "bytes not at their hash": client.put(f"/v1/datasets/{'0' * 64}", content=data),
            "unknown archetype": client.post("/v1/jobs", json={**job, "archetype": "dirt_track"}),
            "unknown event": client.post("/v1/jobs", json={**job, "events": ["podium"]}),
            "revoked token": client.get("/v1/jobs", headers={"Authorization": f"Bearer {revoked}"}),
        }
    expected = {"malformed JSON": (422, "the body is not valid JSON"), "wrong type": (422, "window_days"),
                "huge body": (413, "api.max_body_bytes"), "bytes not at their hash": (422, "do not hash to " + "0" * 64),
                "unknown archetype": (422, "archetype"), "unknown event": (422, "podium"),
                "revoked token": (401, "unknown or revoked")}
    for case, (status, says) in expected.items():
        answer = answers[case]
        assert answer.status_code == status and says in answer.json()["detail"], (case, answer.status_code, answer.text[:300])
    assert [r.job_id for r in registry.jobs(limit=None)] == jobs_before
    assert sorted(store.list("datasets")) == datasets_before
    assert registry.redis.llen("calq.cpu") == 0 and registry.redis.llen("calq.cpu.batch") == 0
    assert json.loads(calq(fleet, "status", finished.job_id, "--json").stdout)["state"] == "succeeded"

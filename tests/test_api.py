"""The calibration API over real HTTP: a uvicorn server on a free port, a real redis-server, a local store.

No worker runs here: these tests cover what the API decides itself (tokens,
roles, bodies, quotas, ownership, lanes) and that a refused request loses
nothing and leaves nothing behind. The whole loop with a worker is
tests/test_api_fleet.py.
"""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
import redis

from producer.api.app import ApiContext, create_app
from producer.api.remote import NoDirectAccess, RemoteClient
from producer.api.server import in_background
from producer.client import CalibrationClient
from shared.contract.errors import AuthenticationFailed, InvalidJob, OverQuota
from shared.contract.job import JobState
from shared.contract.settings import ApiSettings, DataLimits, Settings
from tests.services import calq_environ, free_port, run_calq, season_file

pytestmark = pytest.mark.integration

SAMPLER = {"warmup": 50, "samples": 50, "chains": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return season_file(tmp_path_factory.mktemp("api-data"), scenarios=40, seed=2)


@pytest.fixture
def api(redis_url, tmp_path):
    """A running API over an empty Redis and store: ``(url, ctx)``; the batch feeder is off (tests drive it)."""
    settings = Settings(broker_url=redis_url, storage_url=str(tmp_path / "store"), compile_cache_dir=None,
                        api=ApiSettings(max_body_bytes=64_000))
    ctx = ApiContext.from_settings(settings)
    with in_background(create_app(ctx=ctx, feed=False), port=free_port()) as url:
        yield url, ctx


def token(ctx, name, **options) -> str:
    return ctx.tokens.create(name, **{"role": "producer", **options})[0]


def http(url, secret=None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def upload(client: httpx.Client, path) -> str:
    digest = sha(path)
    assert client.put(f"/v1/datasets/{digest}", content=path.read_bytes()).status_code in (200, 201)
    return digest


def job_body(digest, **over):
    return {"dataset_sha256": digest, "archetype": "intermediate", "events": ["top_5"], "sampler": SAMPLER, **over}


def nothing_recorded(ctx):
    return ctx.client.registry.jobs(limit=None) == [] and ctx.client.registry.redis.llen("calq.cpu") == 0


# -- auth ----------------------------------------------------------------------------------


def test_healthz_needs_no_token_and_everything_else_does(api):
    url, _ = api
    with http(url) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/openapi.json").status_code == 200
        for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/jobs/cj-000000000000000000000000"),
                             ("POST", "/v1/jobs"), ("GET", "/v1/latest/intermediate"), ("POST", "/v1/calibrate"),
                             ("PUT", "/v1/datasets/" + "0" * 64), ("POST", "/v1/reindex"), ("GET", "/v1/fleet")):
            answer = anonymous.request(method, path, json={})
            assert answer.status_code == 401, (method, path)
            assert answer.json()["error"] == "unauthenticated" and answer.headers["WWW-Authenticate"] == "Bearer"
    with http(url, "calq_" + "x" * 43) as forged:
        assert forged.get("/v1/jobs").status_code == 401


def test_a_revoked_token_is_refused_at_once(api):
    url, ctx = api
    secret = token(ctx, "optimizer")
    with http(url, secret) as client:
        assert client.get("/v1/jobs").status_code == 200
        ctx.tokens.revoke("optimizer")
        answer = client.get("/v1/jobs")
    assert answer.status_code == 401 and answer.json()["detail"] == "the token is unknown or revoked"


def test_a_producer_token_gets_403_from_operator_endpoints(api):
    url, ctx = api
    with http(url, token(ctx, "optimizer")) as producer, http(url, token(ctx, "ops", role="operator")) as operator:
        for method, path in (("POST", "/v1/reindex"), ("GET", "/v1/fleet")):
            answer = producer.request(method, path)
            assert answer.status_code == 403 and "operator token" in answer.json()["detail"]
        assert operator.post("/v1/reindex").json() == {"pointers": 0, "repaired": 0, "requeued": 0, "resent": 0}
        fleet = operator.get("/v1/fleet").json()
    assert set(fleet["queues"]) == {"calq.gpu", "calq.cpu", "calq.gpu.batch", "calq.cpu.batch"}


def test_only_the_hash_of_a_token_is_stored(api):
    _, ctx = api
    secret = token(ctx, "optimizer")
    r = ctx.client.registry.redis
    stored = b"".join(k + b"".join(r.hvals(k)) for k in r.keys("*") if r.type(k) == b"hash")
    assert secret.encode() not in stored
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored


# -- datasets --------------------------------------------------------------------------------


def test_a_dataset_is_stored_once_at_its_hash(api, dataset):
    url, ctx = api
    digest = sha(dataset)
    with http(url, token(ctx, "optimizer")) as client:
        first = client.put(f"/v1/datasets/{digest}", content=dataset.read_bytes())
        again = client.put(f"/v1/datasets/{digest}", content=dataset.read_bytes())
    assert (first.status_code, first.json()["created"]) == (201, True)
    assert (again.status_code, again.json()["created"]) == (200, False)
    assert ctx.client.store.get_bytes(ctx.client.store.dataset_uri(digest)) == dataset.read_bytes()


def test_bytes_that_do_not_hash_to_their_address_are_refused_and_not_stored(api, dataset):
    url, ctx = api
    wrong = "ab" * 32
    with http(url, token(ctx, "optimizer")) as client:
        answer = client.put(f"/v1/datasets/{wrong}", content=dataset.read_bytes())
        bad_address = client.put("/v1/datasets/not-a-hash", content=dataset.read_bytes())
    assert answer.status_code == 422 and answer.json()["detail"].startswith("the body's bytes do not hash to " + wrong)
    assert sha(dataset) not in answer.text  # the actual hash is never said
    assert bad_address.status_code == 422
    assert not ctx.client.store.exists(ctx.client.store.dataset_uri(wrong))
    assert not ctx.client.store.exists(ctx.client.store.dataset_uri(sha(dataset)))


def test_bytes_that_are_not_netcdf_are_refused_by_the_header_checks_before_the_store(api):
    url, ctx = api
    body = b"\x89HDF\r\n\x1a\n" + b"\0" * 100  # the HDF5 signature, and nothing a reader can use
    digest = hashlib.sha256(body).hexdigest()
    with http(url, token(ctx, "optimizer")) as client:
        answer = client.put(f"/v1/datasets/{digest}", content=body)
    assert answer.status_code == 422 and answer.json()["detail"].startswith(f"invalid calibration dataset (dataset {digest})")
    assert not ctx.client.store.exists(ctx.client.store.dataset_uri(digest))


def test_a_dataset_over_the_size_limit_is_cut_off_while_it_streams(redis_url, tmp_path, dataset):
    settings = Settings(broker_url=redis_url, storage_url=str(tmp_path / "store"), compile_cache_dir=None,
                        limits=DataLimits(max_decoded_bytes=10_000))
    ctx = ApiContext.from_settings(settings)
    with in_background(create_app(ctx=ctx, feed=False), port=free_port()) as url, http(url, token(ctx, "o")) as client:
        answer = client.put(f"/v1/datasets/{sha(dataset)}", content=iter([dataset.read_bytes()[i:i + 4096]
                                                                           for i in range(0, 40_000, 4096)]))
    assert answer.status_code == 413 and "limits.max_decoded_bytes" in answer.json()["detail"]
    assert not ctx.client.store.exists(ctx.client.store.dataset_uri(sha(dataset)))


# -- bad job requests lose nothing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "body", "field", "says"),
    [
        ("malformed JSON", b'{"archetype": "intermediate",', None, "the body is not valid JSON"),
        ("wrong type", {"dataset_sha256": 5, "archetype": "intermediate"}, "dataset_sha256", "valid string"),
        ("unknown field", {"dataset_sha256": "a" * 64, "archetype": "intermediate", "priority": 1}, "priority", "Extra inputs"),
        ("unknown archetype", {"dataset_sha256": "DATA", "archetype": "oval"}, "archetype", "should be 'superspeedway'"),
        ("unknown event", {"dataset_sha256": "DATA", "archetype": "intermediate", "events": ["top_0"]}, "events", "top_0"),
        ("unknown lane", {"dataset_sha256": "DATA", "archetype": "intermediate", "lane": "urgent"}, "lane", "interactive"),
        ("sampler out of range", {"dataset_sha256": "DATA", "archetype": "intermediate", "sampler": {"chains": 0}},
         "sampler.chains", "greater than or equal to 1"),
    ],
)
def test_a_bad_job_request_is_a_422_naming_the_field_and_records_nothing(api, dataset, case, body, field, says):
    url, ctx = api
    with http(url, token(ctx, "optimizer")) as client:
        digest = upload(client, dataset)
        if isinstance(body, dict):
            body = json.dumps({k: (digest if v == "DATA" else v) for k, v in body.items()}).encode()
        answer = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    problem = answer.json()
    assert answer.status_code == 422 and problem["error"] == "invalid", case
    assert says in problem["detail"], (case, problem)
    if field is not None:
        assert field in [f["field"] for f in problem["fields"]] or field in problem["detail"], (case, problem)
    assert nothing_recorded(ctx)


def test_a_job_on_a_dataset_never_uploaded_is_refused(api):
    url, ctx = api
    with http(url, token(ctx, "optimizer")) as client:
        answer = client.post("/v1/jobs", json=job_body("c" * 64))
    missing = "c" * 64
    assert answer.status_code == 422 and answer.json()["detail"] == f"no dataset {missing} is stored: PUT /v1/datasets/{missing} first"
    assert nothing_recorded(ctx)


def test_a_huge_body_is_a_413_before_it_is_parsed(api):
    url, ctx = api
    with http(url, token(ctx, "optimizer")) as client:
        declared = client.post("/v1/jobs", content=b"{" + b" " * 100_000 + b"}", headers={"Content-Type": "application/json"})
        chunked = client.post("/v1/calibrate", content=iter([b"[" + b"0.5," * 10_000] * 4),
                              headers={"Content-Type": "application/json"})
    for answer in (declared, chunked):
        assert answer.status_code == 413 and "api.max_body_bytes" in answer.json()["detail"]
    assert nothing_recorded(ctx)


def test_lookups_of_unknown_things_are_clear(api):
    url, ctx = api
    with http(url, token(ctx, "optimizer")) as client:
        assert client.get("/v1/jobs/cj-000000000000000000000000").status_code == 404
        assert client.get("/v1/jobs", params={"state": "done"}).json()["detail"].startswith("state must be one of")
        assert client.get("/v1/latest/oval").status_code == 422
        assert client.get("/v1/latest/intermediate").json()["detail"] == "no converged calibration for intermediate yet"
        calibrate = client.post("/v1/calibrate", json={"archetype": "intermediate", "event": "top_5", "p": [0.1]})
        bad_event = client.post("/v1/calibrate", json={"archetype": "intermediate", "event": "win", "p": [0.1]})
    assert calibrate.status_code == 404 and bad_event.status_code == 422


# -- submitting, quotas, ownership ------------------------------------------------------------


def test_submit_is_202_then_200_and_the_message_goes_to_the_interactive_queue(api, dataset):
    url, ctx = api
    with http(url, token(ctx, "optimizer")) as client:
        digest = upload(client, dataset)
        first = client.post("/v1/jobs", json=job_body(digest))
        again = client.post("/v1/jobs", json=job_body(digest))
        record = client.get(f"/v1/jobs/{first.json()['job_id']}").json()
        listed = client.get("/v1/jobs", params={"state": "queued", "archetype": "intermediate"}).json()
    assert first.status_code == 202 and first.json()["state"] == "queued" and first.json()["lane"] == "interactive"
    assert again.status_code == 200 and again.json()["job_id"] == first.json()["job_id"]
    assert record["state"] == "queued" and [r["job_id"] for r in listed] == [record["job_id"]]
    assert ctx.client.registry.redis.llen("calq.cpu") == 1  # sent once
    assert ctx.admission.owner(record["job_id"]) == "optimizer"


def test_over_the_queued_quota_is_a_429_with_retry_after_and_the_job_is_not_recorded(api, dataset):
    url, ctx = api
    with http(url, token(ctx, "optimizer", max_queued=1)) as client:
        digest = upload(client, dataset)
        first = client.post("/v1/jobs", json=job_body(digest))
        refused = client.post("/v1/jobs", json=job_body(digest, sampler={**SAMPLER, "seed": 1}))
        same_again = client.post("/v1/jobs", json=job_body(digest))  # the job it has is no new job
        client.post(f"/v1/jobs/{first.json()['job_id']}/cancel")
        after_cancel = client.post("/v1/jobs", json=job_body(digest, sampler={**SAMPLER, "seed": 1}))
    assert first.status_code == 202 and same_again.status_code == 200
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "30"
    assert "quota" in refused.json()["detail"]
    assert after_cancel.status_code == 202  # a finished job frees its slot
    ids = {r.job_id: r.state for r in ctx.client.registry.jobs(limit=None)}
    assert sorted(s.value for s in ids.values()) == ["cancelled", "queued"]


def test_a_job_larger_than_the_token_may_ask_for_is_a_429_without_retry_after(api, dataset):
    url, ctx = api
    with http(url, token(ctx, "optimizer", max_draws=150)) as client:
        digest = upload(client, dataset)
        answer = client.post("/v1/jobs", json=job_body(digest))  # 2 × (50 + 50) = 200 draws
    assert answer.status_code == 429 and "Retry-After" not in answer.headers
    assert answer.json()["detail"].startswith("the job asks for 200 draws")
    assert nothing_recorded(ctx)


def test_a_producer_cancels_only_its_own_jobs_and_an_operator_any(api, dataset):
    url, ctx = api
    with http(url, token(ctx, "alice")) as alice, http(url, token(ctx, "bob")) as bob, \
            http(url, token(ctx, "ops", role="operator")) as ops:
        digest = upload(alice, dataset)
        mine = alice.post("/v1/jobs", json=job_body(digest)).json()["job_id"]
        other = alice.post("/v1/jobs", json=job_body(digest, sampler={**SAMPLER, "seed": 3})).json()["job_id"]
        refused = bob.post(f"/v1/jobs/{mine}/cancel")
        assert ctx.client.status(mine).state is JobState.QUEUED
        assert bob.post("/v1/jobs", json=job_body(digest)).status_code == 200  # bob submitting it does not make it his
        assert bob.post(f"/v1/jobs/{mine}/cancel").status_code == 403
        own = alice.post(f"/v1/jobs/{mine}/cancel").json()
        by_operator = ops.post(f"/v1/jobs/{other}/cancel").json()
    assert refused.status_code == 403 and "only an operator" in refused.json()["detail"]
    assert own["changed"] and own["job"]["state"] == "cancelled"
    assert by_operator["changed"] and by_operator["job"]["state"] == "cancelled"


# -- lanes ---------------------------------------------------------------------------------------


def test_batch_jobs_of_two_tokens_reach_the_workers_round_robin(api, dataset):
    url, ctx = api
    with http(url, token(ctx, "backfill")) as heavy, http(url, token(ctx, "notebook")) as light:
        digest = upload(heavy, dataset)
        heavy_ids = [heavy.post("/v1/jobs", json=job_body(digest, lane="batch", sampler={**SAMPLER, "seed": s})).json()["job_id"]
                     for s in range(6)]
        light_id = light.post("/v1/jobs", json=job_body(digest, lane="batch", sampler={**SAMPLER, "seed": 99})).json()["job_id"]
        interactive = light.post("/v1/jobs", json=job_body(digest, sampler={**SAMPLER, "seed": 100})).json()["job_id"]
    r = ctx.client.registry.redis
    assert r.llen("calq.cpu.batch") == 0 and ctx.client.lanes().held() == {"backfill": 6, "notebook": 1}
    assert [json.loads(m)["headers"]["id"] for m in r.lrange("calq.cpu", 0, -1)] == [interactive]  # not held

    sent: list[str] = []
    lanes = ctx.client.lanes()
    while lanes.feed(lambda message, queue: sent.append(message["job_id"]), queued=lambda queue: 0):
        pass
    assert sent[:2] == [heavy_ids[0], light_id]  # the light producer's first job is second, not seventh
    assert sent == [heavy_ids[0], light_id, *heavy_ids[1:]] and lanes.held() == {}


def test_the_feeder_keeps_the_batch_queue_short_and_sends_through_celery(api, dataset):
    url, ctx = api
    with http(url, token(ctx, "backfill")) as client:
        digest = upload(client, dataset)
        for s in range(7):
            client.post("/v1/jobs", json=job_body(digest, lane="batch", sampler={**SAMPLER, "seed": s}))
    r = ctx.client.registry.redis
    lanes = ctx.client.lanes()
    assert lanes.feed(ctx.client.send, queued=lambda queue: int(r.llen(queue))) == ctx.settings.api.batch_feed_depth
    assert r.llen("calq.cpu.batch") == ctx.settings.api.batch_feed_depth
    assert lanes.held() == {"backfill": 7 - ctx.settings.api.batch_feed_depth}


# -- the Python client over HTTP ---------------------------------------------------------------


def test_a_client_with_only_a_token_speaks_http_and_reaches_nothing_else(api, dataset):
    url, ctx = api
    settings = Settings(api=ApiSettings(url=url, token=token(ctx, "optimizer")), compile_cache_dir=None)
    client = CalibrationClient(settings)
    assert isinstance(client, RemoteClient)
    for direct in ("registry", "store", "catalog"):
        with pytest.raises(NoDirectAccess):
            getattr(client, direct)
    job_id = client.submit(dataset, "intermediate", events="top_5", **SAMPLER)
    assert client.status(job_id).state is JobState.QUEUED
    assert [r.job_id for r in client.jobs(state="queued")] == [job_id]
    record, changed = client.cancel(job_id)
    assert changed and record.state is JobState.CANCELLED
    with pytest.raises(InvalidJob, match="unknown archetype"):
        client.calibrate("oval", None, "top_5", [0.1])
    bad = CalibrationClient(Settings(api=ApiSettings(url=url, token="calq_nope"), compile_cache_dir=None))
    with pytest.raises(AuthenticationFailed, match="unknown or revoked"):
        bad.status(job_id)


def test_the_client_raises_over_quota_with_the_retry_after(api, dataset):
    url, ctx = api
    client = CalibrationClient(Settings(api=ApiSettings(url=url, token=token(ctx, "o", max_queued=1)), compile_cache_dir=None))
    client.submit(dataset, "intermediate", events="top_5", **SAMPLER)
    with pytest.raises(OverQuota) as refused:
        client.submit(dataset, "intermediate", events="top_5", seed=1, **SAMPLER)
    assert refused.value.retry_after_s == 30


def test_tokens_in_a_file_are_kept_as_hashes_with_mode_0600(tmp_path):
    from producer.api.tokens import FileTokens

    tokens = FileTokens(tmp_path / "tokens.json")
    secret, record = tokens.create("optimizer", role="operator", max_queued=3)
    assert (tmp_path / "tokens.json").stat().st_mode & 0o777 == 0o600
    assert secret not in (tmp_path / "tokens.json").read_text()
    assert tokens.authenticate(secret) == record and tokens.authenticate(secret + "x") is None
    with pytest.raises(ValueError, match="exists already"):
        tokens.create("optimizer", role="producer")
    with pytest.raises(ValueError, match="a token name is"):
        tokens.create("bad name\x1b[31m", role="producer")
    tokens.revoke("optimizer")
    assert tokens.authenticate(secret) is None and not tokens.get("optimizer").active


def test_a_planted_token_record_that_does_not_parse_authenticates_nobody(redis_url):
    from producer.api.tokens import RedisTokens, digest

    client = redis.Redis.from_url(redis_url)
    tokens = RedisTokens(client)
    secret = "calq_" + "p" * 43
    client.hset(tokens.hashes_key, digest(secret), "ghost")
    client.hset(tokens.records_key, "ghost", b'{"name": "ghost", "role": "operator"')
    assert tokens.authenticate(secret) is None and tokens.list() == []


# -- least privilege in Redis ----------------------------------------------------------------------


@pytest.fixture
def acl_clients(redis_url):
    """Clients logged in as the api, worker and operator users of ``calq acl`` (the default user stays on)."""
    from shared.jobs.acl import acl_rules, setuser_args

    admin = redis.Redis.from_url(redis_url)
    passwords = {"api": "a-pw", "worker": "w-pw", "operator": "o-pw"}
    lines = acl_rules(passwords)
    assert lines[0] == "user default off"
    for line in lines[1:]:
        admin.execute_command("ACL", "SETUSER", *setuser_args(line))
    port = admin.connection_pool.connection_kwargs["port"]
    clients = {name: redis.Redis(host="127.0.0.1", port=port, username=name, password=pw) for name, pw in passwords.items()}
    yield clients
    for c in clients.values():
        c.close()
    admin.execute_command("ACL", "DELUSER", *passwords)
    admin.close()


def test_only_the_operator_may_flush_configure_or_debug_redis(acl_clients):
    operator = acl_clients["operator"]
    for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "maxmemory"), ("DEBUG", "SLEEP", "0"), ("KEYS", "*")):
        for name in ("api", "worker"):  # ACL DRYRUN: what the ACL says, whatever the server's own switches (DEBUG is off)
            verdict = operator.execute_command("ACL", "DRYRUN", name, *command)
            assert b"no permissions" in verdict, (name, command, verdict)
        assert operator.execute_command("ACL", "DRYRUN", "operator", *command) == b"OK"
    with pytest.raises(redis.exceptions.NoPermissionError):
        acl_clients["worker"].flushall()
    assert operator.flushdb()


def test_the_api_user_cannot_write_leases_or_unacked_jobs_and_the_worker_cannot_touch_tokens(acl_clients):
    api, worker = acl_clients["api"], acl_clients["worker"]
    api.set("calq:job:cj-0", "{}")  # what it needs: records, tokens, held batch jobs, the queues
    api.hset("calq:api:tokens", "x", "{}")
    api.rpush("calq:lanes:owners", "x")
    api.lpush("calq.cpu.batch", "m")
    assert api.get("calq:lease:cj-0") is None  # leases: read only
    for write in (lambda: api.set("calq:lease:cj-0", "planted"), lambda: api.hset("unacked", "t", "m"),
                  lambda: api.set("celery-task-meta-x", "{}"), lambda: api.set("anything-else", "1")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            write()
    worker.set("calq:lease:cj-0", "mine")
    for touch in (lambda: worker.hget("calq:api:tokens", "x"), lambda: worker.hset("calq:api:tokens", "x", "{}"),
                  lambda: worker.lpop("calq:lanes:owners")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            touch()


def test_calq_acl_writes_hashes_never_passwords_and_names_a_missing_one(tmp_path):
    run = ["acl", "--out", str(tmp_path / "users.acl")]
    missing = run_calq(calq_environ(CALQ_REDIS_ACL__API_PASSWORD="a-secret"), tmp_path, *run, check=False, timeout=120)
    assert missing.returncode == 2 and "CALQ_REDIS_ACL__OPERATOR_PASSWORD" in missing.stderr
    assert "CALQ_REDIS_ACL__WORKER_PASSWORD" in missing.stderr and not (tmp_path / "users.acl").exists()
    passwords = {"API": "a-secret", "WORKER": "w-secret", "OPERATOR": "o-secret"}
    written = run_calq(calq_environ(**{f"CALQ_REDIS_ACL__{k}_PASSWORD": v for k, v in passwords.items()}), tmp_path, *run,
                       check=False, timeout=120)
    text = (tmp_path / "users.acl").read_text()
    assert written.returncode == 0 and text.splitlines()[0] == "user default off"
    assert [line.split()[1] for line in text.splitlines()[1:]] == ["worker", "api", "operator"]
    assert not any(v in text for v in passwords.values())
    assert "#" + hashlib.sha256(b"o-secret").hexdigest() in text

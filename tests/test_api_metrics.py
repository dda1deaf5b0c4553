"""The calibration API's own metrics, over real HTTP: each request counted by method, route template and status.

A uvicorn server on a free port over a real redis-server (tests/test_api.py's
fixture pattern); ``/metrics`` is scraped and parsed with prometheus_client's
parser. A made-up path never becomes a label (it is ``unmatched``), so
hostile requests cannot grow the series.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer.api.app import ApiContext, create_app
from producer.api.server import in_background
from shared.contract.settings import Settings
from tests.services import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def api(redis_url, tmp_path):
    settings = Settings(broker_url=redis_url, storage_url=str(tmp_path / "store"), compile_cache_dir=None)
    ctx = ApiContext.from_settings(settings)
    with in_background(create_app(ctx=ctx, feed=False), port=free_port()) as url:
        yield url, ctx


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def requests(samples, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == "calq_api_requests_total" and labels.items() <= dict(ls).items())


def test_requests_are_counted_by_route_template_and_status(api):
    url, ctx = api
    with httpx.Client(base_url=url, timeout=30) as client:
        before = scrape(client)
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/jobs/cj-000000000000000000000000").status_code == 401  # no token
        for hostile in ("/v1/jobs/cj-1/../../etc/passwd", "/%1b[2J", "/x" * 50):
            assert client.get(hostile).status_code == 404
        client.post("/v1/jobs", content=b"{")  # no token: refused before the body is read
        after = scrape(client)
    moved = {ls: v - before.get(("calq_api_requests_total", ls), 0.0)
             for (n, ls), v in after.items() if n == "calq_api_requests_total"}
    moved = {tuple(sorted(dict(ls).items())): v for ls, v in moved.items() if v}
    assert moved[(("method", "GET"), ("route", "/healthz"), ("status", "200"))] == 1
    assert moved[(("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "401"))] == 1
    assert moved[(("method", "GET"), ("route", "unmatched"), ("status", "404"))] == 3
    routes = {dict(ls)["route"] for (n, ls) in after if n == "calq_api_requests_total"}
    assert not [r for r in routes if "passwd" in r or "\x1b" in r or "/x/x" in r]  # a made-up path is no label
    assert requests(after, method="POST", route="/v1/jobs") == requests(before, method="POST", route="/v1/jobs") + 1
    count = {dict(ls)["route"]: v for (n, ls), v in after.items()
             if n == "calq_api_request_seconds_count" and dict(ls)["method"] == "GET"}
    assert count["/healthz"] >= 1
    # the fleet's queue depths, read from Redis at the scrape
    ctx.client.registry.redis.rpush("calq.cpu.batch", "m1", "m2")
    with httpx.Client(base_url=url, timeout=30) as client:
        assert scrape(client)[("calq_queue_depth", (("queue", "calq.cpu.batch"),))] == 2

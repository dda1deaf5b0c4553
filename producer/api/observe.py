"""The calibration API's own metrics: requests by method, route and status, their latency, and ``/metrics``.

:class:`RequestMetrics` (ASGI middleware) records each answered request in
``calq_api_requests_total`` and ``calq_api_request_seconds``
(:mod:`shared.jobs.metrics`, where every calq metric name lives). The route
label is the matched route's template (``/v1/jobs/{job_id}``), or
``unmatched``: a path a client made up never becomes a label, so the series
stay bounded whatever is requested. ``GET /metrics`` serves this process's
metrics and the fleet's queue depths (read from Redis at each scrape); like
``/healthz`` it needs no token, and it holds counts only, never a job's data.
"""

from __future__ import annotations

import time
from typing import Any

from shared.jobs import metrics

UNMATCHED = "unmatched"


class RequestMetrics:
    """ASGI middleware: counts and times every HTTP request (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None)
            metrics.api_request(method=str(scope.get("method", "")), route=route if isinstance(route, str) else UNMATCHED,
                                status=status, seconds=time.perf_counter() - started)


def install(app: Any, *, redis_client: Any | None) -> None:
    """Count ``app``'s requests and serve ``GET /metrics`` (queue depths from ``redis_client``, when given)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.responses import Response

    from shared.jobs.celery_app import ALL_QUEUES

    collected = metrics.registry(redis_client, ALL_QUEUES)

    async def serve_metrics(_request: Any) -> Response:
        return Response(generate_latest(collected), media_type=CONTENT_TYPE_LATEST)

    app.add_route("/metrics", serve_metrics, methods=["GET"], include_in_schema=False)
    app.add_middleware(RequestMetrics)


__all__ = ["RequestMetrics", "install"]

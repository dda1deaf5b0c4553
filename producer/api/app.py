"""The API's app factory: its context, bearer-token auth, error answers and the body cap.

:func:`create_app` builds a FastAPI app over one :class:`ApiContext`: a
:class:`~producer.client.CalibrationClient` on the fleet's Redis and store
(every endpoint's work goes through it, the registry and the store, so the
API adds no second submit path), the token store, the admission rules and
the calibration cache. ``calq serve`` runs it with uvicorn.

Every error is JSON ``{"error", "detail", "fields"?}`` (:class:`~producer.api.schemas.Problem`),
mapped from calq's exception tree in one place (:func:`problem_for`):

====================================  ======  =========================
exception                             status  error
====================================  ======  =========================
no or unknown/revoked token           401     ``unauthenticated``
token of the wrong role, not owner    403     ``forbidden``
NotFound (job, summary, pointer)      404     ``not_found``
JobDidNotSucceed (summary of a        409     ``job_not_succeeded``
failed/cancelled/rejected job)
body over ``api.max_body_bytes``      413     ``too_large``
malformed JSON, wrong types, a job    422     ``invalid``
that breaks its schema, RejectedError
OverQuota                             429     ``over_quota`` (+ Retry-After)
RetryableError (Redis, store out)     503     ``unavailable`` (+ Retry-After)
====================================  ======  =========================

A reason never quotes a stored value it did not write: errors from the
fleet's own records (corrupt, unverified) name the key, as the registry does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import pydantic
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.api.admission import Admission
from producer.api.calibrations import Calibrations
from producer.api.tokens import Role, Token, TokenStore, token_store
from producer.client import CalibrationClient, JobDidNotSucceed
from shared.contract.errors import (
    AuthenticationFailed,
    CalqError,
    NotFound,
    OverQuota,
    RejectedError,
    RetryableError,
)
from shared.contract.settings import Settings

log = logging.getLogger(__name__)

#: Seconds a 503 asks the caller to wait (a Redis or store outage).
UNAVAILABLE_RETRY_S = 5
#: How often the batch feeder looks for room in the workers' batch queues.
FEED_INTERVAL_S = 0.2
#: Routes whose bodies are not JSON and are not held in memory (they stream to disk, capped by the data limits).
STREAMED = ("/v1/datasets/",)


class ApiError(CalqError):
    """An answer other than 2xx decided by the API itself (auth, role, size)."""

    def __init__(self, status: int, error: str, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


@dataclass
class ApiContext:
    """What every request of one API process shares."""

    settings: Settings
    client: CalibrationClient
    tokens: TokenStore
    admission: Admission
    calibrations: Calibrations
    stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiContext:
        """A context on the fleet ``settings`` name (ValueError without a broker: the API serves a fleet)."""
        from shared.jobs.registry import RedisRegistry
        from shared.storage.store import Store

        if settings.embedded:
            raise ValueError("calq serve needs the fleet's Redis: set CALQ_BROKER_URL (e.g. redis://localhost:6379/0)")
        store = Store.from_settings(settings)
        registry = RedisRegistry.from_url(settings.backend(), holds=store.holds)
        client = CalibrationClient(settings, store=store, registry=registry)
        return cls(
            settings=settings,
            client=client,
            tokens=token_store(settings, redis_client=registry.redis),
            admission=Admission(registry.redis, prefix=registry.prefix),
            calibrations=Calibrations(client),
        )


# -- auth ------------------------------------------------------------------------------


async def context(request: Request) -> ApiContext:
    """The process's context (``async``: no I/O, so no thread-pool hop)."""
    return request.app.state.ctx


def json_response(text: str | bytes, status: int = 200) -> Response:
    """A JSON body already serialised (a model's ``model_dump_json``): no second encoding pass."""
    return Response(text, status_code=status, media_type="application/json")


def caller(request: Request, ctx: ApiContext = Depends(context)) -> Token:
    """The token of the request (``Authorization: Bearer <token>``); 401 without a valid, unrevoked one."""
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token> (calq token create)",
                       headers={"WWW-Authenticate": "Bearer"})
    token = ctx.tokens.authenticate(secret.strip())
    if token is None:
        raise ApiError(401, "unauthenticated", "the token is unknown or revoked", headers={"WWW-Authenticate": "Bearer"})
    return token


def operator(token: Token = Depends(caller)) -> Token:
    """The caller, if it holds an operator token; 403 otherwise."""
    if token.role is not Role.OPERATOR:
        raise ApiError(403, "forbidden", f"this needs an operator token; {token.name!r} is a {token.role.value} token")
    return token


# -- errors ----------------------------------------------------------------------------


def _answer(status: int, error: str, detail: str, *, fields: list[dict[str, str]] | None = None,
            headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": error, "detail": detail}
    if fields is not None:
        body["fields"] = fields
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=headers)


def validation_fields(errors: list[Any]) -> list[dict[str, str]]:
    """Pydantic errors as ``[{"field", "reason"}]``: where and why, never the input value."""
    found = []
    for e in errors:
        loc = [str(part) for part in e.get("loc", ()) if part not in ("body", "query", "path")]
        if e.get("type") == "json_invalid":
            loc = []  # the location is a character offset, not a field
        found.append({"field": ".".join(loc) or "body", "reason": str(e.get("msg", "invalid"))})
    return found


def problem_for(exc: Exception) -> JSONResponse:
    """The one mapping from an exception to the API's answer (see the module docstring)."""
    if isinstance(exc, ApiError):
        return _answer(exc.status, exc.error, exc.detail, headers=exc.headers)
    if isinstance(exc, JobDidNotSucceed):
        return _answer(409, "job_not_succeeded", str(exc), extra={"job": exc.status.model_dump(mode="json")})
    if isinstance(exc, OverQuota):
        headers = {"Retry-After": str(int(exc.retry_after_s))} if exc.retry_after_s is not None else None
        return _answer(429, "over_quota", str(exc), headers=headers)
    if isinstance(exc, NotFound):
        return _answer(404, "not_found", str(exc))
    if isinstance(exc, pydantic.ValidationError):
        fields = validation_fields(exc.errors(include_input=False))
        return _answer(422, "invalid", "; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields=fields)
    if isinstance(exc, RejectedError):
        return _answer(422, "invalid", str(exc))
    if isinstance(exc, RetryableError):
        return _answer(503, "unavailable", "the fleet's Redis or store cannot be reached; try again shortly",
                       headers={"Retry-After": str(UNAVAILABLE_RETRY_S)})
    if isinstance(exc, AuthenticationFailed):
        log.error("the API's own credentials were refused: %s", exc)
        return _answer(503, "unavailable", "the API cannot reach the fleet", headers={"Retry-After": str(UNAVAILABLE_RETRY_S)})
    log.exception("unexpected error")
    return _answer(500, "internal", "internal error (logged by the API)")


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = validation_fields(list(exc.errors()))
        malformed = any(str(e.get("type")) == "json_invalid" for e in exc.errors())
        detail = "the body is not valid JSON" if malformed else "; ".join(f"{f['field']}: {f['reason']}" for f in fields)
        return _answer(422, "invalid", detail, fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _answer(exc.status_code, error, str(exc.detail), headers=getattr(exc, "headers", None))

    async def _calq(request: Request, exc: Exception) -> JSONResponse:
        return problem_for(exc)

    # calq's own tree and a job that breaks its schema are answers; anything else is a logged 500
    for kind in (CalqError, pydantic.ValidationError, Exception):
        app.add_exception_handler(kind, _calq)


class BodyCap:
    """ASGI middleware: a JSON request body over ``limit`` bytes is answered 413 before any of it is parsed.

    The body is read up to ``limit + 1`` bytes (declared length or not) and
    replayed to the app; streamed routes (:data:`STREAMED`) pass untouched.
    """

    def __init__(self, app: Any, *, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith(STREAMED):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        response = _answer(413, "too_large", f"the request body is over {self.limit:,} bytes (api.max_body_bytes)")
        await response(scope, receive, send)


# -- the batch feeder ------------------------------------------------------------------


def _feed_forever(ctx: ApiContext) -> None:
    """Move held batch jobs to the workers' batch queues, owners in turn (:class:`shared.jobs.lanes.BatchLanes`)."""
    client = ctx.client
    lanes = client.lanes()
    redis = client.registry.redis
    while not ctx.stop.wait(FEED_INTERVAL_S):
        try:
            lanes.feed(client.send, queued=lambda queue: int(redis.llen(queue)))
        except Exception as exc:  # an outage: the next tick tries again
            log.warning("batch feeder: %s: %s", type(exc).__name__, exc)


# -- the factory -----------------------------------------------------------------------


def create_app(settings: Settings | None = None, *, ctx: ApiContext | None = None, feed: bool = True) -> FastAPI:
    """The calibration API over ``ctx`` (or a context built from ``settings``); ``feed`` runs the batch feeder."""
    from producer.api import observe, routes

    if ctx is None:
        if settings is None:
            from shared.contract.settings import get_settings

            settings = get_settings()
        ctx = ApiContext.from_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        feeder = threading.Thread(target=_feed_forever, args=(ctx,), name="calq-batch-feeder", daemon=True)
        if feed:
            feeder.start()
        try:
            yield
        finally:
            ctx.stop.set()
            if feed:
                feeder.join(timeout=5)

    app = FastAPI(
        title="calq calibration API",
        version="1",
        description="Upload datasets, submit calibration jobs, read results and calibrate forecasts, holding a token.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    _install_errors(app)
    app.include_router(routes.router)
    app.add_middleware(BodyCap, limit=ctx.settings.api.max_body_bytes)
    observe.install(app, redis_client=getattr(ctx.client.registry, "redis", None))  # counts every request, /metrics
    return app


__all__ = ["ApiContext", "ApiError", "caller", "create_app", "operator", "problem_for"]

"""The API's endpoints; the names are a contract (issue 19), so keep them.

Each handler checks its caller's role, then does its work through the
context's :class:`~producer.client.CalibrationClient`, registry and store:
the same submit, cancel and read paths as the CLI's. Handlers are plain
``def`` (FastAPI runs them in its thread pool: Redis and the store block),
except the dataset upload, which streams the body to disk as it arrives.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse

from producer.api.app import ApiContext, ApiError, caller, context, json_response, operator
from producer.api.schemas import (
    CalibrateRequest,
    CalibrateResponse,
    DatasetResponse,
    SubmitRequest,
    SubmitResponse,
)
from producer.api.tokens import Token
from shared.contract.domain import ARCHETYPES, event_threshold
from shared.contract.errors import InvalidJob, NotFound
from shared.contract.job import JobState, JobStatus

router = APIRouter()
SHA256_PATH = r"^[0-9a-f]{64}$"
#: Bytes read from the socket at a time while a dataset streams to disk.
CHUNK = 1 << 20


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    """Liveness: needs no token and touches nothing."""
    return {"status": "ok"}


# -- datasets ------------------------------------------------------------------------


@router.put("/v1/datasets/{sha256}", status_code=201, response_model=DatasetResponse, tags=["datasets"])
async def put_dataset(
    request: Request,
    response: Response,
    sha256: str,
    token: Token = Depends(caller),
    ctx: ApiContext = Depends(context),
) -> DatasetResponse:
    """Store NetCDF bytes at their content address: 201, or 200 if they are stored already.

    The body streams to a temporary file, hashed as it arrives and cut off
    past ``limits.max_decoded_bytes``; bytes that do not hash to ``sha256``
    are refused (the actual hash is never said), and the header limits
    (:func:`shared.data.limits.check_file`) are checked before the store sees a byte.
    """
    from shared.data.limits import check_file

    if not _is_sha256(sha256):
        raise InvalidJob("the address must be the dataset's sha256: 64 lowercase hexadecimal characters")
    limit = ctx.settings.limits.max_decoded_bytes
    with tempfile.TemporaryDirectory(prefix="calq-api-upload-") as tmp:
        path = Path(tmp) / f"{sha256}.nc"
        digest, size = hashlib.sha256(), 0
        with open(path, "wb") as handle:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "too_large", f"the dataset is over {limit:,} bytes (limits.max_decoded_bytes)")
                digest.update(chunk)
                handle.write(chunk)
        if size == 0:
            raise InvalidJob("the body is empty: PUT the dataset's NetCDF bytes")
        if digest.hexdigest() != sha256:
            raise InvalidJob(f"the body's bytes do not hash to {sha256}, the address they were sent to")
        await asyncio.to_thread(check_file, path, ctx.settings.limits, source=f"dataset {sha256}")
        created = await asyncio.to_thread(_store_dataset, ctx, path, sha256)
    response.status_code = 201 if created else 200
    return DatasetResponse(dataset_sha256=sha256, dataset_uri=ctx.client.store.dataset_uri(sha256), created=created)


def _store_dataset(ctx: ApiContext, path: Path, sha256: str) -> bool:
    store = ctx.client.store
    existed = store.exists(store.dataset_uri(sha256))
    _, stored = store.upload_dataset(path)  # replaces bytes of another hash planted at the address
    if stored != sha256:  # the file changed under us: never store it under the wrong name
        raise InvalidJob("the dataset changed while it was stored")
    return not existed


# -- jobs ----------------------------------------------------------------------------


@router.post("/v1/jobs", status_code=202, response_model=SubmitResponse, tags=["jobs"])
def submit(
    body: SubmitRequest, response: Response, token: Token = Depends(caller), ctx: ApiContext = Depends(context)
) -> SubmitResponse:
    """Submit a job: 202 when it was sent to the workers, 200 with the existing job when it is known."""
    client = ctx.client
    sha = body.dataset_sha256.lower()
    job = client.make_job(
        None, body.archetype, events=body.events, as_of=body.as_of, window_days=body.window_days,
        warmup=body.sampler.warmup, samples=body.sampler.samples, chains=body.sampler.chains, seed=body.sampler.seed,
        time_limit_s=body.time_limit_s, dataset_ref=(client.store.dataset_uri(sha), sha),
    )
    if not client.store.exists(job.dataset_uri):
        raise InvalidJob(f"no dataset {sha} is stored: PUT /v1/datasets/{sha} first")
    ctx.admission.check_size(token, job)
    ctx.admission.reserve(token, job.job_id, record=client.registry.find)
    try:
        status, sent = client.admit(job, lane=body.lane, owner=token.name)
    except BaseException:
        ctx.admission.release(token, job.job_id)
        raise
    ctx.admission.settle(token, status, sent=sent)
    response.status_code = 202 if sent else 200
    return SubmitResponse(job_id=job.job_id, state=status.state.value, lane=body.lane)


@router.get("/v1/jobs", tags=["jobs"])
def list_jobs(
    state: Optional[str] = None,
    archetype: Optional[str] = None,
    limit: int = Query(20, ge=1, le=1000),
    token: Token = Depends(caller),
    ctx: ApiContext = Depends(context),
) -> list[dict]:
    """The newest job records, optionally of one state and archetype."""
    if state is not None and state not in {s.value for s in JobState}:
        raise InvalidJob(f"state must be one of {', '.join(s.value for s in JobState)}")
    if archetype is not None:
        _check_archetype(archetype, allow_all=True)
    return [r.model_dump(mode="json") for r in ctx.client.jobs(state=state, archetype=archetype, limit=limit)]


@router.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobStatus)
def job_record(job_id: str, token: Token = Depends(caller), ctx: ApiContext = Depends(context)) -> Response:
    """A job's record: state, progress, reason."""
    return json_response(ctx.client.status(_job_id(job_id)).model_dump_json())


@router.post("/v1/jobs/{job_id}/cancel", tags=["jobs"])
def cancel(job_id: str, token: Token = Depends(caller), ctx: ApiContext = Depends(context)) -> dict:
    """Cancel a job: a producer only its own, an operator any. ``{"job", "changed"}``."""
    job_id = _job_id(job_id)
    record = ctx.client.status(job_id)  # 404 before 403: an unknown id is unknown to everyone
    if not ctx.admission.may_cancel(token, job_id):
        raise ApiError(403, "forbidden", f"job {job_id} was not submitted with this token: only an operator may cancel it")
    record, changed = ctx.client.cancel(job_id, f"cancelled through the API by {token.name}")
    return {"job": record.model_dump(mode="json"), "changed": changed}


@router.get("/v1/jobs/{job_id}/summary", tags=["results"])
def summary(job_id: str, token: Token = Depends(caller), ctx: ApiContext = Depends(context)) -> dict:
    """A succeeded job's summary (409 with the record if the job ended otherwise)."""
    return ctx.client.result(_job_id(job_id)).model_dump(mode="json")


@router.get("/v1/jobs/{job_id}/posterior", tags=["results"], response_class=Response)
def posterior(job_id: str, token: Token = Depends(caller), ctx: ApiContext = Depends(context)) -> Response:
    """A succeeded job's posterior: the NetCDF bytes."""
    found = ctx.client.result(_job_id(job_id))
    data = ctx.client.store.get_bytes(found.posterior_uri)
    provenance = getattr(found, "provenance", None)
    expected = getattr(provenance, "posterior_sha256", None)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise NotFound(f"the posterior of job {job_id} is not the one its summary records")
    return Response(data, media_type="application/x-netcdf",
                    headers={"Content-Disposition": f'attachment; filename="{job_id}.nc"'})


@router.get("/v1/jobs/{job_id}/report", tags=["results"], response_class=HTMLResponse)
def report(job_id: str, token: Token = Depends(caller), ctx: ApiContext = Depends(context)) -> HTMLResponse:
    """The HTML page of ``calq report --job``."""
    from producer.report.command import calibration_report

    page = calibration_report(job_id=_job_id(job_id), client=ctx.client)
    return HTMLResponse(page.to_html())


# -- latest and calibration ------------------------------------------------------------


@router.get("/v1/latest/{archetype}", tags=["results"])
def latest(archetype: str, token: Token = Depends(caller), ctx: ApiContext = Depends(context)) -> Response:
    """Per event, the job that is latest for ``archetype`` and its summary."""
    _check_archetype(archetype)
    pointers = {e: p for (a, e), p in ctx.client.registry.latest_all().items() if a == archetype}
    if not pointers:
        raise NotFound(f"no converged calibration for {archetype} yet")
    parts = [f'{json.dumps(event)}:{{"job_id":{json.dumps(p.job_id)},"summary":{ctx.calibrations.summary_json(p.summary_uri)}}}'
             for event, p in sorted(pointers.items())]
    return json_response("{" + ",".join(parts) + "}")


@router.post("/v1/calibrate", response_model=CalibrateResponse, tags=["results"])
def calibrate(body: CalibrateRequest, token: Token = Depends(caller), ctx: ApiContext = Depends(context)) -> Response:
    """Calibrated probabilities for ``p`` from the latest converged fit (an unseen track borrows its archetype)."""
    _check_archetype(body.archetype)
    _check_event(body.event)
    try:
        job_id, mean, low, high, seen = ctx.calibrations.calibrate(body.archetype, body.track, body.event, body.p)
    except (KeyError, ValueError) as exc:
        raise InvalidJob(str(exc).strip("'\"")) from None
    answer = {"job_id": job_id, "q_mean": mean.tolist(), "q_low": low.tolist(), "q_high": high.tolist(), "track_seen": seen}
    return json_response(json.dumps(answer, separators=(",", ":")))  # floats as JSON numbers, encoded once


# -- operator --------------------------------------------------------------------------


@router.post("/v1/reindex", tags=["operator"])
def reindex(token: Token = Depends(operator), ctx: ApiContext = Depends(context)) -> dict:
    """Rebuild the latest pointers from the store, repair the job records it proves finished, queue lost jobs again."""
    from shared.jobs.submissions import reindex as rebuild

    client = ctx.client
    return rebuild(registry=client.registry, store=client.store, publish=client.send, leases=client.services.leases)


@router.get("/v1/fleet", tags=["operator"])
def fleet(token: Token = Depends(operator), ctx: ApiContext = Depends(context)) -> dict:
    """Workers, queues (batch lanes and held jobs too) and totals: ``calq fleet --json``'s view."""
    from producer.fleet_command import fleet_json
    from shared.jobs.celery_app import ALL_QUEUES
    from shared.jobs.telemetry import read_fleet

    registry = ctx.client.registry
    view = fleet_json(read_fleet(registry.redis, registry.prefix, ALL_QUEUES))
    view["held_batch_jobs"] = ctx.client.lanes().held()
    return view


# -- checks of path and query values ---------------------------------------------------------


def _is_sha256(value: str) -> bool:
    return re.fullmatch(SHA256_PATH, value) is not None


def _job_id(job_id: str) -> str:
    from shared.contract.domain import SAFE_ID

    if len(job_id) > 64 or not SAFE_ID.match(job_id):
        raise NotFound("no such job (a job id is cj- and 24 hexadecimal characters)")
    return job_id


def _check_archetype(archetype: str, *, allow_all: bool = False) -> None:
    names = (*ARCHETYPES, "all") if allow_all else ARCHETYPES
    if archetype not in names:
        raise InvalidJob(f"unknown archetype: use one of {', '.join(names)}")


def _check_event(event: str) -> None:
    try:
        event_threshold(event)
    except ValueError:
        raise InvalidJob("unknown event: events are top_N, e.g. top_5") from None


__all__ = ["router"]

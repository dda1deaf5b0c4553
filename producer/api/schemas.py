"""The API's request and response bodies (JSON; the field names are a contract).

Requests forbid unknown fields, so a misspelt option is a 422 naming it,
never silently ignored. A job's own rules (archetype, events, dates, sampler
bounds) are :class:`~shared.contract.job.CalibrationJob`'s, checked when the
job is built; these models only give the request its shape.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.jobs.celery_app import BATCH, INTERACTIVE

SHA256 = r"^[0-9a-fA-F]{64}$"
#: The most forecast probabilities one calibrate request may carry.
MAX_P = 10_000


class SamplerRequest(BaseModel):
    """Sampler settings a job asks for; any left out come from the server's settings."""

    model_config = ConfigDict(extra="forbid")

    warmup: int | None = Field(None, ge=1, le=100_000)
    samples: int | None = Field(None, ge=1, le=100_000)
    chains: int | None = Field(None, ge=1, le=64)
    seed: int = Field(0, ge=0, lt=2**32)


class SubmitRequest(BaseModel):
    """``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    dataset_sha256: str = Field(pattern=SHA256, description="the dataset, uploaded first with PUT /v1/datasets/{sha256}")
    archetype: str = Field(max_length=64)
    events: list[str] | str | None = Field(None, description="e.g. [\"top_5\", \"top_10\"] (default: the standard events)")
    sampler: SamplerRequest = SamplerRequest()
    as_of: date | None = None
    window_days: int | None = None
    time_limit_s: int | None = None
    lane: Literal["interactive", "batch"] = Field(INTERACTIVE, description=f"{INTERACTIVE} jobs run before {BATCH} ones")


class SubmitResponse(BaseModel):
    job_id: str
    state: str
    lane: str


class CalibrateRequest(BaseModel):
    """``POST /v1/calibrate``: calibrate forecasts with the latest converged fit of an archetype and event."""

    model_config = ConfigDict(extra="forbid")

    archetype: str = Field(max_length=64)
    track: str | None = Field(None, max_length=200, description="an unseen track borrows its archetype's parameters")
    event: str = Field(max_length=32)
    p: list[float] = Field(min_length=1, max_length=MAX_P, description="forecast probabilities in [0, 1]")


class CalibrateResponse(BaseModel):
    job_id: str
    q_mean: list[float]
    q_low: list[float]
    q_high: list[float]
    track_seen: bool | None = Field(None, description="False: the track was not fitted and borrowed its archetype")


class DatasetResponse(BaseModel):
    dataset_sha256: str
    dataset_uri: str
    created: bool


class Problem(BaseModel):
    """Every error answer: a stable ``error`` code, a sentence, and for a bad field, which one."""

    error: str
    detail: str
    fields: list[dict[str, str]] | None = None


__all__ = [
    "MAX_P", "CalibrateRequest", "CalibrateResponse", "DatasetResponse", "Problem", "SamplerRequest",
    "SubmitRequest", "SubmitResponse",
]

"""What travels to a worker: the calibration job, and what comes back about it.

A job is a small frozen JSON message: it names its dataset by URI and content
hash (the data itself never travels through Redis) and carries everything
that determines its result. Its id is derived from that content, so the same
job enqueued twice is one job.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.contract.domain import (
    DEFAULT_EVENTS,
    EARLIEST_DATE,
    LATEST_DATE,
    MAX_WINDOW_DAYS,
    ArchetypeOrAll,
    event_threshold,
)

#: logit-hier/2: log-normal track-scale priors (shared.fit.model), where /1 had half-normals.
MODEL_VERSION = "logit-hier/2"
#: The model versions this code can fit; any other is rejected, never run as the current one.
SUPPORTED_MODEL_VERSIONS = (MODEL_VERSION,)
#: The longest dataset URI a job may carry.
MAX_URI_CHARS = 2048
#: The most events one job may name (a worker may cap lower: limits.max_events).
MAX_EVENTS = 32
STORAGE_SCHEMES = ("file", "s3")
#: The longest warmup, and the most draws, one chain of a job may ask for (a worker may cap lower:
#: limits.max_draws_per_chain, on the two together; remedies never go past either).
MAX_RUN_LENGTH = 100_000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class SamplerSettings(BaseModel):
    """NUTS settings of one job; they are part of the job's identity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    warmup: int = Field(500, ge=1, le=MAX_RUN_LENGTH, description="warmup steps per chain")
    samples: int = Field(1000, ge=1, le=MAX_RUN_LENGTH, description="kept draws per chain")
    chains: int = Field(4, ge=1, le=64, description="independent chains")
    seed: int = Field(0, ge=0, lt=2**32, description="the sampler's seed: the same job gives the same draws")


class CalibrationJob(BaseModel):
    """One calibration job: fit ``archetype`` (or ``all``) on a dataset window."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    archetype: ArchetypeOrAll
    dataset_uri: str = Field(max_length=MAX_URI_CHARS, description="file:// or s3:// URI of the NetCDF dataset")
    dataset_sha256: str = Field(description="sha256 of the dataset file's bytes")
    events: tuple[str, ...] = Field(DEFAULT_EVENTS, max_length=MAX_EVENTS)
    as_of: date | None = Field(
        None, description=f"use races strictly before this date, a day in {EARLIEST_DATE}..{LATEST_DATE}"
    )
    window_days: int | None = Field(
        None, ge=1, le=MAX_WINDOW_DAYS, description="only races in the last N days before as_of"
    )
    sampler: SamplerSettings = SamplerSettings()
    model_version: str = Field(MODEL_VERSION, max_length=64)
    time_limit_s: int | None = Field(
        None, ge=1, le=7 * 24 * 3600, description="shortens the worker's job time limit (never lengthens it)"
    )

    @model_validator(mode="wrap")
    @classmethod
    def _verify_id(cls, data: Any, handler: Any) -> CalibrationJob:
        # A serialised job carries its id; it must agree with the content.
        claimed = None
        if isinstance(data, dict) and "job_id" in data:
            data = dict(data)
            claimed = data.pop("job_id")
        job = handler(data)
        if claimed is not None and claimed != job.job_id:
            raise ValueError(f"job_id {claimed!r} does not match the job's content (expected {job.job_id})")
        return job

    @field_validator("dataset_uri")
    @classmethod
    def _valid_uri(cls, uri: str) -> str:
        parts = urlsplit(uri)
        if parts.scheme not in STORAGE_SCHEMES:
            raise ValueError(f"dataset_uri must be a file:// or s3:// URI, got {uri!r}")
        if parts.scheme == "s3" and (not parts.netloc or parts.path in ("", "/")):
            raise ValueError(f"dataset_uri {uri!r} needs a bucket and a key")
        if parts.scheme == "file" and not parts.path.startswith("/"):
            raise ValueError(f"dataset_uri {uri!r} must hold an absolute path")
        return uri

    @field_validator("model_version")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in SUPPORTED_MODEL_VERSIONS:
            raise ValueError(f"unknown model_version; this calq fits {', '.join(SUPPORTED_MODEL_VERSIONS)}")
        return value

    @field_validator("dataset_sha256")
    @classmethod
    def _valid_hash(cls, value: str) -> str:
        value = value.lower()
        if not _SHA256.match(value):
            raise ValueError("dataset_sha256 must be 64 hexadecimal characters")
        return value

    @field_validator("as_of")
    @classmethod
    def _real_date(cls, value: date | None) -> date | None:
        if value is None:
            return value
        if not EARLIEST_DATE <= value <= LATEST_DATE:
            raise ValueError(f"as_of must lie between {EARLIEST_DATE} and {LATEST_DATE}")
        return value

    @field_validator("events", mode="before")
    @classmethod
    def _split_events(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("events")
    @classmethod
    def _valid_events(cls, events: tuple[str, ...]) -> tuple[str, ...]:
        if not events:
            raise ValueError("events must name at least one event, e.g. top_5")
        thresholds = [event_threshold(e) for e in events]
        if len(set(thresholds)) != len(thresholds):
            raise ValueError(f"events contain duplicates: {', '.join(events)}")
        return tuple(e for _, e in sorted(zip(thresholds, events)))

    @model_validator(mode="after")
    def _window_needs_as_of(self) -> CalibrationJob:
        if self.window_days is not None and self.as_of is None:
            raise ValueError("window_days needs as_of: the window ends at as_of")
        return self

    @property
    def job_id(self) -> str:
        """A stable id derived from the job's content: same content, same id."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return "cj-" + hashlib.sha256(canonical.encode()).hexdigest()[:24]

    @property
    def thresholds(self) -> tuple[int, ...]:
        return tuple(event_threshold(e) for e in self.events)

    def to_message(self) -> dict[str, Any]:
        """The JSON-ready message sent to a worker, with its id."""
        return {"job_id": self.job_id, **self.model_dump(mode="json")}


class JobState(str, Enum):
    """Where a job is; the registry's transition table says how it moves (:mod:`shared.jobs.registry.base`)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """A final state: nothing runs any more (a failed or cancelled job may be submitted again)."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.REJECTED, JobState.CANCELLED)


class Progress(BaseModel):
    """How far a running job has got."""

    model_config = ConfigDict(frozen=True)

    phase: str = Field(description="load, compile, warmup, sampling, diagnostics or write")
    fraction: float = Field(0.0, ge=0.0, le=1.0, description="done share of the current phase")
    draws_done: int = Field(0, description="draws done so far in this phase, all chains")
    draws_total: int = Field(0, description="draws this phase will take, all chains")


#: What long work calls as it goes; the CLI draws a bar, the worker writes the record.
ProgressCallback = Callable[[Progress], None]


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(BaseModel):
    """calq's own durable record of a job (Celery reports unknown ids as PENDING)."""

    model_config = ConfigDict(frozen=True)

    job_id: str = Field(description="the job's id, derived from its content (cj-…)")
    archetype: ArchetypeOrAll = Field(description="the archetype the job fits, or all")
    state: JobState = Field(description="queued, running, succeeded, failed, rejected or cancelled")
    progress: Progress | None = Field(None, description="how far a running job has got; null before it starts")
    reason: str | None = Field(None, description="why a job failed, was rejected or cancelled")
    deliveries: int = Field(0, description="times a worker took the job (dead-lettered above CALQ_MAX_DELIVERIES)")
    worker: str | None = Field(None, description="the worker that runs or ran it (embedded: embedded)")
    submitted_at: datetime | None = Field(None, description="when it was submitted (UTC)")
    started_at: datetime | None = Field(None, description="when a worker started it (UTC)")
    finished_at: datetime | None = Field(None, description="when it ended (UTC)")
    summary_uri: str | None = Field(None, description="URI of its summary, once it succeeded")
    posterior_uri: str | None = Field(None, description="URI of its posterior, once it succeeded")
    attempt: int = Field(0, description="the delivery attempt (Celery retry number) that deliveries counts")
    sampler_runs: int = Field(0, description="how often the sampler started for this job, over every delivery")
    cancel_requested: bool = Field(False, description="a cancel request for a running job: it stops at its next check")
    cancel_reason: str | None = Field(None, description="why it was cancelled, as the request said")
    updated_at: datetime | None = Field(None, description="when the registry last wrote this record (UTC); listings sort by it")

"""calq's settings: one pydantic-settings object, read once per process.

Every value comes from a ``CALQ_``-prefixed environment variable (or a
``.env`` file in the working directory); nested groups use ``__``, e.g.
``CALQ_SAMPLER__CHAINS=2``. Tests build ``Settings(**overrides)`` instead of
patching the environment; code that runs in a process calls
:func:`get_settings`.

Leaving ``CALQ_BROKER_URL`` unset selects the *embedded* mode: every command
runs in-process on the local store, with no Redis or S3.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.contract.job import SamplerSettings
from shared.contract.queues import queue_for
from shared.contract.summary import ConvergenceCriteria

DEFAULT_STORE = "./calq-store"
#: Fewest scenarios per race by default; ``calq synth`` never writes fewer.
MIN_SCENARIOS = 20
#: What ``CALQ_STORAGE_URL`` may name (a bare path becomes ``file://``) and ``CALQ_BROKER_URL`` may be.
STORAGE_SCHEMES: tuple[str, ...] = ("file", "s3")
REDIS_SCHEMES: tuple[str, ...] = ("redis", "rediss", "unix")


def redact_url(url: str | None) -> str | None:
    """``url`` with any password replaced by ``***``, safe to print or log."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def storage_url_from(value: str) -> str:
    """Normalise a storage location to a URL: a bare path becomes ``file://``."""
    if "://" in value:
        return value.rstrip("/")
    return "file://" + os.path.abspath(os.path.expanduser(value))


class S3Settings(BaseModel):
    """Endpoint and credentials for ``s3://`` storage (MinIO or AWS)."""

    model_config = ConfigDict(frozen=True)

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    region: str | None = None


class RecoverySettings(BaseModel):
    """Leases, the reaper and the patient write: how faults cost seconds, never jobs.

    A running job holds a lease in Redis that its worker renews every
    ``heartbeat_s``; a lease not renewed for ``lease_s`` has lapsed, and the
    reaper (every worker's supervisor, one at a time, every
    ``reaper_interval_s``) hands its job back to the queue. Finished draws
    wait on local disk (``spool_dir``) while the store or Redis is out, and
    the write is retried with backoff (``retry_first_s`` doubling up to
    ``retry_max_s``) for up to ``write_budget_s``; a local permission error
    for up to ``permission_budget_s``.
    """

    model_config = ConfigDict(frozen=True)

    lease_s: float = Field(60.0, gt=0, description="A lease not renewed for this long has lapsed.")
    heartbeat_s: float = Field(10.0, gt=0, description="How often a worker renews the lease of its running job.")
    reaper_interval_s: float = Field(15.0, gt=0, description="How often the fleet looks for lapsed leases.")
    write_budget_s: float = Field(
        3600.0, ge=0, description="How long finished draws wait on local disk for the store or Redis."
    )
    permission_budget_s: float = Field(
        120.0, ge=0, description="How long a local permission error is retried before the job fails."
    )
    retry_first_s: float = Field(1.0, gt=0, description="First pause before writing again; it doubles.")
    retry_max_s: float = Field(30.0, gt=0, description="Longest pause between two write attempts.")
    spool_dir: Path = Field(
        Path("~/.cache/calq/spool").expanduser(), description="Local folder where finished draws wait for the store."
    )
    redis_timeout_s: float = Field(5.0, gt=0, description="A Redis connect or reply that takes longer has failed.")
    redis_keepalive_s: int = Field(
        10, ge=1, description="TCP keepalive on Redis connections: probe after this idle time, then every as long."
    )
    redis_health_check_s: int = Field(
        10, ge=1, description="A Redis connection idle this long is pinged before it is used again."
    )
    silent_child_s: float = Field(
        120.0, gt=0, description="A worker process that has not beaten for this long is restarted (SIGTERM, then SIGKILL)."
    )

    def redis_options(self) -> dict[str, object]:
        """The connection options of every Redis client calq opens (registry, leases, broker, backend).

        A dead connection (a hung NAT or load balancer, a frozen server) is
        noticed within ``redis_timeout_s`` on a request, within about
        ``4 * redis_keepalive_s`` when idle (keepalive: 3 unanswered probes), and
        an idle one is checked before use after ``redis_health_check_s``.
        """
        import socket

        keepalive = {getattr(socket, name): value for name, value in (
            ("TCP_KEEPIDLE", self.redis_keepalive_s), ("TCP_KEEPINTVL", self.redis_keepalive_s), ("TCP_KEEPCNT", 3),
        ) if hasattr(socket, name)}
        return {
            "socket_timeout": self.redis_timeout_s, "socket_connect_timeout": self.redis_timeout_s,
            "socket_keepalive": True, "socket_keepalive_options": keepalive,
            "health_check_interval": self.redis_health_check_s,
        }

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> RecoverySettings:
        if self.heartbeat_s * 2 > self.lease_s:
            raise ValueError("recovery.heartbeat_s must be at most half of recovery.lease_s, or leases lapse under load")
        if self.retry_max_s < self.retry_first_s:
            raise ValueError("recovery.retry_max_s must be at least recovery.retry_first_s")
        if self.silent_child_s < 3 * self.heartbeat_s:
            raise ValueError("recovery.silent_child_s must be at least 3 heartbeats (recovery.heartbeat_s), "
                             "or busy workers are restarted")
        return self


class DataLimits(BaseModel):
    """What one job may cost a worker: checked before the work they bound.

    Dataset limits are read from the NetCDF header before any array is
    decoded (:mod:`shared.data.limits`); the defaults fit a 10-season ×
    10,000-scenario × 50-driver dataset (360 × 10,000 × 50 cells: 720 MB per
    float32 variable). Job caps bound what a producer asks for: a job above
    one is rejected naming the cap, never run smaller.
    """

    model_config = ConfigDict(frozen=True)

    max_decoded_bytes: int = Field(4 * 2**30, ge=1, description="Bytes of all variables once decoded (and of the file).")
    max_races: int = Field(2_000, ge=1, description="Length of the race dimension.")
    max_scenarios: int = Field(20_000, ge=1, description="Length of the scenario dimension.")
    max_drivers: int = Field(200, ge=2, description="Length of the driver dimension.")
    max_id_chars: int = Field(200, ge=1, description="Characters in one race id, driver id, track or archetype name.")
    min_scenarios: int = Field(MIN_SCENARIOS, ge=1, description="Fewest scenarios per race a forecast probability is built from.")
    max_chains: int = Field(8, ge=1, description="Chains one job may ask for.")
    max_draws_per_chain: int = Field(20_000, ge=2, description="Warmup plus samples one chain may ask for.")
    max_events: int = Field(10, ge=1, description="Events one job may fit.")
    future_days: float = Field(
        2.0, ge=0, le=366,
        description="Days after the time of validation a race may be dated (time zones, a schedule published early).",
    )


class MetricsSettings(BaseModel):
    """What the fleet shows of itself: Prometheus metrics and the heartbeat records ``calq fleet`` reads.

    Each worker's supervisor serves ``/metrics`` on ``host:port`` (its
    children's metrics together, and the queue depths read from Redis at
    scrape time); one supervisor per host, or one port each. Every worker
    process writes its heartbeat record every ``heartbeat_s``; a record not
    renewed for three times that has expired (the worker is gone).
    """

    model_config = ConfigDict(frozen=True)

    enabled: bool = Field(True, description="Serve /metrics from each worker's supervisor.")
    port: int = Field(9464, ge=0, le=65535, description="Port of /metrics (0: any free port, logged).")
    host: str = Field("127.0.0.1", description="Address /metrics listens on (0.0.0.0 in a container, for Prometheus).")
    heartbeat_s: float = Field(5.0, gt=0, description="How often each worker process publishes its heartbeat record.")


class ApiSettings(BaseModel):
    """The calibration API (``calq serve``) and the clients that speak to it.

    A producer sets ``url`` and ``token`` and nothing else: its client and
    CLI then speak HTTP to the API (:mod:`producer.api`), never to Redis or
    the store. The server listens on ``host:port`` (loopback by default),
    refuses request bodies over ``max_body_bytes`` (datasets stream to disk,
    up to ``limits.max_decoded_bytes``), and keeps tokens as sha256 hashes in
    Redis or in ``tokens_file`` (``tokens``).
    """

    model_config = ConfigDict(frozen=True)

    url: str | None = Field(None, description="CALQ_API__URL: where the calibration API answers, e.g. http://127.0.0.1:8000.")
    token: SecretStr | None = Field(None, description="CALQ_API__TOKEN: this producer's bearer token (calq token create).")
    host: str = Field("127.0.0.1", description="Address calq serve listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port calq serve listens on.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest JSON request body the API reads.")
    tokens: Literal["redis", "file"] = Field("redis", description="Where token hashes live: Redis, or tokens_file.")
    tokens_file: Path = Field(Path("~/.config/calq/tokens.json").expanduser(), description="The token file (tokens=file).")
    timeout_s: float = Field(30.0, gt=0, description="How long a client waits for one answer from the API.")
    batch_feed_depth: int = Field(
        4, ge=1, description="Batch jobs the API keeps in the workers' batch queue; the rest wait, round-robin by token."
    )

    @property
    def remote(self) -> bool:
        """True when a client should speak HTTP: both ``url`` and ``token`` are set."""
        return bool(self.url) and self.token is not None


class BatchSettings(BaseModel):
    """Batch deliveries: a backfill's compatible jobs sent as one message (:mod:`shared.jobs.batch`)."""

    model_config = ConfigDict(frozen=True)

    max_jobs: int = Field(
        32, ge=1, le=128,
        description="CALQ_BATCH__MAX_JOBS: the most jobs one batch message carries (a backfill sends no larger "
        "batches; a worker handed more runs them in batches of this size).",
    )


class RedisAclSettings(BaseModel):
    """Passwords of the Redis ACL users ``calq acl`` writes (:mod:`shared.jobs.acl`); each is written as its sha256."""

    model_config = ConfigDict(frozen=True)

    api_password: SecretStr | None = Field(None, description="CALQ_REDIS_ACL__API_PASSWORD: the API's Redis user.")
    worker_password: SecretStr | None = Field(None, description="CALQ_REDIS_ACL__WORKER_PASSWORD: the workers' Redis user.")
    operator_password: SecretStr | None = Field(
        None, description="CALQ_REDIS_ACL__OPERATOR_PASSWORD: the operator's Redis user (every command)."
    )


class LogSettings(BaseModel):
    """How workers log: ``text`` lines, or ``json`` (one object per line, for Loki or ELK)."""

    model_config = ConfigDict(frozen=True)

    format: Literal["text", "json"] = Field(
        "text", description="text, or json: time, level, worker, job_id, archetype, phase, message."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CALQ_",
        env_file=".env",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
    )

    broker_url: SecretStr | None = Field(
        None, description="Redis URL of the Celery broker; unset means embedded, in-process mode."
    )
    result_backend: SecretStr | None = Field(
        None, description="Celery result backend URL; defaults to the broker URL."
    )
    storage_url: str = Field(
        DEFAULT_STORE, description="Where datasets, posteriors and summaries live: a folder, file:// or s3://."
    )
    s3: S3Settings = S3Settings()
    signing_key: SecretStr | None = Field(
        None,
        description="CALQ_SIGNING_KEY: the fleet's HMAC-SHA256 key, held by workers and the operator only (never "
        "producers, who hold the store's key). Workers sign each summary and, through the posterior's sha256 "
        "recorded in it, its posterior; readers (warm start, reindex, latest, report) skip what does not verify. "
        "Unset: embedded mode, nothing signed and every summary trusted.",
    )
    sampler: SamplerSettings = Field(SamplerSettings(), description="sampler settings a job gets when its producer names none")
    convergence: ConvergenceCriteria = ConvergenceCriteria()
    warm_start: bool = Field(
        True,
        description="Start a job's sampler from the nearest stored fit of its archetype, with a shorter warmup; "
        "the result agrees with a cold start within Monte Carlo error.",
    )
    default_queue: Literal["calq.gpu", "calq.cpu"] = Field(
        "calq.cpu",
        description="Queue of submitted jobs (gpu and cpu name them too); GPU workers serve both queues, CPU workers "
        "calq.cpu.",
    )

    job_time_limit_s: int = Field(3600, ge=1, description="Hard wall-clock limit of one job.")
    limits: DataLimits = DataLimits()
    dataset_roots: tuple[str, ...] = Field(
        (),
        description="Extra read-only folders (or file:// URLs) a job may read datasets from, for embedded use; "
        "the fleet reads only the store's datasets/<sha256>.nc.",
    )
    visibility_timeout_s: int = Field(
        6 * 3600,
        ge=60,
        description="Redis redelivers an unacknowledged job after this long; must exceed queue wait plus run time.",
    )
    max_deliveries: int = Field(3, ge=1, description="Deliveries of one job before it is dead-lettered.")
    max_eta_s: int = Field(
        900,
        ge=0,
        description="The furthest ahead a message's ETA or countdown may lie (calq's own retries wait at most 600 s "
        "plus jitter); a worker counts a message asking to wait longer in calq:invalid and drops it, never parking it.",
    )
    recovery: RecoverySettings = RecoverySettings()
    compile_cache_dir: Path | None = Field(
        Path("~/.cache/calq/jax").expanduser(),
        description="JAX persistent compilation cache; empty to disable.",
    )
    log_level: str = "INFO"
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    api: ApiSettings = ApiSettings()
    batch: BatchSettings = BatchSettings()
    redis_acl: RedisAclSettings = RedisAclSettings()

    @field_validator("storage_url")
    @classmethod
    def _normalise_storage(cls, value: str) -> str:
        url = storage_url_from(value)
        scheme = urlsplit(url).scheme
        if scheme not in STORAGE_SCHEMES:
            raise ValueError(f"storage scheme {scheme!r} is not one of {', '.join(STORAGE_SCHEMES)} (or a folder)")
        if scheme == "s3" and not urlsplit(url).netloc:
            raise ValueError("an s3:// storage URL names a bucket: s3://bucket/prefix")
        return url

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        # Only the scheme is named: the rest of the URL may hold a password.
        scheme = urlsplit(value.get_secret_value()).scheme if value is not None else None
        if scheme is not None and scheme not in REDIS_SCHEMES:
            found = f"this one starts with {scheme}://" if scheme else "this one has no scheme"
            raise ValueError(f"a Redis URL starts with {', '.join(s + '://' for s in REDIS_SCHEMES)}; {found}")
        return value

    @field_validator("default_queue", mode="before")
    @classmethod
    def _queue_name(cls, value: object) -> object:
        """A queue's short or full name, in any case, read by the one rule (:func:`shared.contract.queues.queue_for`)."""
        return queue_for(value) if isinstance(value, str) else value

    @field_validator("compile_cache_dir", mode="before")
    @classmethod
    def _empty_disables_cache(cls, value: object) -> object:
        return None if value in ("", None) else value

    @model_validator(mode="after")
    def _visibility_outlasts_jobs(self) -> Settings:
        if self.visibility_timeout_s <= self.job_time_limit_s:
            raise ValueError(
                "visibility_timeout_s must exceed job_time_limit_s, or Redis redelivers running jobs"
            )
        return self

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: jobs run in this process."""
        return self.broker_url is None

    def broker(self) -> str:
        if self.broker_url is None:
            raise ValueError("no broker configured (set CALQ_BROKER_URL)")
        return self.broker_url.get_secret_value()

    def backend(self) -> str:
        return self.result_backend.get_secret_value() if self.result_backend else self.broker()

    def public(self) -> dict[str, object]:
        """The settings as a dict that is safe to print: passwords are masked."""
        data = self.model_dump(mode="json")
        data["broker_url"] = redact_url(self.broker_url.get_secret_value()) if self.broker_url else None
        data["result_backend"] = (
            redact_url(self.result_backend.get_secret_value()) if self.result_backend else None
        )
        data["storage_url"] = redact_url(self.storage_url)
        if self.s3.secret_access_key is not None:
            data["s3"]["secret_access_key"] = "***"
        return data


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings()


def redis_client(url: str, recovery: RecoverySettings | None = None):  # -> redis.Redis (imported lazily)
    """A Redis client for ``url`` with :meth:`RecoverySettings.redis_options` (default: this process's settings).

    Every Redis client calq opens is made here (Celery's broker and backend
    get the same numbers through :func:`shared.jobs.celery_app.celery_config`).
    """
    import redis

    return redis.Redis.from_url(url, **(recovery or get_settings().recovery).redis_options())

"""Who submitted a job, and whether a token may submit another: ownership and quotas.

Redis layout (``{prefix}`` is the registry's):

- ``{prefix}:api:owner`` (hash job_id → token name): the token that first
  submitted a job; a producer may cancel only jobs it owns.
- ``{prefix}:api:active:{token}`` (set of job ids): that token's jobs that
  may still be queued or running. Members whose record has finished (or
  vanished) are pruned when the set reaches the quota, so the count is exact
  when it matters and costs one SCARD when it does not.

A quota is checked before the job is claimed: a refused job leaves no
record, no message and no reservation behind (a 429, never a silent drop).
The reservation is taken with SADD before the count is read, so two
submissions racing for the last slot can both be refused but never both
admitted over the quota.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from producer.api.tokens import Role, Token
from shared.contract.errors import OverQuota
from shared.contract.job import CalibrationJob, JobStatus

log = logging.getLogger(__name__)

#: What a 429 over ``max_queued`` asks the caller to wait before trying again.
RETRY_AFTER_S = 30


def job_draws(job: CalibrationJob) -> int:
    """A job's size as quotas count it: chains × (warmup + samples)."""
    s = job.sampler
    return s.chains * (s.warmup + s.samples)


class Admission:
    """Quotas and ownership of API jobs (see the module docstring)."""

    def __init__(self, redis_client: Any, *, prefix: str = "calq") -> None:
        self.redis = redis_client
        self.owner_key = f"{prefix}:api:owner"
        self._active = f"{prefix}:api:active:"

    def owner(self, job_id: str) -> str | None:
        raw = self.redis.hget(self.owner_key, job_id)
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw

    def may_cancel(self, token: Token, job_id: str) -> bool:
        """An operator may cancel any job; a producer only the jobs it submitted first."""
        return token.role is Role.OPERATOR or self.owner(job_id) == token.name

    def check_size(self, token: Token, job: CalibrationJob) -> None:
        """OverQuota (no retry helps) if the job is larger than the token's ``max_draws``."""
        draws = job_draws(job)
        if token.max_draws is not None and draws > token.max_draws:
            raise OverQuota(
                f"the job asks for {draws:,} draws (chains × (warmup + samples)), above this token's quota of "
                f"{token.max_draws:,}: ask for fewer chains or draws"
            )

    def reserve(self, token: Token, job_id: str, *, record: Callable[[str], JobStatus | None]) -> None:
        """Count ``job_id`` against the token's ``max_queued``; OverQuota (retry later) if it would exceed it."""
        if token.max_queued is None:
            return
        key = self._active + token.name
        added = self.redis.sadd(key, job_id)
        if not added or self.redis.scard(key) <= token.max_queued:
            return
        self._prune(key, record, keep=job_id)
        if self.redis.scard(key) <= token.max_queued:
            return
        self.redis.srem(key, job_id)
        raise OverQuota(
            f"this token has {token.max_queued} job(s) queued or running, its quota: try again when one has finished",
            retry_after_s=RETRY_AFTER_S,
        )

    def settle(self, token: Token, status: JobStatus, *, sent: bool) -> None:
        """After the claim: own a job this token sent first; drop the reservation of one that is not active."""
        if sent:
            self.redis.hsetnx(self.owner_key, status.job_id, token.name)
        if status.state.finished and token.max_queued is not None:
            self.redis.srem(self._active + token.name, status.job_id)

    def release(self, token: Token, job_id: str) -> None:
        """Undo :meth:`reserve` for a job that was not submitted after all."""
        if token.max_queued is not None:
            self.redis.srem(self._active + token.name, job_id)

    def _prune(self, key: str, record: Callable[[str], JobStatus | None], *, keep: str) -> None:
        for raw in self.redis.smembers(key):
            job_id = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            if job_id == keep:
                continue
            status = record(job_id)
            if status is None or status.state.finished:
                self.redis.srem(key, raw)



__all__ = ["RETRY_AFTER_S", "Admission", "job_draws"]

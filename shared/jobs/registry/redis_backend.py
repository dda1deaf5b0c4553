"""The fleet's registry: records, latest pointers and deliveries in Redis (see :mod:`shared.jobs.registry`)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from shared.contract.errors import (
    AuthenticationFailed,
    BrokerUnavailable,
    is_authentication_failure,
    redis_refusing_writes,
)
from shared.contract.job import JobStatus
from shared.contract.settings import RecoverySettings, redact_url, redis_client
from shared.jobs.registry.base import DEFAULT_RECORD_TTL_S, INVALID_KEEP, Change, JobRegistry, _message
from shared.jobs.registry.values import Corrupt, Holds, read_record
from shared.storage.catalog import LatestPointer, is_newer, newest_pointers

log = logging.getLogger(__name__)


# -- Redis ---------------------------------------------------------------------


class RedisRegistry(JobRegistry):
    """Job records in Redis, shared by the producers and workers of a fleet."""

    def __init__(
        self,
        redis_client: Any,
        *,
        prefix: str = "calq",
        record_ttl_s: int = DEFAULT_RECORD_TTL_S,
        url: str | None = None,
        holds: Holds | None = None,
    ) -> None:
        """``holds``: the store's ``Store.holds``; a pointer naming a summary outside it is corrupt."""
        self.redis = redis_client
        self.holds = holds
        self.prefix = prefix
        self.record_ttl_s = record_ttl_s
        self.channel = f"{prefix}:jobs"
        self._latest_key = f"{prefix}:latest"
        self._index_key = f"{prefix}:index"
        self._invalid_key = f"{prefix}:invalid"
        self._url = redact_url(url) if url else _describe(redis_client)
        self._fence: Any = None

    def fenced(self, fence: Any) -> RedisRegistry:
        """This registry, with every record change fenced by a worker's lease (:class:`shared.jobs.lease.Fence`).

        Each change runs in a transaction that also WATCHes the lease and
        commits only while the lease is ``fence``'s: a worker that lost its
        lease changes no record (:class:`~shared.jobs.lease.LeaseLost` is
        raised instead), not even a progress value. A record created where
        there is none (after a flush) is checked just before.
        """
        view = copy.copy(self)
        view._fence = fence
        return view

    @classmethod
    def from_url(cls, url: str, *, recovery: RecoverySettings | None = None, **options: Any) -> RedisRegistry:
        """A registry on a new client for ``url`` (timeouts and keepalive: :func:`~shared.contract.settings.redis_client`)."""
        return cls(redis_client(url, recovery), url=url, **options)

    def __repr__(self) -> str:
        return f"RedisRegistry({self._url!r}, prefix={self.prefix!r})"

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _deliveries_key(self, job_id: str, attempt: int) -> str:
        return f"{self.prefix}:deliveries:{job_id}:{attempt}"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Map connection and timeout errors, and writes Redis refuses for now, to BrokerUnavailable, without credentials."""
        import redis.exceptions as rex

        try:
            yield
        except (rex.ConnectionError, rex.TimeoutError, rex.ResponseError) as exc:
            if is_authentication_failure(exc):  # a subclass of ConnectionError, but permanent
                raise AuthenticationFailed(
                    f"authentication failed at {self._url}: Redis refused calq's password (check CALQ_BROKER_URL)"
                ) from exc
            refusing = redis_refusing_writes(exc)
            if refusing is not None:  # full or cannot persist: transient, like an outage
                raise BrokerUnavailable(f"Redis at {self._url} refuses writes: {refusing}") from exc
            if isinstance(exc, rex.ResponseError):
                raise
            raise BrokerUnavailable(f"Redis unavailable at {self._url}: {type(exc).__name__}: {exc}") from exc

    def _record_key(self, job_id: str) -> str:
        return self._job_key(job_id)

    def _raw_record(self, job_id: str) -> bytes | None:
        with self._errors():
            return self.redis.get(self._job_key(job_id))

    def _insert(self, status: JobStatus) -> bool:
        """``SET NX``, except that a corrupt record is replaced (WATCHed, so a real record written meanwhile wins)."""
        key = self._job_key(status.job_id)

        def replace_corrupt(pipe: Any) -> bool:
            raw = pipe.get(key)
            if raw is not None and self._record_or_none(status.job_id, raw) is not None:
                return False
            if raw is not None:
                log.warning("replacing the corrupt record at %s", key)
            pipe.multi()
            pipe.set(key, status.model_dump_json(), ex=self.record_ttl_s)
            return True

        if self._fence is not None:
            self._fence.check("a new record")
        with self._errors():
            created = bool(self.redis.set(key, status.model_dump_json(), nx=True, ex=self.record_ttl_s))
            if not created:
                created = self.redis.transaction(replace_corrupt, key, value_from_callable=True)
            if created:
                now = time.time()
                pipe = self.redis.pipeline(transaction=False)
                pipe.zadd(self._index_key, {status.job_id: now})
                pipe.zremrangebyscore(self._index_key, "-inf", now - self.record_ttl_s)  # records gone by TTL
                pipe.execute()
            return created

    def _mutate(self, job_id: str, change: Change) -> tuple[JobStatus | None, JobStatus | None]:
        key = self._job_key(job_id)

        fence = self._fence

        def attempt(pipe: Any) -> tuple[JobStatus | None, JobStatus | None]:
            if fence is not None:
                fence.check_in(pipe, "a record change")
            before = self._record_or_none(job_id, pipe.get(key))
            if before is None:
                return None, None
            after = change(before)
            if after is not None:
                pipe.multi()
                pipe.set(key, after.model_dump_json(), ex=self.record_ttl_s)
                pipe.zadd(self._index_key, {job_id: time.time()})
            return before, after

        with self._errors():
            return self.redis.transaction(attempt, key, *(fence.keys if fence is not None else ()), value_from_callable=True)

    def _count_delivery(self, job_id: str, attempt: int, by: int = 1) -> int:
        key = self._deliveries_key(job_id, attempt)
        with self._errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.incrby(key, by)
            pipe.expire(key, self.record_ttl_s)
            count, _ = pipe.execute()
        return int(count)

    def _reset_deliveries(self, job_id: str) -> None:
        pattern = f"{_glob_escape(self.prefix)}:deliveries:{_glob_escape(job_id)}:*"
        with self._errors():
            keys = list(self.redis.scan_iter(match=pattern, count=1000))
            if keys:
                self.redis.delete(*keys)

    def _newest(self) -> Iterator[JobStatus | Corrupt]:
        page, start = 100, 0
        while True:
            with self._errors():
                ids = self.redis.zrevrange(self._index_key, start, start + page - 1)
                if not ids:
                    return
                job_ids = [_text(i) for i in ids]
                raws = self.redis.mget([self._job_key(i) for i in job_ids])
                gone = [i for i, raw in zip(ids, raws) if raw is None]
                if gone:  # expired records leave the index as they are met
                    self.redis.zrem(self._index_key, *gone)
            for job_id, raw in zip(job_ids, raws):
                if raw is not None:
                    yield read_record(raw, key=self._job_key(job_id), job_id=job_id)
            start += len(ids) - len(gone)

    def _append_invalid(self, entry: dict[str, str]) -> None:
        with self._errors():
            # exact MAXLEN (no ``~``): the stream never holds more than INVALID_KEEP, whatever was written to it
            self.redis.xadd(self._invalid_key, entry, maxlen=INVALID_KEEP, approximate=False)

    def invalid_messages(self, limit: int = 100) -> list[dict[str, str]]:
        with self._errors():
            entries = self.redis.xrevrange(self._invalid_key, count=limit)
        return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in entries]

    def invalid_count(self) -> int:
        """How many refused messages ``{prefix}:invalid`` holds (at most INVALID_KEEP)."""
        with self._errors():
            return int(self.redis.xlen(self._invalid_key))

    def _merge(self, pointers: list[LatestPointer]) -> list[LatestPointer]:
        best = newest_pointers(pointers)
        fields = [_field(slot) for slot in best]

        def attempt(pipe: Any) -> list[LatestPointer]:
            current = pipe.hmget(self._latest_key, fields)
            moved = [
                p
                for p, field, raw in zip(best.values(), fields, current)
                if is_newer(p, self._pointer_or_none(self._pointer_key(field), p.slot, raw))
            ]
            if moved:
                pipe.multi()
                pipe.hset(self._latest_key, mapping={_field(p.slot): p.model_dump_json() for p in moved})
            return moved

        if not best:
            return []
        with self._errors():
            return self.redis.transaction(attempt, self._latest_key, value_from_callable=True)

    def _pointer_key(self, field: str) -> str:
        return f"{self._latest_key}[{field}]"

    def _raw_pointers(self) -> Iterator[tuple[str, tuple[str, str], bytes]]:
        with self._errors():
            raw = self.redis.hgetall(self._latest_key)
        for name, value in raw.items():
            field = _text(name)
            archetype, _, event = field.partition(":")
            yield self._pointer_key(field), (archetype, event), value

    def _raw_pointer(self, slot: tuple[str, str]) -> tuple[str, bytes | None]:
        with self._errors():
            raw = self.redis.hget(self._latest_key, _field(slot))
        return self._pointer_key(_field(slot)), raw

    def _drop_latest(self) -> None:
        with self._errors():
            self.redis.delete(self._latest_key)

    def _publish(self, status: JobStatus) -> None:
        with self._errors():
            self.redis.publish(self.channel, _message(status))

    def subscribe(self) -> Any:
        """A redis PubSub subscribed to the job-change channel ``{prefix}:jobs``."""
        with self._errors():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(self.channel)
        return pubsub

    @contextlib.contextmanager
    def _listener(self, job_id: str) -> Iterator[Callable[[float], None]]:
        import redis.exceptions as rex

        pubsub = self.subscribe()
        broken = False

        def pause(seconds: float) -> None:
            nonlocal broken
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                if broken:
                    time.sleep(left)
                    return
                try:
                    message = pubsub.get_message(timeout=left)
                except rex.RedisError as exc:  # fall back to polling; reads report real outages
                    log.debug("job-change subscription lost: %s", exc)
                    broken = True
                    continue
                if message is None or message.get("type") != "message":
                    continue
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    if json.loads(message["data"]).get("job_id") == job_id:
                        return

        try:
            yield pause
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _field(slot: tuple[str, str]) -> str:
    return f"{slot[0]}:{slot[1]}"


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _describe(client: Any) -> str:
    """``redis://host:port/db`` of a client, never with its password."""
    try:
        kwargs = client.connection_pool.connection_kwargs
    except AttributeError:
        return type(client).__name__
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"



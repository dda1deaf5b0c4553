"""Leases on running jobs, handing a job back to the queue, and the reaper.

Celery on Redis gives a job back only after its ``visibility_timeout``
(hours): a worker killed mid-job would strand it that long. So a running job
holds a *lease*, a Redis key its worker renews every ``heartbeat_s``; a lease
that is not renewed lapses after ``lease_s``, and the job is handed back::

    worker takes the job ─ acquire ─▶ lease (PX lease_s) ◀─ renew every heartbeat_s ─ Heartbeat
        │                                   │
        ├─ job ends ─ release ─▶ gone        ├─ child dies ─▶ the supervisor takes it at once ─┐
        └─ stop asked (cold shutdown,        └─ lease lapses ─▶ the reaper takes it ─────────────┤
           supervisor gone) ─ release ─▶ handed back by the worker itself ─────────────────────┤
                                                                                                 ▼
                  hand_back: summary in the store? ─yes─▶ record repaired to succeeded
                                                    └─no──▶ record re-queued, message re-published

Keys (``prefix`` is ``calq``):

- ``{prefix}:lease:{job_id}``: ``"{worker}|{token}|{renewed}"``, expiring after ``lease_s``.
  ``token`` comes from the counter ``{prefix}:lease-token`` (a fencing token:
  a renewal or release only touches the lease it took); ``renewed`` is the
  Redis server's clock (ms since the epoch, ``TIME`` inside the scripts, so
  the hosts' clocks never matter) at the last acquire or renewal.
- ``{prefix}:leased``: the set of job ids whose lease is not yet released or
  handed back. Taking a job out of it (``SREM``, atomic) is what entitles
  one actor — the worker, its supervisor or the reaper — to hand it back, so
  a job is re-queued at most once per lapse.
- ``{prefix}:holding:{worker}``: ``"{job_id}|{token}"`` of the job a worker
  process runs, for its supervisor when that process dies.
- ``{prefix}:resend:{job_id}``: the job message, its attempt and its queue,
  to publish it again (the original sits in kombu's ``unacked`` set until the
  visibility timeout, and is dropped as a duplicate when it comes back).

A duplicate delivery of a job whose lease is held elsewhere is not run: the
lease is the mutual exclusion, the registry record is what people read.

Every write a fleet worker makes is fenced by its lease (:class:`Fence`): a
worker frozen or partitioned past its lease, whose job another worker took,
writes nothing when it wakes::

    record change ─ in a transaction WATCHing the lease: commits only while it is this worker's
    posterior     ─ checked, then uploaded to its token's own key ({job_id}.t{token}.nc)
    summary       ─ checked, then written only if absent (the job's publication: one run wins;
                    a loser keeps the winner's summary and deletes its own posterior)

and a :class:`LeaseLost` stops the job (not re-queued: it is another's).
A lease Redis lost with all its keys (FLUSHALL, a restart without its
data) is re-asserted by its worker's next renewal, not abandoned: the token
counter below the lease's own token tells a flush from a hand-back.

A lease's life never comes from its key's TTL alone: anyone with Redis
access can write a lease key (``"deadworker|999"`` with a ten-year TTL). A
lease is *live* only if its value parses and was renewed within ``lease_s``
of the server's clock (and not more than ``lease_s`` ahead of it); any other
value at a lease key, of any type or TTL, is *stale*. A stale lease is
reaped like a lapsed one (:meth:`Leases.lapsed`) and taken over by the next
delivery (:meth:`Leases.acquire`, with a new fencing token). Lease TTLs are
set only here, to ``lease_s``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.jobs import metrics

if TYPE_CHECKING:
    from shared.jobs.services import Services

log = logging.getLogger(__name__)

#: Publishes a job message again: ``publish(message, attempt=..., queue=...)``.
Publisher = Callable[..., Any]

#: A lease key's value (see the module docstring).
_LEASE_VALUE = re.compile(r"(?P<worker>.+)\|(?P<token>\d+)\|(?P<renewed>\d+)", re.DOTALL)

# Shared by the scripts: the server's clock, a lease key's string value (false when absent or of
# another type), the "worker|token" of a value, and whether that value is live (see the module docstring).
_LUA_LEASE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function read(key)
  if redis.call('TYPE', key)['ok'] ~= 'string' then return false end
  return redis.call('GET', key)
end
local function holder_of(value)
  if not value then return nil end
  return string.match(value, '^(.+|%d+)|%d+$')
end
local function live(value, lease_ms, now)
  if holder_of(value) == nil then return false end
  local renewed = tonumber(string.match(value, '|(%d+)$'))
  return renewed ~= nil and now - renewed <= lease_ms and renewed - now <= lease_ms
end
"""

# KEYS: lease, leased, holding, resend, token counter.
# ARGV: worker, lease ms, job id, resend JSON, record ttl s.
# A live lease held by anyone refuses; a stale one (or anything else at the key) is taken over.
_ACQUIRE = _LUA_LEASE + """
local now = now_ms()
if live(read(KEYS[1]), tonumber(ARGV[2]), now) then return false end
local token = redis.call('INCR', KEYS[5])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token .. '|' .. now, 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[3] .. '|' .. token, 'EX', ARGV[5])
redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[5])
return token
"""

# KEYS: lease, leased, holding, token counter. ARGV: holder ("worker|token"), lease ms, job id, token,
# holding value, record ttl s.
# 1: renewed (renewal time now, TTL lease ms); 1 also when the lease had lapsed but nobody took the job
# yet (taken again); 2: re-asserted: Redis lost its keys (flushed, or restarted empty: the token counter
# is below this lease's token, which tokens never are otherwise), so the lease, the leased set, the
# holding key and the counter are written again; 0: someone else holds it, or the job was handed back.
_RENEW = _LUA_LEASE + """
local current = read(KEYS[1])
if holder_of(current) == ARGV[1]
   or (current == false and redis.call('SISMEMBER', KEYS[2], ARGV[3]) == 1) then
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. now_ms(), 'PX', ARGV[2])
  return 1
end
local counter = tonumber(redis.call('GET', KEYS[4]) or '0') or 0
if current == false and redis.call('EXISTS', KEYS[1]) == 0 and counter < tonumber(ARGV[4]) then
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. now_ms(), 'PX', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6])
  redis.call('SET', KEYS[4], ARGV[4])
  return 2
end
return 0
"""

# KEYS: lease, leased, holding. ARGV: holder ("worker|token"), job id, holding value.
# Drops this worker's lease; 1 if the job was still this worker's to release.
_RELEASE = _LUA_LEASE + """
if read(KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]) end
local current = read(KEYS[1])
if holder_of(current) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return redis.call('SREM', KEYS[2], ARGV[2])
end
if current == false and redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('SREM', KEYS[2], ARGV[2]) end
return 0
"""

# KEYS: lease, leased. ARGV: job id, lease ms. The reaper's claim: 1 if the lease has lapsed or is
# stale (not renewed within lease ms, or not a lease at all) and the job is now ours; the stale key goes.
_CLAIM_LAPSED = _LUA_LEASE + """
if live(read(KEYS[1]), tonumber(ARGV[2]), now_ms()) then return 0 end
local claimed = redis.call('SREM', KEYS[2], ARGV[1])
if claimed == 1 then redis.call('DEL', KEYS[1]) end
return claimed
"""

# KEYS: holding, leased. ARGV: worker, lease key prefix.
# The supervisor's claim on a dead child's job: its id if the child still held it.
_CLAIM_HELD = _LUA_LEASE + """
local held = read(KEYS[1])
if held == false then return false end
redis.call('DEL', KEYS[1])
local job, token = string.match(held, '^(.*)|(%d+)$')
if job == nil then return false end
local lease = ARGV[2] .. job
local current = read(lease)
if current ~= false and holder_of(current) ~= (ARGV[1] .. '|' .. token) then return false end
if current ~= false then redis.call('DEL', lease) end
if redis.call('SREM', KEYS[2], job) == 1 then return job end
return false
"""


class HandBack(BaseException):
    """Stop the running job at its next check and give it back, unfinished.

    A ``BaseException`` on purpose: it is no failure of the job, so the
    handler's ``except Exception`` never records it as one. ``requeue`` is
    False when the job is no longer this worker's (its lease was taken).
    """

    def __init__(self, reason: str, *, requeue: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.requeue = requeue


class LeaseLost(HandBack):
    """This worker no longer holds the job's lease: it stops before ``what`` and writes nothing.

    The job is another worker's now (or was handed back): not re-queued.
    """

    def __init__(self, what: str) -> None:
        super().__init__(f"its lease was lost before {what}: the job is another worker's now (nothing written)",
                         requeue=False)
        self.what = what


@dataclass(frozen=True)
class Lease:
    """A lease this process holds: ``job_id``, ``worker`` and its fencing ``token``."""

    job_id: str
    worker: str
    token: int

    @property
    def value(self) -> str:
        """``"{worker}|{token}"``: the lease key's value without its renewal time."""
        return f"{self.worker}|{self.token}"


class Leases:
    """The lease keys of one fleet (one Redis, one prefix)."""

    def __init__(self, redis_client: Any, *, prefix: str = "calq", lease_s: float = 60.0,
                 record_ttl_s: int = 30 * 24 * 3600) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.lease_ms = max(1, int(lease_s * 1000))
        self.record_ttl_s = record_ttl_s
        self._acquire = redis_client.register_script(_ACQUIRE)
        self._renew = redis_client.register_script(_RENEW)
        self._release = redis_client.register_script(_RELEASE)
        self._claim_lapsed = redis_client.register_script(_CLAIM_LAPSED)
        self._claim_held = redis_client.register_script(_CLAIM_HELD)

    @classmethod
    def from_url(cls, url: str, *, recovery: Any = None, **options: Any) -> Leases:
        """Leases on a new client for ``url`` (timeouts and keepalive: :func:`~shared.contract.settings.redis_client`)."""
        from shared.contract.settings import redis_client

        return cls(redis_client(url, recovery), **options)

    # -- keys --

    def lease_key(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    @property
    def leased_key(self) -> str:
        return f"{self.prefix}:leased"

    def holding_key(self, worker: str) -> str:
        return f"{self.prefix}:holding:{worker}"

    def resend_key(self, job_id: str) -> str:
        return f"{self.prefix}:resend:{job_id}"

    @property
    def token_key(self) -> str:
        return f"{self.prefix}:lease-token"

    # -- the worker's side --

    def acquire(self, job_id: str, worker: str, *, message: Mapping[str, Any], attempt: int = 0,
                queue: str | None = None) -> Lease | None:
        """Take the lease of ``job_id`` for ``worker``; None if another worker holds it."""
        resend = json.dumps({"message": dict(message), "attempt": attempt, "queue": queue}, separators=(",", ":"))
        token = self._acquire(
            keys=[self.lease_key(job_id), self.leased_key, self.holding_key(worker), self.resend_key(job_id),
                  self.token_key],
            args=[worker, self.lease_ms, job_id, resend, self.record_ttl_s],
        )
        return None if token is None else Lease(job_id, worker, int(token))

    def renew(self, lease: Lease) -> bool:
        """Extend the lease by ``lease_s``; False if the job is no longer this worker's.

        A lease Redis lost with all its keys (FLUSHALL, a restart without
        its data) is re-asserted, with a warning: the job is still this
        process's, and nobody else can have taken it.
        """
        renewed = self._renew(
            keys=[self.lease_key(lease.job_id), self.leased_key, self.holding_key(lease.worker), self.token_key],
            args=[lease.value, self.lease_ms, lease.job_id, lease.token, f"{lease.job_id}|{lease.token}",
                  self.record_ttl_s],
        )
        if renewed == 2:
            log.warning("the lease of %s was gone with the rest of Redis (flushed or restarted empty): re-asserted; "
                        "the job carries on here", lease.job_id)
        return bool(renewed)

    def holds(self, lease: Lease, value: bytes | None, now_ms: int) -> bool:
        """Whether ``value`` (the lease key's, read at the server time ``now_ms``) is ``lease``, live."""
        match = None if value is None else _LEASE_VALUE.fullmatch(value.decode(errors="replace"))
        return (match is not None and f"{match['worker']}|{match['token']}" == lease.value
                and abs(now_ms - int(match["renewed"])) <= self.lease_ms)

    def release(self, lease: Lease) -> bool:
        """Drop the lease (the job ended, or this worker hands it back); True if it was still this worker's."""
        return bool(self._release(
            keys=[self.lease_key(lease.job_id), self.leased_key, self.holding_key(lease.worker)],
            args=[lease.value, lease.job_id, f"{lease.job_id}|{lease.token}"],
        ))

    def holder(self, job_id: str) -> str | None:
        """The worker holding a live lease of ``job_id``, or None (none, or a stale one: see the module docstring)."""
        raw = self.redis.get(self.lease_key(job_id))
        match = None if raw is None else _LEASE_VALUE.fullmatch(raw.decode(errors="replace"))
        if match is None:
            return None
        seconds, micros = self.redis.time()
        age_ms = seconds * 1000 + micros // 1000 - int(match["renewed"])
        return match["worker"] if abs(age_ms) <= self.lease_ms else None

    # -- the supervisor's and the reaper's side --

    def leased(self, job_id: str) -> bool:
        """Whether ``job_id`` is in the leased set: running under a lease, or lapsed and the reaper's to hand back."""
        return bool(self.redis.sismember(self.leased_key, job_id))

    def claim_held(self, worker: str) -> str | None:
        """The job ``worker`` (a process that died) held, now to be handed back; None if none."""
        job = self._claim_held(keys=[self.holding_key(worker), self.leased_key],
                               args=[worker, f"{self.prefix}:lease:"])
        return None if job is None else job.decode()

    def lapsed(self) -> list[str]:
        """Claim every job whose lease has lapsed; each is the caller's to hand back."""
        claimed = []
        for raw in self.redis.smembers(self.leased_key):
            job_id = raw.decode()
            if self._claim_lapsed(keys=[self.lease_key(job_id), self.leased_key], args=[job_id, self.lease_ms]):
                claimed.append(job_id)
        return claimed

    def unclaim(self, job_id: str) -> None:
        """Put a claimed job back in the leased set (its hand-back failed; the reaper tries again)."""
        self.redis.sadd(self.leased_key, job_id)

    def resend_info(self, job_id: str) -> dict[str, Any] | None:
        """What :meth:`acquire` kept to publish the job again, or None."""
        raw = self.redis.get(self.resend_key(job_id))
        return None if raw is None else json.loads(raw)

    def try_lock(self, name: str, ttl_s: float) -> bool:
        """Take the fleet-wide lock ``name`` for ``ttl_s`` (never released early: one holder per period)."""
        return bool(self.redis.set(f"{self.prefix}:lock:{name}", uuid.uuid4().hex, nx=True,
                                   px=max(1, int(ttl_s * 1000))))


@dataclass(frozen=True)
class Fence:
    """What fences a fleet worker's writes: its lease, whose fencing ``token`` names its uploads.

    :meth:`check` comes before each store write (the posterior, the
    summary); :meth:`check_in` inside each record change's transaction
    (the registry's :meth:`~shared.jobs.registry.RedisRegistry.fenced`),
    which WATCHes :attr:`keys`, so a change commits only while the lease is
    this worker's. Either raises :class:`LeaseLost` when it is not. Embedded
    mode has no leases and no fence.
    """

    leases: Leases
    lease: Lease

    @property
    def token(self) -> int:
        return self.lease.token

    @property
    def keys(self) -> list[str]:
        """The keys a fenced transaction watches."""
        return [self.leases.lease_key(self.lease.job_id)]

    def check(self, what: str) -> None:
        """Raise :class:`LeaseLost` unless the lease is still this worker's (renewed, or re-asserted after a flush)."""
        if not self.leases.renew(self.lease):
            log.warning("not writing %s: the lease of %s is no longer this worker's", what, self.lease.job_id)
            raise LeaseLost(what)

    def check_in(self, pipe: Any, what: str) -> None:
        """:meth:`check` inside a transaction watching :attr:`keys` (``pipe``: redis-py's, in immediate mode).

        A lease that is this worker's but not live here (lapsed, or lost
        with a flushed Redis) is renewed through :meth:`check`, which changes
        the watched key: the transaction then runs again, and passes.
        """
        seconds, micros = pipe.time()
        if not self.leases.holds(self.lease, pipe.get(self.keys[0]), int(seconds) * 1000 + int(micros) // 1000):
            self.check(what)


class Heartbeat:
    """A daemon thread renewing ``lease`` every ``interval_s`` until :meth:`stop`.

    A renewal that fails (Redis out) is tried again at the next beat; the
    lease lasts ``lease_s``, several beats. When the job is no longer this
    worker's (:meth:`Leases.renew` says so), :attr:`lost` is set and the
    beats stop. ``on_beat`` is called at every beat (the worker tells its
    supervisor it is alive: :func:`worker.protocol.beat`).
    """

    def __init__(self, leases: Leases, lease: Lease, *, interval_s: float,
                 on_beat: Callable[[], Any] | None = None) -> None:
        self.leases, self.lease, self.interval_s, self.on_beat = leases, lease, interval_s, on_beat
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.job_id}", daemon=True)
        self._warned = False

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.on_beat is not None:
                self.on_beat()
            try:
                if not self.leases.renew(self.lease):
                    log.warning("lease of %s lost: the job was handed back or taken by another worker", self.lease.job_id)
                    self.lost.set()
                    return
                if self._warned:
                    log.info("lease of %s renewed again", self.lease.job_id)
                    self._warned = False
            except Exception as exc:  # Redis out: the lease outlasts several beats
                if not self._warned:
                    log.warning("could not renew the lease of %s (%s: %s); trying again",
                                self.lease.job_id, type(exc).__name__, exc)
                    self._warned = True


# -- handing back ------------------------------------------------------------------


def hand_back(job_id: str, *, services: Services, reason: str, count_delivery: bool) -> str:
    """Give a job nobody runs any more back to the fleet; returns what was done.

    The caller has claimed the job (out of the leased set of
    ``services.leases``). If its summary is in the store the record is
    repaired to succeeded (``"repaired"``: finished work is never redone); if
    the record is already final nothing happens (``"finished"``); otherwise
    the record goes back to queued — the delivery counted or not, per
    ``count_delivery`` — and its message is published again with
    ``services.publish`` (``"requeued"``). On any error the claim is returned
    (the reaper tries again) and the error raised.
    """
    registry, leases = services.registry, services.leases
    try:
        record = registry.find(job_id)
        if record is not None and record.state.finished:
            return "finished"
        if registry.repair(job_id, services.catalog) is not None:
            log.info("job %s: its summary is in the store; record repaired to succeeded (%s)", job_id, reason)
            return "repaired"
        resend = leases.resend_info(job_id)
        if record is None or resend is None:
            log.error("job %s cannot be handed back (%s): no %s", job_id, reason,
                      "record" if record is None else "message to publish")
            return "lost"
        registry.requeue_abandoned(job_id, reason=reason, count_delivery=count_delivery)
        services.publish(resend["message"], attempt=resend.get("attempt", 0), queue=resend.get("queue"))
        log.warning("job %s handed back to the queue: %s", job_id, reason)
        return "requeued"
    except Exception:
        try:
            leases.unclaim(job_id)
        except Exception:
            log.warning("job %s: could not return the claim either; the lease is gone, so the reaper cannot see it",
                        job_id)
        raise


def celery_publisher(app: Any) -> Publisher:
    """A :data:`Publisher` sending the calibrate task on ``app``, with the job id as task id."""
    from shared.jobs.celery_app import TASK_NAME

    def publish(message: Mapping[str, Any], *, attempt: int = 0, queue: str | None = None) -> None:
        options: dict[str, Any] = {"task_id": message.get("job_id"), "retries": attempt}
        if queue:
            options["queue"] = queue
        app.send_task(TASK_NAME, args=[dict(message)], **options)

    return publish


class Reaper:
    """Hands back every job whose lease lapsed (:func:`hand_back`); run by every supervisor, one at a time.

    :meth:`run_once` takes the fleet-wide lock ``reaper`` for one interval
    (so fleets of any size reap once per interval) and hands back what it
    finds, counting the delivery (the worker stopped renewing: it may have
    been killed by its job).

    A reaper that could not reach Redis judges no lease for one ``lease_s``
    after it reaches Redis again: while Redis was out (restarted, full,
    unreachable from this host) no worker could renew either, so a lease's
    age says nothing of its worker until each had a lease's time to renew.
    Otherwise every job running through a Redis restart longer than the
    lease would be reaped, its finished draws refused by the fence, and fitted again.
    """

    def __init__(self, services: Services, *, interval_s: float) -> None:
        self.services, self.leases = services, services.leases
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage_seen = False
        self._grace_until = 0.0

    def run_once(self) -> dict[str, str]:
        """One pass: ``{job_id: what was done}`` (empty when another worker holds the lock, or in the grace after an outage)."""
        try:
            locked = self.leases.try_lock("reaper", self.interval_s * 0.9)
        except Exception:
            self._outage_seen = True
            raise
        if self._outage_seen:  # Redis is back: every holder gets a lease's time to renew first
            self._outage_seen = False
            self._grace_until = time.monotonic() + self.leases.lease_ms / 1000
            log.info("Redis is reachable again: no lease is judged for %g s", self.leases.lease_ms / 1000)
        if not locked or time.monotonic() < self._grace_until:
            return {}
        done = {}
        for job_id in self.leases.lapsed():
            done[job_id] = hand_back(
                job_id, services=self.services,
                reason=f"its lease lapsed (no heartbeat for {self.leases.lease_ms / 1000:g} s): worker lost",
                count_delivery=True,
            )
            metrics.lease_reaped(done[job_id])
        return done

    def start(self) -> Reaper:
        self._thread = threading.Thread(target=self._run, name="calq-reaper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        warned = False
        while True:
            started = time.monotonic()
            try:
                self.run_once()
                warned = False
            except Exception as exc:
                if not warned:
                    log.warning("reaper pass failed (%s: %s); trying again", type(exc).__name__, exc)
                    warned = True
            if self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started))):
                return

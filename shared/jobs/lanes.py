"""Fair batch lanes: batch jobs of several owners reach the workers round-robin, never one owner's backlog first.

Interactive jobs go straight to their queue, and workers drain interactive
queues before batch ones (:mod:`shared.jobs.celery_app`). Batch jobs
submitted through the API wait per owner (the token that submitted them)
until :meth:`BatchLanes.feed` moves them to the workers' batch queue, one
owner at a time in turn, keeping at most ``depth`` messages there. So one
producer's 10,000 batch jobs push another producer's first batch job back by
at most one job per other owner with work waiting, plus ``depth``.

Redis layout (``{prefix}`` is the registry's):

- ``{prefix}:lanes:held:{owner}``: a list of ``{"job": message, "queue": name}``
  JSON entries, oldest first;
- ``{prefix}:lanes:owners``: the round-robin of owners with held jobs
  (each at most once; the scripts below keep the two consistent);
- ``{prefix}:lanes:feeder``: a short lock, so one feeder runs at a time
  across API processes.

A held entry is read back as untrusted (anyone with the Redis password could
have pushed one): an entry whose job does not parse is dropped with a warning
naming its owner, never quoted. An entry leaves its list only after it was
sent, so a feeder killed between the two sends it again, which the job
handler makes harmless (a job is done once).

Which device a job is worth (:func:`routed_queue`): on a fleet whose
producers send to ``calq.gpu`` by default, a single interactive job smaller
than :data:`GPU_MIN_ROWS` goes to ``calq.cpu`` instead (GPU workers serve
``calq.cpu`` too, so nothing waits for a device it does not need); batches
and large jobs stay on the default queue. On a CPU fleet nothing moves.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from shared.contract.job import CalibrationJob

log = logging.getLogger(__name__)

#: Likelihood rows below which one job alone runs faster on a CPU than on a GPU. Measured (issue 21, an H200
#: and its own CPU, one job at a time): a season of one archetype (~1k rows) sampled in 5.7 s on the GPU and
#: 1.5 s on the CPU (a NUTS step of a small job is a chain of tiny kernels, bound by launch latency); the GPU
#: won only at 24k rows (1.3–2.1×). A batch of small jobs (shared.fit.batch) is what fills a GPU.
GPU_MIN_ROWS = 24_000


def routed_queue(default_queue: str, rows: Callable[[], int]) -> str:
    """The queue of a single interactive job whose producer named none: see the module docstring.

    ``rows()`` (the job's likelihood rows: events × entered race-driver pairs
    of its window) is asked only where it matters, on a GPU default queue.
    """
    from shared.jobs.celery_app import CPU_QUEUE, GPU_QUEUE, queue_for

    queue = queue_for(default_queue)
    if queue == GPU_QUEUE and rows() < GPU_MIN_ROWS:
        return CPU_QUEUE
    return queue

#: Push an entry; add its owner to the rotation if it is not there.
_HOLD = """
local n = redis.call('RPUSH', KEYS[1], ARGV[2])
if not redis.call('LPOS', KEYS[2], ARGV[1]) then redis.call('RPUSH', KEYS[2], ARGV[1]) end
return n
"""
#: Drop an owner from the rotation if (and only if) nothing of theirs is held.
_RETIRE = """
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('LREM', KEYS[2], 0, ARGV[1]) return 1 end
return 0
"""
FEEDER_LOCK_MS = 5_000

Send = Callable[[dict[str, Any], str], None]


class BatchLanes:
    """Hold batch jobs per owner and feed them to the workers round-robin (see the module docstring)."""

    def __init__(self, redis_client: Any, *, prefix: str = "calq", depth: int = 4) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.depth = depth
        self.owners_key = f"{prefix}:lanes:owners"
        self._lock_key = f"{prefix}:lanes:feeder"
        self._hold = redis_client.register_script(_HOLD)
        self._retire = redis_client.register_script(_RETIRE)

    def held_key(self, owner: str) -> str:
        return f"{self.prefix}:lanes:held:{owner}"

    def hold(self, owner: str, message: dict[str, Any], queue: str) -> int:
        """Keep a batch job of ``owner`` until its turn; returns how many of ``owner``'s jobs wait."""
        entry = json.dumps({"job": message, "queue": queue}, separators=(",", ":"))
        return int(self._hold(keys=[self.held_key(owner), self.owners_key], args=[owner, entry]))

    def held(self) -> dict[str, int]:
        """Jobs held per owner."""
        owners = [_text(o) for o in self.redis.lrange(self.owners_key, 0, -1)]
        return {o: int(self.redis.llen(self.held_key(o))) for o in owners}

    def _next_turn(self, owner: str) -> None:
        """Move ``owner`` from the front of the rotation to its back (if it is still at the front)."""
        head = self.redis.lindex(self.owners_key, 0)
        if head is not None and _text(head) == owner:
            self.redis.lmove(self.owners_key, self.owners_key, "LEFT", "RIGHT")

    def feed(self, send: Send, *, queued: Callable[[str], int]) -> int:
        """Move held jobs to their queues, owners in turn, while a queue holds fewer than ``depth``; returns how many.

        ``send(message, queue)`` enqueues one job; ``queued(queue)`` is the
        number of messages waiting in a worker queue. Does nothing while
        another feeder holds the lock.
        """
        me = uuid.uuid4().hex
        if not self.redis.set(self._lock_key, me, nx=True, px=FEEDER_LOCK_MS):
            return 0
        sent = skipped = 0
        full: set[str] = set()
        try:
            for _ in range(4 * self.depth + 8):  # bounded: a few rounds per call
                owner = self.redis.lindex(self.owners_key, 0)  # whose turn it is; they go to the back after it
                if owner is None:
                    break
                owner = _text(owner)
                raw = self.redis.lindex(self.held_key(owner), 0)
                if raw is None:
                    self._retire(keys=[self.held_key(owner), self.owners_key], args=[owner])
                    self._next_turn(owner)
                    continue
                entry = _entry(raw, owner)
                if entry is None:
                    self.redis.lpop(self.held_key(owner))
                    continue
                message, queue = entry
                if queue in full or queued(queue) >= self.depth:
                    full.add(queue)
                    skipped += 1
                    if skipped >= self.redis.llen(self.owners_key):
                        break  # every owner's next job waits for a full queue
                    self._next_turn(owner)
                    continue
                send(message, queue)
                self.redis.lpop(self.held_key(owner))
                self._next_turn(owner)
                sent, skipped = sent + 1, 0
        finally:
            if _text(self.redis.get(self._lock_key) or b"") == me:
                self.redis.delete(self._lock_key)
        return sent


def _entry(raw: bytes, owner: str) -> tuple[dict[str, Any], str] | None:
    try:
        entry = json.loads(raw)
        message, queue = entry["job"], entry["queue"]
        CalibrationJob.model_validate(message)  # its id must agree with its content
        from shared.jobs.celery_app import ALL_QUEUES

        if queue not in ALL_QUEUES:
            raise ValueError("unknown queue")
    except (ValueError, KeyError, TypeError):
        log.warning("dropped a held batch job of %s that does not parse", owner)
        return None
    return message, queue


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


__all__ = ["GPU_MIN_ROWS", "BatchLanes", "routed_queue"]

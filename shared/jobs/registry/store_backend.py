"""The embedded registry: records and latest pointers as JSON files in the store (see :mod:`shared.jobs.registry`)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from shared.contract.domain import SAFE_ID
from shared.contract.errors import NotFound
from shared.contract.job import JobStatus
from shared.jobs.registry.base import INVALID_KEEP, Change, JobRegistry, _check_id
from shared.jobs.registry.values import Corrupt, Holds, read_record
from shared.storage.catalog import LatestPointer, is_newer, newest_pointers
from shared.storage.store import Store

log = logging.getLogger(__name__)


# -- the store (embedded mode) -------------------------------------------------

_INVALID_KEY = "invalid-messages.json"
_STORE_LOCKS: dict[str, threading.Condition] = {}
_STORE_LOCKS_GUARD = threading.Lock()


def _store_condition(url: str) -> threading.Condition:
    with _STORE_LOCKS_GUARD:
        return _STORE_LOCKS.setdefault(url, threading.Condition(threading.RLock()))


class StoreRegistry(JobRegistry):
    """Job records as JSON files in the store, for embedded (single-process) mode.

    Updates are serialised by a lock shared by every StoreRegistry on the
    same store URL in this process; separate processes writing the same
    store at once are not coordinated (the fleet uses Redis). There is no
    pub/sub: :meth:`wait` wakes on changes made in this process and polls
    otherwise.
    """

    def __init__(self, store: Store, *, holds: Holds | None = None) -> None:
        """``holds``: ``Store.holds`` of the store summaries live in; a pointer naming a summary outside it is corrupt."""
        self.store = store
        self.holds = holds
        self._cond = _store_condition(store.url)

    def __repr__(self) -> str:
        return f"StoreRegistry({self.store!r})"

    @staticmethod
    def _job_key(job_id: str) -> str:
        return f"jobs/{job_id}.json"

    @staticmethod
    def _deliveries_key(job_id: str) -> str:
        return f"deliveries/{job_id}.json"

    @staticmethod
    def _latest_key(archetype: str, event: str) -> str:
        return f"latest/{archetype}/{event}.json"

    def _read(self, key: str) -> bytes | None:
        try:
            return self.store.get_bytes(key)
        except NotFound:
            return None

    def _record_key(self, job_id: str) -> str:
        return self._job_key(job_id)

    def _raw_record(self, job_id: str) -> bytes | None:
        if not SAFE_ID.match(job_id):
            return None
        return self._read(self._job_key(job_id))

    def _write(self, status: JobStatus) -> None:
        _check_id(status.job_id)
        self.store.put_bytes(self._job_key(status.job_id), status.model_dump_json(indent=2).encode())

    def _insert(self, status: JobStatus) -> bool:
        with self._cond:
            if self.find(status.job_id) is not None:  # a corrupt record is replaced
                return False
            self._write(status)
            return True

    def _mutate(self, job_id: str, change: Change) -> tuple[JobStatus | None, JobStatus | None]:
        with self._cond:
            before = self.find(job_id)
            if before is None:
                return None, None
            after = change(before)
            if after is not None:
                self._write(after)
            return before, after

    def _count_delivery(self, job_id: str, attempt: int, by: int = 1) -> int:
        _check_id(job_id)
        key = self._deliveries_key(job_id)
        with self._cond:
            raw = self._read(key)
            counts = _json_or(raw, dict, key)
            counts[str(attempt)] = counts.get(str(attempt), 0) + by
            self.store.put_json(key, counts)
            return counts[str(attempt)]

    def _reset_deliveries(self, job_id: str) -> None:
        with self._cond:
            self.store.delete(self._deliveries_key(job_id))

    def _newest(self) -> Iterator[JobStatus | Corrupt]:
        records: list[JobStatus] = []
        corrupt: list[Corrupt] = []
        for uri in self.store.list("jobs"):
            if not uri.endswith(".json"):
                continue
            job_id = uri.rsplit("/", 1)[-1][: -len(".json")]
            raw = self._raw_record(job_id)
            if raw is None:
                continue
            record = read_record(raw, key=self._job_key(job_id), job_id=job_id)
            (records if isinstance(record, JobStatus) else corrupt).append(record)
        epoch = datetime.min.replace(tzinfo=UTC)
        records.sort(key=lambda r: r.updated_at or r.submitted_at or epoch, reverse=True)
        yield from records
        yield from corrupt

    def _append_invalid(self, entry: dict[str, str]) -> None:
        with self._cond:
            raw = self._read(_INVALID_KEY)
            entries = [*_json_or(raw, list, _INVALID_KEY), entry][-INVALID_KEEP:]
            self.store.put_json(_INVALID_KEY, entries)

    def invalid_messages(self, limit: int = 100) -> list[dict[str, str]]:
        entries = _json_or(self._read(_INVALID_KEY), list, _INVALID_KEY)
        return [e for e in entries if isinstance(e, dict)][::-1][:limit]

    def invalid_count(self) -> int:
        """How many refused messages the store keeps (capped at INVALID_KEEP)."""
        return len(self.invalid_messages(limit=INVALID_KEEP))

    def _merge(self, pointers: list[LatestPointer]) -> list[LatestPointer]:
        moved = []
        with self._cond:
            for slot, pointer in newest_pointers(pointers).items():
                key = self._latest_key(*slot)
                if is_newer(pointer, self._pointer_or_none(key, slot, self._read(key))):
                    self.store.put_bytes(key, pointer.model_dump_json(indent=2).encode())
                    moved.append(pointer)
        return moved

    def _raw_pointers(self) -> Iterator[tuple[str, tuple[str, str], bytes]]:
        for uri in self._latest_uris():
            key = self.store.key_of(uri)
            parts = key[: -len(".json")].split("/")
            raw = self._read(uri)
            if raw is not None:
                slot = (parts[1], parts[2]) if len(parts) == 3 else ("/".join(parts[1:-1]), parts[-1])
                yield key, slot, raw

    def _raw_pointer(self, slot: tuple[str, str]) -> tuple[str, bytes | None]:
        if not (SAFE_ID.match(slot[0]) and SAFE_ID.match(slot[1])):
            return f"latest/{slot[0]}/{slot[1]}.json", None
        key = self._latest_key(*slot)
        return key, self._read(key)

    def _latest_uris(self) -> Iterable[str]:
        return [u for u in self.store.list("latest") if u.endswith(".json")]

    def _drop_latest(self) -> None:
        with self._cond:
            for uri in self._latest_uris():
                self.store.delete(uri)

    def _publish(self, status: JobStatus) -> None:
        with self._cond:
            self._cond.notify_all()

    @contextlib.contextmanager
    def _listener(self, job_id: str) -> Iterator[Callable[[float], None]]:
        def pause(seconds: float) -> None:
            with self._cond:
                self._cond.wait(seconds)

        yield pause




def _json_or(raw: bytes | None, kind: type, key: str) -> Any:
    """The JSON ``kind`` (dict or list) in ``raw``; empty when absent, or when unreadable (a warning names ``key``)."""
    if raw is None:
        return kind()
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, kind):
        log.warning("%s is unreadable; starting it afresh", key)
        return kind()
    return value

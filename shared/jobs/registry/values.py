"""Reading a job record or a latest pointer back, as untrusted input.

Whoever can write to Redis (or to the store, in embedded mode) can put
anything at a record's key or in a pointer's slot: bytes that are not JSON,
a state no version of calq knows, a record of another job, a pointer naming
another archetype's summary, or one outside the store. Every read of a
record or pointer goes through :func:`read_record` or :func:`read_pointer`,
which return the parsed value or a :class:`Corrupt` naming the key and what
is wrong with it. ``why`` is written by calq and never quotes the value: the
bytes stay where they were.

What the registry does with a corrupt value (see :mod:`shared.jobs.registry.base`):

- a corrupt record is skipped by listings and counts as absent for every
  write, so submitting the job again (or its worker finishing it) replaces
  it; ``get`` and the commands built on it raise
  :class:`~shared.contract.errors.CorruptRecord`;
- a corrupt pointer is skipped by readers (``latest`` answers as if the
  slot were empty) and counts as absent when a job moves the pointer, so the
  next converged job repairs the slot.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pydantic

from shared.contract.job import JobStatus
from shared.storage.catalog import LatestPointer
from shared.storage.store import is_posterior_key, summary_key

log = logging.getLogger(__name__)

#: Whether a URI lies inside the store (``Store.holds``).
Holds = Callable[[str], bool]


@dataclass(frozen=True)
class Corrupt:
    """A value that could not be used: where it lies (``key``) and why, in calq's words."""

    key: str
    why: str


def read_record(raw: bytes | str, *, key: str, job_id: str) -> JobStatus | Corrupt:
    """The record stored at ``key`` for ``job_id``, or :class:`Corrupt` (logged as a warning)."""
    parsed = _parse(raw, JobStatus)
    if isinstance(parsed, str):
        return _corrupt(key, parsed)
    if parsed.job_id != job_id:
        return _corrupt(key, "the record is of another job")
    return parsed


def read_pointer(
    raw: bytes | str, *, key: str, slot: tuple[str, str], holds: Holds | None = None
) -> LatestPointer | Corrupt:
    """The latest pointer stored at ``key`` for ``slot`` (archetype, event), or :class:`Corrupt`.

    A pointer is usable only if it parses, names the archetype and event of
    its slot, and names its own job's summary and posterior for that
    archetype (or for ``all``), inside the store when ``holds`` is given.
    """
    parsed = _parse(raw, LatestPointer)
    if isinstance(parsed, str):
        return _corrupt(key, parsed)
    if parsed.slot != slot:
        return _corrupt(key, "the pointer names another archetype or event than its slot")
    if not parsed.summary_uri or not parsed.posterior_uri:
        return _corrupt(key, "the pointer names no summary or no posterior")
    own = [(archetype, summary_key(archetype, parsed.job_id)) for archetype in (slot[0], "all")]
    mine = next(((a, k) for a, k in own if parsed.summary_uri.endswith("/" + k)), None)
    root = parsed.summary_uri[: -len(mine[1])] if mine is not None else ""
    # the posterior may sit at any fencing token's key of the same job (store.posterior_key)
    if mine is None or not parsed.posterior_uri.startswith(root) or not is_posterior_key(
        parsed.posterior_uri[len(root):], mine[0], parsed.job_id
    ):
        return _corrupt(key, "the pointer names another job's or another archetype's summary")
    if holds is not None and not (holds(parsed.summary_uri) and holds(parsed.posterior_uri)):
        return _corrupt(key, "the pointer names a summary outside the store")
    return parsed


def _parse(raw: bytes | str, model: type[pydantic.BaseModel]) -> pydantic.BaseModel | str:
    """The model, or why the bytes are not one (field names of ``model`` only, never the input)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return "not JSON"
    if not isinstance(data, dict):
        return "not a JSON object"
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        fields = sorted({
            str(err["loc"][0]) for err in exc.errors(include_url=False)
            if err.get("loc") and err["loc"][0] in model.model_fields
        })
        return "fails the schema" + (f" ({', '.join(fields)})" if fields else "")


def _corrupt(key: str, why: str) -> Corrupt:
    shown = shown_key(key)
    log.warning("skipping corrupt value at %s: %s", shown, why)
    return Corrupt(shown, why)


def shown_key(key: str, limit: int = 200) -> str:
    """A key as it may be logged or printed: itself if short printable ASCII, else escaped and clipped.

    Keys of records and slots come from Redis (an index entry, a hash field)
    and whoever wrote them chose their characters.
    """
    if len(key) <= limit and key.isascii() and key.isprintable():
        return key
    return ascii(key[:limit])[1:-1] + ("…" if len(key) > limit else "")


__all__ = ["Corrupt", "Holds", "read_pointer", "read_record", "shown_key"]

"""The posterior a job just wrote, handed to the next job's warm start in memory, once the store vouches for it.

A backfill's next window usually starts from the fit its worker has just
written (:mod:`shared.jobs.warm_source`). Reading that posterior back decodes
a file whose content this process built a moment ago. :func:`keep` holds the
groups a warm start reads, with the sha256 of the bytes uploaded;
:func:`take` gives them back only if the object now in the store at that URI
hashes to the same sha256 (and to the one a signed summary records, if
given). The store stays the authority: an object replaced, deleted or
planted since is read from the store as before, and fails there if it must.
The few most recent posteriors are kept (:data:`KEPT`).
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.storage.store import Store

log = logging.getLogger(__name__)

#: What a warm start reads of the previous posterior: not its posterior predictive, the bulk of a large fit's file.
WARM_GROUPS = ("posterior", "sample_stats", "constant_data")

#: Posteriors kept: one per archetype of a backfill running its windows in turn is enough.
KEPT = 8

_lock = threading.Lock()
_kept: OrderedDict[str, tuple[str, Any]] = OrderedDict()


def keep(posterior_uri: str, sha256: str, idata: Any, *, groups: Sequence[str] = WARM_GROUPS) -> None:
    """Hold ``groups`` of ``idata``, just uploaded to ``posterior_uri`` as bytes hashing to ``sha256``."""
    held = _only(idata, groups)
    with _lock:
        _kept[posterior_uri] = (sha256, held)
        _kept.move_to_end(posterior_uri)
        while len(_kept) > KEPT:
            _kept.popitem(last=False)


def take(posterior_uri: str, store: Store, *, groups: Sequence[str], sha256: str | None = None) -> Any | None:
    """The kept posterior at ``posterior_uri`` if the store's object still hashes to what was uploaded; else None.

    ``sha256``: what a signed summary records; the kept bytes must hash to it too.
    Only ``groups`` kept are returned; a posterior kept without one of them is not returned.
    """
    with _lock:
        found = _kept.get(posterior_uri)
    if found is None:
        return None
    digest, held = found
    if sha256 is not None and not hmac.compare_digest(digest, sha256):
        return None
    if not set(groups) <= set(held.groups()):
        return None
    try:
        stored = store.sha256(posterior_uri)
    except Exception as exc:  # the store decides: read it there (and fail there) as before
        log.debug("posterior %s not checked (%s): read from the store", posterior_uri, type(exc).__name__)
        return None
    if not hmac.compare_digest(stored, digest):
        log.info("posterior %s changed in the store since this process wrote it: read from the store", posterior_uri)
        with _lock:
            _kept.pop(posterior_uri, None)
        return None
    return held if list(groups) == held.groups() else _only(held, groups)


def _only(idata: Any, groups: Sequence[str]) -> Any:
    """``idata``'s ``groups`` (and its attributes) as a new InferenceData sharing their datasets."""
    import arviz as az

    return az.InferenceData(attrs=dict(idata.attrs or {}), **{g: getattr(idata, g) for g in groups})


def forget() -> None:
    """Drop every kept posterior."""
    with _lock:
        _kept.clear()


__all__ = ["KEPT", "WARM_GROUPS", "forget", "keep", "take"]

"""Which stored fit a job warm-starts from: the fleet's and the embedded mode's one rule.

A job of archetype A as of day D starts from the converged fit of A whose
data end nearest before D (the previous as-of date of a backfill, or the
last fit of a daily refit); when none ended before D, the one nearest after
it. A job without ``as_of`` (all races) starts from the newest fit. Only
fits of the same model version that fitted every event of the job count,
and never the job itself. Any stored fit may serve: a backfill's jobs run
in parallel on the fleet, each from whatever its neighbours have finished.

Only summaries the catalog accepts count (at their own keys and, with a
signing key, signed by a worker: :meth:`~shared.storage.catalog.Catalog.read`),
and a signed summary's posterior is read only if its bytes hash to the
sha256 the summary records, checked before it is decoded.

A posterior this process has just written is taken from memory
(:mod:`shared.jobs.handover`) when the store's object hashes to the bytes
it uploaded; any other is read from the store.

Finding a fit is an optimisation: a store that cannot be listed, a summary
or posterior that cannot be read or does not verify, is logged and the job starts cold. The
summaries' few fields the rule needs are cached per process (a summary is
written once, beside its posterior), so each job reads only new ones.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import date

from shared.contract.errors import Unverified
from shared.contract.job import CalibrationJob
from shared.fit.warm import WarmSource
from shared.jobs import handover
from shared.jobs.handover import WARM_GROUPS
from shared.storage.catalog import POSTERIORS_PREFIX, Catalog
from shared.storage.store import Store

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class StoredFit:
    """What the rule reads of a stored summary."""

    job_id: str
    model_version: str
    events: frozenset[str]
    converged: bool
    centered: bool
    data_through: date
    posterior_uri: str | None
    posterior_sha256: str | None = None  # recorded in a signed summary: the posterior's bytes must hash to it


#: (summary URI, whether read under a signing key) → its fields; an unreadable or unverified one is tried again next time
_seen: dict[tuple[str, bool], StoredFit] = {}
_seen_lock = threading.Lock()


def find_warm_source(job: CalibrationJob, store: Store) -> WarmSource | None:
    """The fit ``job`` starts from, with its posterior loaded; None to start cold."""
    try:
        chosen = nearest_fit(job, _stored_fits(store, job.archetype))
        if chosen is None or chosen.posterior_uri is None:
            return None
        idata = handover.take(chosen.posterior_uri, store, groups=WARM_GROUPS, sha256=chosen.posterior_sha256)
        if idata is None:
            idata = store.get_inference_data(chosen.posterior_uri, groups=WARM_GROUPS, sha256=chosen.posterior_sha256)
    except Exception as exc:  # an optimisation must never fail the job
        log.warning("job %s: starting cold, no stored fit could be read: %s: %s", job.job_id, type(exc).__name__, exc)
        return None
    return WarmSource(idata=idata, job_id=chosen.job_id, posterior_uri=chosen.posterior_uri, data_through=chosen.data_through)


def nearest_fit(job: CalibrationJob, fits: list[StoredFit]) -> StoredFit | None:
    """The module's rule: the usable fit whose data end nearest before the job's ``as_of``, else nearest after."""
    usable = [
        f for f in fits
        if f.converged and not f.centered and f.job_id != job.job_id
        and f.model_version == job.model_version and set(job.events) <= f.events and f.posterior_uri
    ]
    before = [f for f in usable if job.as_of is None or f.data_through < job.as_of]
    if before:
        return max(before, key=lambda f: (f.data_through, f.job_id))
    return min(usable, key=lambda f: (f.data_through, f.job_id), default=None)


def _stored_fits(store: Store, archetype: str) -> list[StoredFit]:
    """Every readable stored fit of ``archetype``; summaries are read once per process."""
    catalog = Catalog(store)
    signed = store.signing_key is not None
    uris = [u for u in store.list(f"{POSTERIORS_PREFIX}/{archetype}") if u.endswith(".json")]
    for uri in uris:
        with _seen_lock:
            if (uri, signed) in _seen:
                continue
        try:
            summary = catalog.read(uri)
            fit = StoredFit(
                job_id=summary.job_id, model_version=summary.model_version, events=frozenset(summary.events),
                converged=summary.converged, centered=summary.centered, data_through=summary.data_through,
                posterior_uri=summary.posterior_uri,
                posterior_sha256=catalog.posterior_sha256(summary),
            )
        except Unverified as exc:
            log.warning("skipping summary %s: %s", uri, exc)
            continue
        except Exception as exc:
            log.warning("skipping unreadable summary %s: %s: %s", uri, type(exc).__name__, exc)
            continue
        with _seen_lock:
            _seen[(uri, signed)] = fit
    with _seen_lock:
        return [fit for uri in uris if (fit := _seen.get((uri, signed))) is not None]


__all__ = ["StoredFit", "find_warm_source", "nearest_fit"]

"""The catalog of finished calibrations: the store is the source of truth.

Every job that succeeds leaves two objects side by side in the store::

    posteriors/{archetype}/{job_id}.nc     the posterior (written first; a fleet worker's is
                                           {job_id}.t{token}.nc, its lease's fencing token)
    posteriors/{archetype}/{job_id}.json   its CalibrationSummary, naming that posterior

:class:`Catalog` reads those summaries back. The ``latest`` pointer of an
(archetype, event) pair names the summary the optimizer should use; the job
registry keeps it for quick reads, and :meth:`Catalog.latest_pointers`
rebuilds it from the summaries alone, by the same rule (:func:`is_newer`),
after Redis lost it.

Anyone holding the store's key can put a file there, so a summary is used
only when :meth:`Catalog.read` accepts it: it lies at its own job's key,
names its own posterior's key beside it, and, where the store has a
signing key, carries a worker's signature (:mod:`shared.storage.provenance`).
Everything else reads summaries through this class (warm start, repair and
``reindex``, the rebuild of ``latest``, the report, the client), so each
gets the check; a summary that fails it is skipped with a warning naming
its key, as if absent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from shared.contract.domain import ARCHETYPES, SAFE_ID
from shared.contract.errors import NotFound, Unverified
from shared.contract.summary import CalibrationSummary
from shared.storage.provenance import verify
from shared.storage.store import Store, is_posterior_key, posterior_key, summary_key

if TYPE_CHECKING:
    import arviz as az

log = logging.getLogger(__name__)

POSTERIORS_PREFIX = "posteriors"


class _Dated(Protocol):
    job_id: str
    data_through: date
    created_at: datetime


class LatestPointer(BaseModel):
    """Which calibration is the current one for an (archetype, event) pair."""

    model_config = ConfigDict(frozen=True)

    archetype: str
    event: str
    job_id: str
    summary_uri: str | None = None
    posterior_uri: str | None = None
    data_through: date
    created_at: datetime

    @classmethod
    def of(cls, summary: CalibrationSummary, archetype: str, event: str) -> LatestPointer:
        """The pointer to ``summary`` for one of its archetypes and events."""
        if archetype not in summary.archetypes:
            raise ValueError(f"job {summary.job_id} did not fit archetype {archetype!r}")
        if event not in summary.events:
            raise ValueError(f"job {summary.job_id} did not fit event {event!r}")
        return cls(
            archetype=archetype,
            event=event,
            job_id=summary.job_id,
            summary_uri=summary.summary_uri,
            posterior_uri=summary.posterior_uri,
            data_through=summary.data_through,
            created_at=summary.created_at,
        )

    @property
    def slot(self) -> tuple[str, str]:
        """``(archetype, event)``: the key this pointer is stored under."""
        return (self.archetype, self.event)


D = TypeVar("D", bound=_Dated)
T = TypeVar("T")


def _utc(moment: datetime) -> datetime:
    # A naive timestamp is taken as UTC, so naive and aware ones compare.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _rank(item: _Dated) -> tuple[date, datetime, str]:
    return (item.data_through, _utc(item.created_at), item.job_id)


def is_newer(
    candidate: CalibrationSummary | LatestPointer,
    current: LatestPointer | CalibrationSummary | None,
) -> bool:
    """Whether ``candidate`` should replace ``current`` as the latest calibration.

    The rule: a later ``data_through`` (the date of the latest race the fit
    saw) wins; on the same ``data_through`` the later ``created_at`` wins;
    on the same instant the larger ``job_id`` wins, so every process picks
    the same one. Anything is newer than nothing; nothing is newer than
    itself. Naive timestamps count as UTC.
    """
    if current is None:
        return True
    return _rank(candidate) > _rank(current)


def pointers_for(summary: CalibrationSummary) -> list[LatestPointer]:
    """One pointer per (archetype, event) the summary fitted; none if it did not converge."""
    if not summary.converged:
        return []
    return [LatestPointer.of(summary, a, e) for a in summary.archetypes for e in summary.events]


def newest(items: Iterable[D]) -> D | None:
    """The newest of ``items`` by :func:`is_newer`'s rule; None when there are none."""
    return max(items, key=_rank, default=None)


def newest_pointers(pointers: Iterable[LatestPointer]) -> dict[tuple[str, str], LatestPointer]:
    """The newest pointer (by :func:`is_newer`) of each (archetype, event)."""
    best: dict[tuple[str, str], LatestPointer] = {}
    for pointer in pointers:
        if is_newer(pointer, best.get(pointer.slot)):
            best[pointer.slot] = pointer
    return best


def skipping_unreadable(uri: str, read: Callable[[], T]) -> T | None:
    """``read()``, what is made of the summary at ``uri``; None where it cannot be read or is refused.

    The one rule for a bad summary among many: skipped with a warning naming
    its key (and, for a refused one, why: :class:`Unverified` names no content
    of the file), so that it hides none of the others.
    """
    try:
        return read()
    except Unverified as exc:
        log.warning("skipping summary %s: %s", uri, exc)
    except Exception as exc:
        log.warning("skipping unreadable summary %s: %s: %s", uri, type(exc).__name__, exc)
    return None


class Catalog:
    """Read access to the summaries in a store (``posteriors/*/*.json``)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"Catalog({self.store!r})"

    def summaries(self) -> Iterator[CalibrationSummary]:
        """Every readable summary in the store, in URI order.

        A summary that cannot be read or fails the schema is skipped with a
        warning: one bad file must not hide all the others. ``summary_uri``
        and ``posterior_uri`` are filled in from where the file lies when the
        stored summary lacks them.
        """
        for uri in self.store.list(POSTERIORS_PREFIX):
            if not uri.endswith(".json"):
                continue
            summary = skipping_unreadable(uri, lambda: self.read(uri))  # noqa: B023 (called at once)
            if summary is not None:
                yield summary

    def summary(self, job_id: str) -> CalibrationSummary:
        """The summary of ``job_id``; NotFound if the store holds none."""
        if SAFE_ID.match(job_id):
            for archetype in ("all", *ARCHETYPES):
                uri = self.store.uri(summary_key(archetype, job_id))
                try:
                    return self.read(uri)
                except Unverified as exc:
                    log.warning("skipping summary %s: %s", uri, exc)
                except NotFound:
                    continue
        raise NotFound(f"no summary for job {job_id!r} in {self.store.uri(POSTERIORS_PREFIX)}")

    def latest_pointers(self) -> dict[tuple[str, str], LatestPointer]:
        """The latest pointer of every (archetype, event), rebuilt from the stored summaries.

        Only converged summaries count, and of those the newest by
        :func:`is_newer` — the rule the job registry applies as jobs finish.
        """
        return newest_pointers(p for s in self.summaries() for p in pointers_for(s))

    def posterior_sha256(self, summary: CalibrationSummary) -> str | None:
        """The sha256 the posterior of ``summary`` must have before it is decoded; None without a signing key.

        It is the digest the signed summary records (``provenance``), so
        ``summary`` must be one :meth:`read` accepted; an unsigned one is
        :class:`Unverified` where the store has a key.
        """
        if self.store.signing_key is None:
            return None
        if summary.provenance is None:
            raise Unverified("it is not signed by a worker of this fleet")
        return summary.provenance.posterior_sha256

    def posterior(self, summary: CalibrationSummary, *, groups: Sequence[str] | None = None) -> az.InferenceData:
        """The posterior of ``summary`` (one :meth:`read` accepted), its bytes checked before they are decoded.

        With a signing key they must hash to :meth:`posterior_sha256`, else
        :class:`Unverified` (a posterior replaced after its summary was signed).
        """
        if summary.posterior_uri is None:
            raise NotFound(f"summary of job {summary.job_id} names no posterior")
        return self.store.get_inference_data(summary.posterior_uri, groups=groups, sha256=self.posterior_sha256(summary))

    def read(self, uri: str) -> CalibrationSummary:
        """The summary stored at ``uri``: the one way a summary is read back (NotFound if absent).

        Only summaries inside this store are read: a URI elsewhere (another
        path, bucket or host, or one climbing out with ``..``) is NotFound,
        without touching it. A summary is then accepted only where it
        belongs: ``uri`` is its own job's key (:func:`summary_key` of its
        archetype and job id), and its ``summary_uri`` and ``posterior_uri``,
        when it states them, are that key and a :func:`posterior_key` beside
        it, of any fencing token (a posterior elsewhere, another job's, ``file:///etc/passwd``).
        With the store's signing key it must also verify
        (:func:`shared.storage.provenance.verify`). Failing either is
        :class:`Unverified`, whose message names no content of the file.
        ``summary_uri`` and ``posterior_uri`` are filled in when absent.
        """
        if not self.store.holds(uri):
            raise NotFound("a summary is read only from this store's posteriors")
        document = self.store.get_json(uri)
        if self.store.signing_key is not None:
            verify(document, self.store.signing_key)
        summary = CalibrationSummary.model_validate(document)
        misplaced = Unverified("it does not lie at its own job's key, or names a summary or posterior elsewhere")
        if not SAFE_ID.fullmatch(summary.job_id):
            raise misplaced
        own = self.store.uri(summary_key(summary.archetype, summary.job_id))
        posterior = self.store.uri(posterior_key(summary.archetype, summary.job_id))
        if uri != own or summary.summary_uri not in (None, own) or not self._own_posterior(summary):
            raise misplaced
        update: dict[str, str] = {}
        if summary.summary_uri is None:
            update["summary_uri"] = uri
        if summary.posterior_uri is None:
            update["posterior_uri"] = posterior
        return summary.model_copy(update=update) if update else summary

    def _own_posterior(self, summary: CalibrationSummary) -> bool:
        """Whether the summary names no posterior, or one at a key :func:`posterior_key` gives its job (any token)."""
        if summary.posterior_uri is None:
            return True
        if not self.store.holds(summary.posterior_uri):
            return False
        try:
            key = self.store.key_of(summary.posterior_uri)
        except ValueError:
            return False
        return summary.posterior_uri == self.store.uri(key) and is_posterior_key(key, summary.archetype, summary.job_id)


__all__ = ["Catalog", "LatestPointer", "is_newer", "newest", "newest_pointers", "pointers_for", "skipping_unreadable"]

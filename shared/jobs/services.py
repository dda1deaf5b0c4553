"""The one wiring: the services a job is run, watched and handed back with, built from settings once.

:meth:`Services.from_settings` is the only place calq builds them::

    settings ─▶ store ─────────────▶ catalog (the store's summaries)
              └▶ registry: embedded ─▶ StoreRegistry on the store
                           fleet ────▶ RedisRegistry on settings.backend() (recovery's timeouts; pointers
                                       only to summaries the store holds)
                                       └▶ leases on the registry's Redis
              └▶ publish: the calibrate task sent on a Celery app from the settings (built at first send)

Its users: the Celery task (:mod:`worker.tasks`), the supervisor's fleet
(:class:`worker.supervisor.Fleet`), the producer's client
(:class:`producer.client.CalibrationClient`) and the credentials check of
``python -m worker``. The handler (:func:`shared.jobs.handle.process`)
takes one :class:`Services` and one delivery. Building one opens no
connection: Redis and the store are reached at their first request.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from shared.contract.settings import Settings
from shared.storage.catalog import Catalog
from shared.storage.store import Store

if TYPE_CHECKING:
    from shared.jobs.lease import Leases, Publisher


@dataclasses.dataclass(frozen=True)
class Services:
    """Settings, store, registry, and on the fleet the leases and a publisher (see the module docstring)."""

    settings: Settings
    store: Store
    registry: Any
    leases: Leases | None = None
    publish: Publisher | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, store: Store | None = None, registry: Any = None) -> Services:
        """The services ``settings`` name; a ``store`` or ``registry`` handed in is used as it is.

        Leases and the publisher exist only where the registry is Redis (the fleet).
        """
        from shared.jobs.registry import RedisRegistry, StoreRegistry

        store = store or Store.from_settings(settings)
        if registry is None and settings.embedded:
            registry = StoreRegistry(store, holds=store.holds)
        elif registry is None:
            registry = RedisRegistry.from_url(settings.backend(), recovery=settings.recovery, holds=store.holds)
        if not isinstance(registry, RedisRegistry):
            return cls(settings, store, registry)
        from shared.jobs.lease import Leases

        leases = Leases(registry.redis, prefix=registry.prefix, lease_s=settings.recovery.lease_s,
                        record_ttl_s=registry.record_ttl_s)
        return cls(settings, store, registry, leases, celery_publisher_for(settings))

    @functools.cached_property
    def catalog(self) -> Catalog:
        """The store's summaries."""
        return Catalog(self.store)

    def with_registry(self, registry: Any) -> Services:
        """The same services over another view of the registry (fenced by a lease, patient, observed)."""
        return dataclasses.replace(self, registry=registry)


def celery_publisher_for(settings: Settings) -> Publisher:
    """A publisher of the calibrate task on a Celery app built from ``settings`` at its first message."""
    from shared.jobs.celery_app import make_app
    from shared.jobs.lease import celery_publisher

    @functools.cache
    def publisher() -> Publisher:
        return celery_publisher(make_app(settings))

    def publish(message: Mapping[str, Any], **options: Any) -> None:
        publisher()(message, **options)

    return publish

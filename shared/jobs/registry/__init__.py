"""calq's own job records and the ``latest`` pointers; see :mod:`shared.jobs.registry.base` for the rules.

:class:`RedisRegistry` serves the fleet, :class:`StoreRegistry` the embedded mode.
"""

from shared.jobs.registry.base import DEFAULT_RECORD_TTL_S, JobRegistry, WaitTimeout
from shared.jobs.registry.redis_backend import RedisRegistry
from shared.jobs.registry.store_backend import StoreRegistry

__all__ = ["DEFAULT_RECORD_TTL_S", "JobRegistry", "RedisRegistry", "StoreRegistry", "WaitTimeout"]

"""calq's own job records and the ``latest`` pointers; see :mod:`shared.registry.base` for the rules.

:class:`RedisRegistry` serves the fleet, :class:`StoreRegistry` the embedded mode.
"""

from shared.registry.base import DEFAULT_RECORD_TTL_S, JobRegistry, WaitTimeout
from shared.registry.redis_backend import RedisRegistry
from shared.registry.store_backend import StoreRegistry

__all__ = ["DEFAULT_RECORD_TTL_S", "JobRegistry", "RedisRegistry", "StoreRegistry", "WaitTimeout"]

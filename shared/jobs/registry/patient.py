"""A registry whose final record changes wait through Redis outages.

A worker's ``succeed`` comes after the summary is in the store: if Redis is
out at that moment the finished result must not be orphaned, so the final
changes (``succeed``, ``fail``, ``reject``, ``finish_cancelled``) are tried
again by :func:`shared.contract.retry.retry_transient` for up to
``recovery.write_budget_s`` (pauses from ``retry_first_s`` doubling up to
``retry_max_s``). Every other method is the wrapped registry's own.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from shared.contract.retry import retry_transient
from shared.contract.settings import Settings

log = logging.getLogger(__name__)


class PatientRegistry:
    """The registry, with a job's final record change retried through Redis outages (see the module docstring)."""

    FINAL = frozenset({"succeed", "fail", "reject", "finish_cancelled"})

    def __init__(self, registry: Any, settings: Settings, *, sleep: Any = time.sleep) -> None:
        self._registry, self._recovery, self._sleep = registry, settings.recovery, sleep

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._registry, name)
        if name not in self.FINAL:
            return method

        @functools.wraps(method)
        def patient(*args: Any, **kwargs: Any) -> Any:
            r = self._recovery
            waited = False

            def warn_once(fault: BaseException, _left: float) -> None:
                nonlocal waited
                if not waited:
                    log.warning("waiting for Redis to record %s (%s: %s); retrying for up to %g s",
                                name, type(fault).__name__, fault, r.write_budget_s)
                waited = True

            result = retry_transient(lambda: method(*args, **kwargs), budget_s=r.write_budget_s,
                                     first_s=r.retry_first_s, max_s=r.retry_max_s, on_wait=warn_once,
                                     sleep=self._sleep)
            if waited:
                log.info("Redis is back: %s recorded", name)
            return result

        return patient

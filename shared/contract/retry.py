"""Trying again: the one backoff rule and the one loop that retries transient faults.

:func:`~shared.contract.errors.classify` says whether a fault is transient;
this module says how calq waits before trying again. The rule::

    pause before try n+1 = min(most, first · 2^(n-1))        (n = 1, 2, …: tries so far)

    try ─▶ ok ──────────────────────────────────────────────▶ its result
     │
     └─▶ fault ─▶ not transient ─────────────────────────────▶ raised at once
                 transient, and the next pause ends within the budget:
                     on_wait(fault, seconds left), pause, try again
                 transient, and it would not ─────────────────▶ the fault raised

The budget runs from the first try. By default a try is never started past
it: the pause that would end beyond it is not taken (a write that must
finish in time). With ``to_the_end`` the last pause is cut to end at the
budget and one more try is made there (a wait that uses all its time).

Its callers: the worker's final record changes
(:class:`shared.jobs.registry.patient.PatientRegistry`), the results'
writes (:func:`shared.jobs.spool.patiently`), the client's wait
(:meth:`producer.client.CalibrationClient.wait`) and the supervisor's
restart delay (:func:`backoff` alone). Celery's own autoretry keeps its
loop; its numbers are :data:`TASK_MAX_RETRIES` and :data:`TASK_RETRY_BACKOFF_MAX_S`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from shared.contract.errors import Outcome, classify

T = TypeVar("T")

#: Hears ``(fault, seconds_left)`` before each pause.
OnWait = Callable[[BaseException, float], Any]

#: How often the Celery task retries a RetryableError (its ``max_retries``), and its longest countdown in seconds.
TASK_MAX_RETRIES = 5
TASK_RETRY_BACKOFF_MAX_S = 600


def backoff(tries: int, *, first: float, most: float) -> float:
    """The pause after ``tries`` failed tries (1, 2, …): ``first`` doubled each time, capped at ``most``.

    ``tries`` below 1 counts as 1.
    """
    doublings = min(max(tries, 1) - 1, 64)  # 2**64 · first is past any cap; no float overflow
    return min(most, first * 2.0**doublings)


def is_transient(exc: BaseException) -> bool:
    """Whether :func:`~shared.contract.errors.classify` says trying again may help."""
    return classify(exc) is Outcome.RETRY


def retry_transient(
    call: Callable[[], T],
    *,
    budget_s: float,
    first_s: float,
    max_s: float,
    on_wait: OnWait | None = None,
    transient: Callable[[BaseException], bool] = is_transient,
    budgets: Mapping[type[BaseException], float] | None = None,
    to_the_end: bool = False,
    sleep: Callable[[float], Any] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``call()``, tried again through transient faults for up to ``budget_s`` seconds (the module's rule).

    ``transient`` decides which faults are retried (default:
    :func:`is_transient`); a fault of a type in ``budgets`` is retried for
    its own budget instead, whatever ``transient`` says. A fault past its
    budget, and any other, is raised as it came.
    """
    start = clock()
    tries = 0
    while True:
        try:
            return call()
        except Exception as fault:
            tries += 1
            budget = _budget_for(fault, budget_s, transient, budgets or {})
            if budget is None:
                raise
            pause = backoff(tries, first=first_s, most=max_s)
            left = budget - (clock() - start)
            if to_the_end:
                if left <= 0:
                    raise
                pause = min(pause, left)
            elif pause > left:
                raise
            if on_wait is not None:
                on_wait(fault, left)
        sleep(pause)


def _budget_for(
    fault: BaseException,
    budget_s: float,
    transient: Callable[[BaseException], bool],
    budgets: Mapping[type[BaseException], float],
) -> float | None:
    for kind, budget in budgets.items():
        if isinstance(fault, kind):
            return budget
    return budget_s if transient(fault) else None

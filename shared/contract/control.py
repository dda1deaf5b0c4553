"""The one object long work reports to and asks whether to stop: :class:`JobControl`.

A running job is told three things from outside — show progress, stop at the
time limit, stop when cancelled — and it asks at the same places: at every
phase boundary (fetch, load, compile, write) and between sampling chunks.
So the handler builds one ``JobControl`` and passes it down, instead of a
progress callback, a deadline and a cancel callable through every signature::

    control = JobControl(on_progress=record, cancel_source=lambda: reason_or_none)
    control.start(time_limit_s)     # the runner, as the job starts: the limit covers fetch + load + fit
    control.check("load")           # raises JobTimeLimitExceeded or JobCancelled
    control.progress(Progress(...)) # forwarded to on_progress

``cancel_source`` is polled at most every ``poll_s`` (it reads a record, which
may be remote); :meth:`cancel` stops the job from this process (Ctrl-C in
embedded mode) and is seen at the next check without polling. A failing
``cancel_source`` (a Redis blip) is logged once and never stops the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from shared.contract.errors import JobCancelled, JobTimeLimitExceeded
from shared.contract.job import Progress, ProgressCallback

log = logging.getLogger(__name__)

#: How often a running job reads its cancel flag, at most.
CANCEL_POLL_S = 1.0

#: Returns the reason when the job should stop, else None.
CancelSource = Callable[[], "str | None"]


class JobControl:
    """Progress out, time limit and cancellation in; see the module docstring."""

    def __init__(
        self,
        *,
        on_progress: ProgressCallback | None = None,
        cancel_source: CancelSource | None = None,
        poll_s: float = CANCEL_POLL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_progress = on_progress
        self._source = cancel_source
        self._poll_s = poll_s
        self._clock = clock
        self._deadline: float | None = None
        self._limit_s: float | None = None
        self._last_poll = float("-inf")
        self._cancelled: str | None = None
        self._warned = False

    # -- set up --

    def start(self, time_limit_s: float | None) -> JobControl:
        """Start the time limit now (the first call wins: a limit never moves later). Returns self."""
        if time_limit_s is not None and self._deadline is None:
            self._limit_s = float(time_limit_s)
            self._deadline = self._clock() + self._limit_s
        return self

    def attach(self, *, on_progress: ProgressCallback | None = None, cancel_source: CancelSource | None = None) -> JobControl:
        """Set where progress goes and what is polled for a cancellation (the handler does this). Returns self."""
        if on_progress is not None:
            self._on_progress = on_progress
        if cancel_source is not None:
            self._source = cancel_source
        return self

    def cancel(self, reason: str) -> None:
        """Stop the job at its next check, from this process (thread- and signal-safe: no lock is taken)."""
        if self._cancelled is None:
            self._cancelled = reason  # one assignment: the first reason wins, near enough

    @property
    def cancelled(self) -> str | None:
        """The reason the job was cancelled in this process, or None."""
        return self._cancelled

    def remaining_s(self) -> float | None:
        """Seconds left before the time limit (negative once past it); None without a limit."""
        return None if self._deadline is None else self._deadline - self._clock()

    # -- as the job runs --

    def progress(self, progress: Progress) -> None:
        """Report how far the job has got."""
        if self._on_progress is not None:
            self._on_progress(progress)

    __call__ = progress  # a JobControl is also a ProgressCallback

    def check(self, phase: str) -> None:
        """Raise :class:`JobCancelled` or :class:`JobTimeLimitExceeded` if the job must stop now.

        ``phase`` names where the job is, for the reason.
        """
        now = self._clock()
        if self._cancelled is None and self._source is not None and now - self._last_poll >= self._poll_s:
            self._last_poll = now
            try:
                reason = self._source()
            except Exception as exc:  # the record may be out of reach for a moment: carry on
                if not self._warned:
                    log.warning("could not read the cancel flag (%s: %s); carrying on", type(exc).__name__, exc)
                    self._warned = True
            else:
                if reason is not None:
                    self.cancel(reason)
        if self._cancelled is not None:
            raise JobCancelled(f"cancelled during {phase}: {self._cancelled}")
        if self._deadline is not None and now > self._deadline:
            raise JobTimeLimitExceeded(f"the job ran past its time limit of {self._limit_s:g} s (during {phase})")

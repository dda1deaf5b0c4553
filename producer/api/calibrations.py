"""On-demand calibration: the latest posteriors' draws kept in memory, answered vectorised.

``POST /v1/calibrate`` reads one latest pointer from Redis per request (so
it always answers from the current fit), and keeps, per pointer's job id,
the posterior and the (α, β) draws of each (event, track, archetype) asked
for. When a pointer moves to another job, everything of the job it left is
dropped: a request is never answered from a fit that is no longer latest.
The formula is :func:`shared.fit.apply.calibrate_with_draws`, the same as
``calq apply``'s, including the unseen-track fallback of
:func:`~shared.fit.apply.parameter_draws`.

Summaries read for ``/v1/latest`` are kept by URI: a stored summary never
changes (a job's summary is written once), so the cache is never stale.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.contract.errors import NotFound
from shared.fit.apply import calibrate_with_draws, fallback_archetype, parameter_draws, track_seen

#: Draws kept for this many (job, event, track, archetype) combinations, least recently used dropped first.
KEEP_DRAWS = 256
KEEP_SUMMARIES = 256


class Calibrations:
    """The API's cache of latest posteriors and their draws (see the module docstring)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._slots: dict[tuple[str, str], str] = {}  # (archetype, event) → the job id last seen as latest
        self._posteriors: dict[str, Any] = {}  # job id → InferenceData
        self._draws: OrderedDict[tuple[str, str, str | None, str], tuple[np.ndarray, np.ndarray, bool | None]] = OrderedDict()
        self._summaries: OrderedDict[str, str] = OrderedDict()

    def calibrate(
        self, archetype: str, track: str | None, event: str, p: Sequence[float]
    ) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, bool | None]:
        """``(job_id, mean, low, high, track_seen)`` for forecasts ``p`` from the latest converged fit.

        NotFound if the archetype has no converged fit for ``event``;
        ValueError/KeyError (the caller's input) for p outside [0, 1], a
        track named like a fitted one but in another case
        (:func:`~shared.fit.apply.track_seen`), or an unknown track without a usable archetype.
        """
        values = np.asarray(p, dtype=np.float64)
        if values.ndim != 1 or not np.all((values >= 0) & (values <= 1)):
            raise ValueError("p must be a list of probabilities in [0, 1]")
        pointer = self.client.registry.latest(archetype, event)
        if pointer is None:
            raise NotFound(f"no converged calibration for {archetype} / {event} yet")
        alpha, beta, seen = self._draws_for(pointer, archetype, track, event)
        mean, low, high = calibrate_with_draws(alpha, beta, values)
        return pointer.job_id, mean, low, high, seen

    def summary_json(self, uri: str) -> str:
        """The summary stored at ``uri`` as JSON (read and checked by the catalog once, then kept)."""
        with self._lock:
            found = self._summaries.get(uri)
            if found is not None:
                self._summaries.move_to_end(uri)
                return found
        text = self.client.catalog.read(uri).model_dump_json()
        with self._lock:
            self._summaries[uri] = text
            while len(self._summaries) > KEEP_SUMMARIES:
                self._summaries.popitem(last=False)
        return text

    def _draws_for(
        self, pointer: Any, archetype: str, track: str | None, event: str
    ) -> tuple[np.ndarray, np.ndarray, bool | None]:
        key = (pointer.job_id, event, track, archetype)
        with self._lock:
            self._follow(archetype, event, pointer.job_id)
            found = self._draws.get(key)
            if found is not None:
                self._draws.move_to_end(key)
                return found
            idata = self._posteriors.get(pointer.job_id)
        if idata is None:
            idata = self._load(pointer)
        seen = track_seen(idata, track, archetype=archetype)
        fallback = fallback_archetype(idata, track=track, archetype=archetype)
        alpha, beta, _ = parameter_draws(idata, event=event, track=track, archetype=fallback)
        with self._lock:
            if self._slots.get((archetype, event)) == pointer.job_id:  # still latest: keep it
                self._posteriors[pointer.job_id] = idata
                self._draws[key] = (alpha, beta, seen)
                while len(self._draws) > KEEP_DRAWS:
                    self._draws.popitem(last=False)
        return alpha, beta, seen

    def _load(self, pointer: Any) -> Any:
        return self.client.posterior(pointer.job_id)  # the client's read, with whatever checks it makes

    def _follow(self, archetype: str, event: str, job_id: str) -> None:
        """Record that ``job_id`` is latest for the slot; drop what belonged to the job it replaced (lock held)."""
        before = self._slots.get((archetype, event))
        if before == job_id:
            return
        self._slots[(archetype, event)] = job_id
        if before is not None and before not in self._slots.values():
            self._posteriors.pop(before, None)
            for key in [k for k in self._draws if k[0] == before]:
                del self._draws[key]


__all__ = ["Calibrations"]

"""A verified dataset, decoded once per process while job after job reads it.

A backfill's jobs (each data window of a season, each archetype) read one
dataset; a worker that decodes it for every job spends the time again for the
same bytes. :func:`decoded` keeps the last dataset decoded, keyed by the
file, the sha256 that :meth:`~shared.storage.store.Store.fetch_dataset` has
just verified its bytes against, and the limits it was read under. Each job
still fetches, and so is refused or verified, as before (who may name which
file, its hash, its size); only the decoding is shared, and only for bytes
with the same hash. One dataset is kept, and only one that decodes to at most
:data:`MAX_KEPT_BYTES`: an idle worker holds no more than that. Callers never
change the dataset they get (:func:`shared.fit.calibrate.calibrate` selects
from it into new objects).

The contract check is shared the same way: :func:`validated` validates the
kept dataset once per archetype, events and ``limits.future_days`` (a pass
stays a pass: a race not in the future then is not in the future later),
for the same verified bytes; any other dataset is validated every time.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import xarray as xr

from shared.contract.job import CalibrationJob
from shared.contract.settings import DataLimits, get_settings
from shared.data.dataset import open_dataset, validate

#: The largest decoded dataset kept between jobs.
MAX_KEPT_BYTES = 512 * 2**20

_lock = threading.Lock()
_kept: tuple[tuple[str, str, DataLimits], xr.Dataset] | None = None
#: The contract checks the kept dataset passed: (archetype, events, future_days).
_passed: set[tuple[str, tuple[str, ...], float]] = set()


def decoded(path: Path, *, sha256: str, limits: DataLimits, label: str) -> xr.Dataset:
    """The dataset in ``path``, whose bytes were just verified to hash to ``sha256``, read under ``limits``.

    :func:`~shared.data.dataset.open_dataset` without the contract check
    (``calibrate`` validates it), or the same dataset decoded by an earlier call.
    """
    global _kept
    key = (os.fspath(path), sha256, limits)
    with _lock:
        if _kept is not None and _kept[0] == key:
            return _kept[1]
    dataset = open_dataset(path, check=False, limits=limits, label=label)
    with _lock:
        _kept = (key, dataset) if dataset.nbytes <= MAX_KEPT_BYTES else None
        _passed.clear()
    return dataset


def validated(dataset: xr.Dataset, job: CalibrationJob) -> None:
    """:func:`~shared.data.dataset.validate` ``dataset`` for ``job`` (its archetype and events), as calibrate() does.

    Raises its :class:`~shared.contract.errors.InvalidDataset`. The kept
    dataset (:func:`decoded`) is checked once per archetype, events and
    ``limits.future_days``; the next job asking the same of it is not checked again.
    """
    check = (job.archetype, tuple(job.events), get_settings().limits.future_days)
    with _lock:
        kept = _kept is not None and _kept[1] is dataset
        if kept and check in _passed:
            return
    validate(dataset, archetype=job.archetype, events=job.events, source=job.dataset_uri)
    with _lock:
        if kept and _kept is not None and _kept[1] is dataset:
            _passed.add(check)


__all__ = ["MAX_KEPT_BYTES", "decoded", "validated"]

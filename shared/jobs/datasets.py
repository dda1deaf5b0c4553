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
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import xarray as xr

from shared.contract.settings import DataLimits
from shared.data.dataset import open_dataset

#: The largest decoded dataset kept between jobs.
MAX_KEPT_BYTES = 512 * 2**20

_lock = threading.Lock()
_kept: tuple[tuple[str, str, DataLimits], xr.Dataset] | None = None


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
    return dataset


__all__ = ["MAX_KEPT_BYTES", "decoded"]

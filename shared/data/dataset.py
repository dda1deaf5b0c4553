"""The calibration dataset: reading, validating, selecting and flattening it.

A calibration dataset is an :class:`xarray.Dataset` (NetCDF on disk)::

    sim_position[race, scenario, driver]   simulated finishing positions
    sim_points[race, scenario, driver]     simulated fantasy points (optional)
    finish_position[race, driver]          what happened
    points[race, driver]                   fantasy points scored (optional)

with the index coordinates ``race`` and ``driver`` (string ids) and
``scenario`` (integers), and the race coordinates ``race_date``
(datetime64), ``track`` (free-form name) and ``archetype`` (one of
:data:`~shared.contract.domain.ARCHETYPES`). A driver not entered in a race is NaN in
every variable of that race, never 0; in each race and each scenario the
entered drivers hold the positions 1..n_entered exactly once.

:func:`validate` checks all of this and reports every problem at once;
:func:`event_rows` turns a valid dataset into the long table the model fits.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any

import netCDF4
import numpy as np
import xarray as xr

from shared.contract.domain import ARCHETYPES, EARLIEST_DATE, LATEST_DATE, MAX_WINDOW_DAYS, event_threshold
from shared.contract.errors import DatasetNotFound, InvalidDataset
from shared.contract.settings import DataLimits, get_settings
from shared.data.limits import check_bytes, check_file, unreadable_reason
from shared.data.validation import (  # the dataset contract, re-exported
    MAX_LINES_PER_PROBLEM,
    OPTIONAL_VARIABLES,
    RACE_COORDINATES,
    REQUIRED_VARIABLES,
    VARIABLE_DIMS,
    race_blocks,
    validate,
    variable_values,
)
from shared.storage.netcdf import write_netcdf

log = logging.getLogger(__name__)

#: Forecast probabilities are clipped to [P_EPS, 1 - P_EPS].
P_EPS = 1e-4

Source = str | os.PathLike | IO[bytes]


# --------------------------------------------------------------------------- I/O


def open_dataset(
    source: Source,
    *,
    archetype: str | None = None,
    check: bool = True,
    limits: DataLimits | None = None,
    label: str | None = None,
) -> xr.Dataset:
    """Read a calibration dataset fully into memory, close the file, validate it.

    ``source`` is a path or a binary file-like object holding NetCDF bytes.
    Before any array is decoded, the file and its header are checked against
    ``limits`` (default: the settings' ``limits``, ``CALQ_LIMITS__*``; see
    :mod:`shared.data.limits`), so a file declaring 50 GB costs a header
    read, a FIFO is never opened and a folder is named as one.
    Raises :class:`~shared.contract.errors.DatasetNotFound` for a path that does not
    exist, and :class:`~shared.contract.errors.InvalidDataset` for bytes that are not
    readable NetCDF, break a limit, do not fit in memory while loading, or
    break the contract (see :func:`validate`).
    ``check=False`` skips the contract (not the limits), for callers that
    validate next anyway (:func:`shared.fit.calibrate.calibrate` does).
    ``label`` names the dataset in messages (default: the path).
    """
    label = label or _source_label(source)
    limits = limits or get_settings().limits
    if isinstance(source, (str, os.PathLike)):
        check_file(source, limits, source=label)
    else:
        source = _BytesSource(source.read())
        check_bytes(source.data, limits, source=label)
    ds = _read_netcdf(source, label=label)
    log.debug("read dataset %s: %s", label, dict(ds.sizes))
    return validate(ds, archetype=archetype, source=label, limits=limits) if check else ds


def save_dataset(ds: xr.Dataset, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write ``ds`` as NetCDF-4 to ``path`` atomically and return the path.

    The file is written to a temporary name in the same folder, then moved
    over ``path`` with :func:`os.replace`, so a reader sees the old file or
    the new one, never half of one. Attributes netCDF cannot hold (dicts,
    lists, booleans, ``None``) are stored JSON-encoded (:mod:`shared.storage.netcdf`).
    With ``compress`` the data variables are zlib-compressed (level 1, byte-shuffled).
    ``open_dataset(save_dataset(ds, path))`` equals ``ds``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoding = _compression(ds) if compress else {}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_netcdf(ds, tmp, encoding=encoding)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.debug("wrote dataset %s", path)
    return path


def _source_label(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", None) or "<file object>")


@dataclass(frozen=True)
class _BytesSource:
    data: bytes


def _read_netcdf(source: str | os.PathLike | _BytesSource, *, label: str) -> xr.Dataset:
    """Load a NetCDF source into memory; the file is closed on return.

    A MemoryError while decoding is a rejection with a clear reason (the
    limits were not tight enough for this worker), never a traceback.
    """
    try:
        if isinstance(source, _BytesSource):
            return _read_netcdf_bytes(source.data)
        with xr.open_dataset(os.fspath(source), engine="netcdf4") as lazy:
            return lazy.load()
    except FileNotFoundError as exc:
        raise DatasetNotFound(f"no dataset file at {label}") from exc
    except MemoryError as exc:
        problem = (
            "the dataset did not fit in this worker's memory while it was decoded (MemoryError); "
            "lower limits.max_decoded_bytes on this worker, or split the dataset"
        )
        raise InvalidDataset([problem], source=label) from exc
    except UnicodeDecodeError as exc:
        problem = f"the file holds text that is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        raise InvalidDataset([problem], source=label, intrinsic=True) from exc
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, IndexError) as exc:
        raise InvalidDataset([unreadable_reason(exc)], source=label, intrinsic=True) from exc


def _read_netcdf_bytes(data: bytes) -> xr.Dataset:
    """Decode NetCDF bytes held in memory (the netCDF4 backend takes no file objects)."""
    if not data:
        raise ValueError("the file is empty")
    nc = netCDF4.Dataset("in-memory.nc", mode="r", memory=data)
    try:
        with xr.open_dataset(xr.backends.NetCDF4DataStore(nc)) as lazy:
            return lazy.load()
    finally:
        if nc.isopen():
            nc.close()


def _compression(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    return {
        name: {"zlib": True, "complevel": 1, "shuffle": True}
        for name, var in ds.data_vars.items()
        if np.issubdtype(var.dtype, np.number)
    }


# --------------------------------------------------------------------- selection


def select_window(ds: xr.Dataset, *, as_of: date | None, window_days: int | None) -> xr.Dataset:
    """The races strictly before ``as_of``, and on or after ``as_of - window_days``.

    ``as_of=None`` keeps every race (``window_days`` then needs ``as_of``).
    ``as_of`` must lie in [EARLIEST_DATE, LATEST_DATE] and ``window_days`` in
    1..MAX_WINDOW_DAYS (:mod:`shared.contract.domain`), the job schema's
    bounds, so the window's ends are nanosecond datetimes that never
    overflow; anything else raises ``ValueError`` (a job never gets here with one).
    """
    keep = _in_window(ds, as_of=as_of, window_days=window_days)
    return ds if keep is None else ds.isel(race=np.nonzero(keep)[0])


def select_archetypes(ds: xr.Dataset, archetypes: Sequence[str]) -> xr.Dataset:
    """The races whose archetype is one of ``archetypes``."""
    return ds.isel(race=np.nonzero(_of_archetypes(ds, archetypes))[0])


def select_races(
    ds: xr.Dataset, *, as_of: date | None, window_days: int | None, archetypes: Sequence[str]
) -> xr.Dataset:
    """A job's races: ``select_archetypes(select_window(ds, ...), archetypes)``, selected in one step.

    Each selection copies every race variable of what it selects from (the
    scenarios' positions and points, 8 MB each on 3 seasons): one step copies
    the job's races once. Measured on the 14 jobs of a 3-season backfill,
    CPU s a job, median of 5: 0.0030 → 0.0009 (load 5).
    """
    keep = _of_archetypes(ds, archetypes)
    window = _in_window(ds, as_of=as_of, window_days=window_days)
    if window is not None:
        keep &= window
    return ds.isel(race=np.nonzero(keep)[0])


def _in_window(ds: xr.Dataset, *, as_of: date | None, window_days: int | None) -> np.ndarray | None:
    """Which races :func:`select_window` keeps (None: every race); its checks."""
    if as_of is None:
        if window_days is not None:
            raise ValueError("window_days needs as_of: the window ends at as_of")
        return None
    day = as_of.date() if isinstance(as_of, datetime) else as_of
    if not EARLIEST_DATE <= day <= LATEST_DATE:
        raise ValueError(f"as_of {day} is outside {EARLIEST_DATE}..{LATEST_DATE}")
    if window_days is not None and not 1 <= window_days <= MAX_WINDOW_DAYS:
        raise ValueError(f"window_days {window_days} is outside 1..{MAX_WINDOW_DAYS}")
    return in_window(ds["race_date"].values, as_of=as_of, window_days=window_days)


def in_window(dates: np.ndarray, *, as_of: date, window_days: int | None) -> np.ndarray:
    """Which of ``dates`` (datetime64, any unit) a job's window holds: before ``as_of``, on or after ``as_of - window_days``.

    The rule alone, without :func:`select_window`'s checks of ``as_of`` and ``window_days``.
    """
    end = _day(as_of)
    keep = dates < end
    if window_days is not None:
        keep &= dates >= end - np.timedelta64(window_days, "D")
    return keep


def _of_archetypes(ds: xr.Dataset, archetypes: Sequence[str]) -> np.ndarray:
    """Which races :func:`select_archetypes` keeps."""
    return np.isin(np.asarray(ds["archetype"].values).astype(str), list(archetypes))


def _day(value: date) -> np.datetime64:
    """``value`` in nanoseconds, the unit race dates are decoded to (a bounded date: see :func:`select_window`)."""
    if isinstance(value, datetime):
        return np.datetime64(value.replace(tzinfo=None), "ns")
    return np.datetime64(value, "D").astype("datetime64[ns]")


# ------------------------------------------------------------------ probabilities


def forecast_probability(sim_position: Any, threshold: int) -> np.ndarray:
    """The forecast probability of finishing in the top ``threshold``, per driver.

    ``sim_position`` is an array [..., scenario, driver] (scenario axis -2).
    With k the number of scenarios in which the driver finishes at or above
    ``threshold`` and M the number of scenarios::

        p = (k + 1/2) / (M + 1)           (Jeffreys-style smoothing)
        p = clip(p, P_EPS, 1 - P_EPS)

    so 1/(2(M+1)) ≤ p ≤ 1 - 1/(2(M+1)) before clipping, and always
    P_EPS ≤ p ≤ 1 - P_EPS: p is never 0 or 1, and logit(p) stays within
    ±logit(1 - P_EPS) ≈ ±9.21. The result is float64 [..., driver], NaN where
    the driver has no simulated positions (not entered).
    """
    positions = np.asarray(sim_position)
    n_scenarios = (~np.isnan(positions)).sum(axis=-2)
    hits = (positions <= threshold).sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = (hits + 0.5) / (n_scenarios + 1.0)
    p = np.clip(p, P_EPS, 1.0 - P_EPS)
    return np.where(n_scenarios > 0, p, np.nan)


# --------------------------------------------------------------------- long rows


@dataclass(frozen=True)
class EventRows:
    """The long table the model fits: one row per (event, entered race-driver).

    Integer columns index into the name tuples: ``event`` into ``events``,
    ``archetype`` into ``archetypes``, ``track`` into ``tracks``, ``race``
    into ``races`` and ``driver`` into ``drivers``. ``p`` is the forecast
    probability (see :func:`forecast_probability`), ``y`` the outcome
    ``finish_position <= threshold``. ``track_archetype[i]`` is the index in
    ``archetypes`` of track ``tracks[i]``; a track is identified by its
    (archetype, name), so a name may recur under two archetypes. Rows are
    ordered by event, then race, then driver.
    """

    event: np.ndarray
    archetype: np.ndarray
    track: np.ndarray
    race: np.ndarray
    driver: np.ndarray
    p: np.ndarray
    y: np.ndarray
    events: tuple[str, ...]
    archetypes: tuple[str, ...]
    tracks: tuple[str, ...]
    track_archetype: np.ndarray
    races: tuple[str, ...]
    drivers: tuple[str, ...]

    @property
    def n_rows(self) -> int:
        return int(self.p.shape[0])


def event_rows(ds: xr.Dataset, *, events: Sequence[str], archetypes: Sequence[str]) -> EventRows:
    """Flatten a validated dataset into :class:`EventRows`.

    Only races of ``archetypes`` are kept, and ``archetypes`` keep the order
    given. Tracks are the distinct (archetype, track) pairs of those races,
    sorted by archetype index, then name. Drivers not entered in a race
    (NaN finish_position) have no rows.
    """
    archetypes = tuple(archetypes)
    unknown = [a for a in archetypes if a not in ARCHETYPES]
    if unknown:
        raise ValueError(f"unknown archetype(s) {', '.join(unknown)}; expected {', '.join(ARCHETYPES)}")
    thresholds = [event_threshold(e) for e in events]
    race_archetype_names = np.asarray(ds["archetype"].values).astype(str)
    keep = np.flatnonzero(np.isin(race_archetype_names, archetypes))
    race_archetype = np.array([archetypes.index(a) for a in race_archetype_names[keep]], dtype=np.int32)
    tracks, track_archetype, race_track = _track_index(
        np.asarray(ds["track"].values).astype(str)[keep], race_archetype
    )
    finish = variable_values(ds, "finish_position").astype(np.float64)[keep]
    entered = ~np.isnan(finish)
    p = _event_probabilities(variable_values(ds, "sim_position"), keep, thresholds)
    y = np.stack([entered & (finish <= t) for t in thresholds])
    e_idx, r_idx, d_idx = np.nonzero(np.broadcast_to(entered, p.shape))
    rows = EventRows(
        event=e_idx.astype(np.int32),
        archetype=race_archetype[r_idx],
        track=race_track[r_idx],
        race=r_idx.astype(np.int32),
        driver=d_idx.astype(np.int32),
        p=p[e_idx, r_idx, d_idx],
        y=y[e_idx, r_idx, d_idx].astype(np.int8),
        events=tuple(events),
        archetypes=archetypes,
        tracks=tracks,
        track_archetype=track_archetype,
        races=tuple(np.asarray(ds["race"].values).astype(str)[keep].tolist()),
        drivers=tuple(np.asarray(ds["driver"].values).astype(str).tolist()),
    )
    log.debug("event rows: %d rows, %d races, %d tracks", rows.n_rows, len(rows.races), len(tracks))
    return rows


def _event_probabilities(sims: np.ndarray, races: np.ndarray, thresholds: Sequence[int]) -> np.ndarray:
    """[event, race, driver] forecast probabilities of the ``races`` (indices), in blocks."""
    n_scenarios, n_drivers = sims.shape[1:]
    p = np.empty((len(thresholds), races.size, n_drivers))
    for block in race_blocks(races.size, n_scenarios * n_drivers):
        x = sims[races[block]]
        for e, t in enumerate(thresholds):
            p[e, block] = forecast_probability(x, t)
    return p


def _track_index(race_tracks: np.ndarray, race_archetype: np.ndarray) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Distinct (archetype, track) pairs sorted by (archetype index, name).

    Returns the track names, each track's archetype index and each race's track index.
    """
    pairs = sorted({(int(a), str(t)) for a, t in zip(race_archetype, race_tracks)})
    index = {pair: i for i, pair in enumerate(pairs)}
    race_track = np.array(
        [index[(int(a), str(t))] for a, t in zip(race_archetype, race_tracks)], dtype=np.int32
    )
    names = tuple(t for _, t in pairs)
    track_archetype = np.array([a for a, _ in pairs], dtype=np.int32)
    return names, track_archetype, race_track


__all__ = [
    "MAX_LINES_PER_PROBLEM",
    "OPTIONAL_VARIABLES",
    "P_EPS",
    "RACE_COORDINATES",
    "REQUIRED_VARIABLES",
    "VARIABLE_DIMS",
    "EventRows",
    "event_rows",
    "forecast_probability",
    "in_window",
    "open_dataset",
    "save_dataset",
    "select_archetypes",
    "select_races",
    "select_window",
    "validate",
]

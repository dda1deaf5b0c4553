"""The calibration dataset: reading, validating, selecting and flattening it.

A calibration dataset is an :class:`xarray.Dataset` (NetCDF on disk)::

    sim_position[race, scenario, driver]   simulated finishing positions
    sim_points[race, scenario, driver]     simulated fantasy points (optional)
    finish_position[race, driver]          what happened
    points[race, driver]                   fantasy points scored (optional)

with the index coordinates ``race`` and ``driver`` (string ids) and
``scenario`` (integers), and the race coordinates ``race_date``
(datetime64), ``track`` (free-form name) and ``archetype`` (one of
:data:`~shared.domain.ARCHETYPES`). A driver not entered in a race is NaN in
every variable of that race, never 0; in each race and each scenario the
entered drivers hold the positions 1..n_entered exactly once.

:func:`validate` checks all of this and reports every problem at once;
:func:`event_rows` turns a valid dataset into the long table the model fits.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import netCDF4
import numpy as np
import xarray as xr

from shared.domain import ARCHETYPES, archetypes_of, event_threshold
from shared.errors import DatasetNotFound, InvalidDataset
from shared.netcdf import write_netcdf

log = logging.getLogger(__name__)

#: Variables every calibration dataset holds.
REQUIRED_VARIABLES: tuple[str, ...] = ("sim_position", "finish_position")
#: Variables a dataset may hold; they come as a pair.
OPTIONAL_VARIABLES: tuple[str, ...] = ("sim_points", "points")
#: The dimensions of every known variable, in canonical order.
VARIABLE_DIMS: dict[str, tuple[str, ...]] = {
    "sim_position": ("race", "scenario", "driver"),
    "sim_points": ("race", "scenario", "driver"),
    "finish_position": ("race", "driver"),
    "points": ("race", "driver"),
}
#: Coordinates along ``race`` every dataset holds.
RACE_COORDINATES: tuple[str, ...] = ("race_date", "track", "archetype")
#: Forecast probabilities are clipped to [P_EPS, 1 - P_EPS].
P_EPS = 1e-4

#: At most this many lines are reported per kind of problem.
MAX_LINES_PER_PROBLEM = 5
#: Value checks walk the simulations in blocks of races of about this many cells.
_BLOCK_CELLS = 1 << 22

Source = str | os.PathLike | IO[bytes]


# --------------------------------------------------------------------------- I/O


def open_dataset(source: Source, *, archetype: str | None = None) -> xr.Dataset:
    """Read a calibration dataset fully into memory, close the file, validate it.

    ``source`` is a path or a binary file-like object holding NetCDF bytes.
    Raises :class:`~shared.errors.DatasetNotFound` for a path that does not
    exist, and :class:`~shared.errors.InvalidDataset` for bytes that are not
    readable NetCDF or a dataset that breaks the contract (see :func:`validate`).
    """
    label = _source_label(source)
    ds = _read_netcdf(source, label=label)
    log.debug("read dataset %s: %s", label, dict(ds.sizes))
    return validate(ds, archetype=archetype, source=label)


def save_dataset(ds: xr.Dataset, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write ``ds`` as NetCDF-4 to ``path`` atomically and return the path.

    The file is written to a temporary name in the same folder, then moved
    over ``path`` with :func:`os.replace`, so a reader sees the old file or
    the new one, never half of one. Attributes netCDF cannot hold (dicts,
    lists, booleans, ``None``) are stored JSON-encoded (:mod:`shared.netcdf`). With ``compress`` the data variables are zlib-compressed (level 1,
    byte-shuffled). ``open_dataset(save_dataset(ds, path))`` equals ``ds``.
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


def content_sha256(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's bytes, read in chunks of ``chunk_size``."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_label(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", None) or "<file object>")


def _read_netcdf(source: Source, *, label: str) -> xr.Dataset:
    """Load a NetCDF source into memory; the file is closed on return."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with xr.open_dataset(os.fspath(source), engine="netcdf4") as lazy:
                return lazy.load()
        return _read_netcdf_bytes(source.read())
    except FileNotFoundError as exc:
        raise DatasetNotFound(f"no dataset file at {label}") from exc
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        problem = f"the file is not a readable NetCDF dataset ({type(exc).__name__}: {exc})"
        raise InvalidDataset([problem], source=label) from exc


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


# -------------------------------------------------------------------- validation


def validate(ds: xr.Dataset, *, archetype: str | None = None, source: str | None = None) -> xr.Dataset:
    """Check ``ds`` against the calibration-dataset contract; return it unchanged.

    Every problem found is collected, one human-readable line each naming the
    variable, race and driver concerned, and raised together as one
    :class:`~shared.errors.InvalidDataset` (with ``source``). ``archetype``
    (one of :data:`~shared.domain.ARCHETYPES`, ``"all"`` or ``None``) adds
    the requirement that the dataset holds races of that archetype.
    Value checks are vectorised and walk the simulations in blocks of races,
    so memory stays bounded on large datasets.
    """
    problems, usable = _variable_problems(ds)
    problems += _coordinate_problems(ds)
    if archetype is not None and archetype != "all":
        problems += _archetype_problems(ds, archetypes_of(archetype)[0])
    if "finish_position" in usable:
        problems += _finish_problems(ds)
    sim_entered = None
    if "sim_position" in usable:
        sim_problems, sim_entered = _simulation_problems(ds)
        problems += sim_problems
    if "finish_position" in usable and sim_entered is not None:
        problems += _entry_problems(ds, sim_entered)
    problems += _points_problems(ds, usable)
    if problems:
        log.info("dataset %s rejected: %d problem(s)", source or "<memory>", len(problems))
        raise InvalidDataset(problems, source=source)
    return ds


def _variable_problems(ds: xr.Dataset) -> tuple[list[str], set[str]]:
    """Missing variables, wrong dimensions and non-numeric types; the usable names."""
    problems: list[str] = []
    usable: set[str] = set()
    for name in REQUIRED_VARIABLES:
        if name not in ds.variables:
            problems.append(f"missing required variable {name} {_dims_text(VARIABLE_DIMS[name])}")
    for name, dims in VARIABLE_DIMS.items():
        if name not in ds.variables:
            continue
        var = ds[name]
        if set(var.dims) != set(dims) or len(var.dims) != len(dims):
            problems.append(f"{name}: wrong dimensions {_dims_text(var.dims)}, expected {_dims_text(dims)}")
        elif not np.issubdtype(var.dtype, np.number):
            problems.append(f"{name}: expected numbers, got values of dtype {var.dtype}")
        elif "scenario" in dims and var.sizes["scenario"] == 0:
            problems.append(f"{name}: no scenarios (the scenario dimension is empty)")
        else:
            usable.add(name)
    for name, other in (("points", "sim_points"), ("sim_points", "points")):
        if name in ds.variables and other not in ds.variables:
            problems.append(f"{name} is present without {other}: the two come as a pair")
    return problems, usable


def _coordinate_problems(ds: xr.Dataset) -> list[str]:
    problems: list[str] = []
    for dim in ("race", "driver"):
        if dim not in ds.coords:
            problems.append(f"missing coordinate {dim} (the {dim} ids)")
        else:
            problems += _duplicate_id_problems(ds[dim].values, what=dim)
    if ds.sizes.get("race", 0) == 0:
        problems.append("the dataset has no races")
    for name in RACE_COORDINATES:
        if name not in ds.variables:
            problems.append(f"missing coordinate {name} along race")
        elif ds[name].dims != ("race",):
            problems.append(f"coordinate {name}: wrong dimensions {_dims_text(ds[name].dims)}, expected (race)")
        else:
            problems += _RACE_COORDINATE_CHECKS[name](ds)
    return problems


def _duplicate_id_problems(ids: np.ndarray, *, what: str) -> list[str]:
    counts = Counter(str(i) for i in ids)
    repeated = [f"{i} (×{n})" for i, n in counts.items() if n > 1]
    if not repeated:
        return []
    return [f"{what}: duplicated {what} ids {', '.join(repeated[:10])}" + _more(len(repeated) - 10)]


def _race_date_problems(ds: xr.Dataset) -> list[str]:
    dates = ds["race_date"].values
    if not np.issubdtype(dates.dtype, np.datetime64):
        return [f"race_date: expected datetime64 dates, got values of dtype {dates.dtype}"]
    missing = np.isnat(dates)
    if missing.any():
        return [f"race_date: missing (NaT) for race(s) {_race_list(ds, missing)}"]
    return []


def _track_problems(ds: xr.Dataset) -> list[str]:
    tracks = ds["track"].values
    blank = np.array([not isinstance(t, str) or not t.strip() for t in tracks.tolist()], dtype=bool)
    if blank.any():
        return [f"track: missing track name for race(s) {_race_list(ds, blank)}"]
    return []


def _archetype_value_problems(ds: xr.Dataset) -> list[str]:
    values = np.asarray(ds["archetype"].values).astype(str)
    unknown = ~np.isin(values, ARCHETYPES)
    if not unknown.any():
        return []
    names = ", ".join(repr(v) for v in sorted(set(values[unknown].tolist())))
    return [
        f"archetype: unknown value(s) {names} in race(s) {_race_list(ds, unknown)}; "
        f"expected one of {', '.join(ARCHETYPES)}"
    ]


_RACE_COORDINATE_CHECKS = {
    "race_date": _race_date_problems,
    "track": _track_problems,
    "archetype": _archetype_value_problems,
}


def _archetype_problems(ds: xr.Dataset, archetype: str) -> list[str]:
    """The archetype a job asks for must have races in the dataset."""
    if "archetype" not in ds.variables or ds["archetype"].dims != ("race",):
        return []
    values = np.asarray(ds["archetype"].values).astype(str)
    if (values == archetype).any():
        return []
    present = Counter(values.tolist())
    holds = ", ".join(f"{a} ×{n}" for a, n in sorted(present.items())) or "no races at all"
    return [f"archetype: no races of archetype {archetype} (the dataset holds {holds})"]


def _finish_problems(ds: xr.Dataset) -> list[str]:
    """finish_position: integers in 1..n_entered, each held by one driver per race."""
    finish = _values(ds, "finish_position").astype(np.float64)
    present = ~np.isnan(finish)
    n_entered = present.sum(axis=1)
    nonint, outside = _bad_positions(finish, present, n_entered[:, None])
    problems = _first_cell_lines(
        ds,
        nonint,
        lambda race, cell: f"finish_position: race {race} has non-integer positions ({cell})",
        finish,
        what="races with non-integer finish_position",
    )
    problems += _first_cell_lines(
        ds,
        outside,
        lambda race, cell: f"finish_position: race {race} has positions outside 1..n_entered ({cell})",
        finish,
        what="races with finish_position out of range",
    )
    valid = present & ~nonint & ~outside
    problems += _shared_finish_lines(ds, finish, valid)
    return problems


def _bad_positions(
    positions: np.ndarray, present: np.ndarray, n_entered: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of present positions that are not integers, and of integers outside 1..n.

    ``n_entered`` broadcasts against ``positions``. Infinities count as
    integers out of range.
    """
    with np.errstate(invalid="ignore"):
        nonint = present & (np.round(positions) != positions)
        outside = present & ~nonint & ((positions < 1) | (positions > n_entered))
    return nonint, outside


def _shared_finish_lines(ds: xr.Dataset, finish: np.ndarray, valid: np.ndarray) -> list[str]:
    """One line per (race, position) that two or more drivers hold."""
    n_races, n_drivers = finish.shape
    counts = _position_counts(finish, valid, n_rows=n_races, n_positions=n_drivers)
    races, positions = np.nonzero(counts > 1)
    race_ids, driver_ids = _labels(ds, "race"), _labels(ds, "driver")
    lines = []
    for r, pos in zip(races.tolist(), positions.tolist()):
        holders = np.nonzero(valid[r] & (finish[r] == pos))[0]
        names = ", ".join(driver_ids[d] for d in holders)
        lines.append(
            f"finish_position: race {race_ids[r]} has {_count_word(len(holders))} drivers "
            f"in position {pos} ({names})"
        )
    return _capped(lines, what="shared finishing positions")


def _position_counts(positions: np.ndarray, valid: np.ndarray, *, n_rows: int, n_positions: int) -> np.ndarray:
    """How many drivers hold each position, per row: counts[row, pos] for pos in 0..n_positions.

    ``positions`` is [row, driver]; only ``valid`` cells (integers in 1..n) count.
    """
    rows = np.broadcast_to(np.arange(n_rows)[:, None], positions.shape)
    flat = rows[valid] * (n_positions + 1) + positions[valid].astype(np.int64)
    return np.bincount(flat, minlength=n_rows * (n_positions + 1)).reshape(n_rows, n_positions + 1)


def _simulation_problems(ds: xr.Dataset) -> tuple[list[str], np.ndarray]:
    """sim_position: each scenario a permutation of 1..n_entered over the entered drivers.

    Returns the problems and the [race, driver] mask of drivers with simulations.
    """
    sims = _values(ds, "sim_position")
    n_races, n_scenarios, n_drivers = sims.shape
    entered = np.zeros((n_races, n_drivers), dtype=bool)
    found: dict[str, list[str]] = {"partial": [], "nonint": [], "outside": [], "perm": []}
    race_ids, driver_ids = _labels(ds, "race"), _labels(ds, "driver")
    for block in _race_blocks(n_races, n_scenarios * n_drivers):
        x = sims[block]
        present = ~np.isnan(x)
        n_present = present.sum(axis=1, dtype=np.int64)
        entered[block] = n_present > 0
        n_entered = entered[block].sum(axis=1)
        nonint, outside = _bad_positions(x, present, n_entered[:, None, None])
        repeated = _repeated_scenarios(x, present, nonint | outside, n_entered)
        for i, r in enumerate(range(block.start, block.stop)):
            race = race_ids[r]
            found["partial"] += _partial_line(race, n_present[i], n_scenarios, driver_ids)
            found["nonint"] += _sim_cell_line(race, nonint[i], x[i], driver_ids, "non-integer positions")
            found["outside"] += _sim_cell_line(race, outside[i], x[i], driver_ids, "positions outside 1..n_entered")
            found["perm"] += _permutation_line(race, repeated[i], x[i], driver_ids, n_entered[i])
    problems = _capped(found["partial"], what="races with gaps in sim_position")
    problems += _capped(found["nonint"], what="races with non-integer sim_position")
    problems += _capped(found["outside"], what="races with sim_position out of range")
    problems += _capped(found["perm"], what="races whose scenarios are not permutations")
    return problems, entered


def _repeated_scenarios(
    x: np.ndarray, present: np.ndarray, invalid: np.ndarray, n_entered: np.ndarray
) -> np.ndarray:
    """[race, scenario] mask of scenarios in which two drivers share a position.

    A scenario whose n_entered positions are all integers in 1..n_entered is
    a permutation exactly when its sorted positions are 1, 2, …, n_entered;
    scenarios with gaps or invalid values are reported by other checks.
    """
    ordered = np.sort(x, axis=-1)  # NaN sorts last
    expected = np.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    in_field = expected <= n_entered[:, None, None]
    mismatch = ((ordered != expected) & in_field).any(axis=-1)
    complete = present.sum(axis=-1) == n_entered[:, None]
    return mismatch & complete & ~invalid.any(axis=-1)


def _partial_line(race: str, n_present: np.ndarray, n_scenarios: int, driver_ids: list[str]) -> list[str]:
    gaps = np.nonzero((n_present > 0) & (n_present < n_scenarios))[0]
    if gaps.size == 0:
        return []
    d = gaps[0]
    return [
        f"sim_position: race {race} has {gaps.size} driver(s) with positions in some scenarios "
        f"and NaN in others (first: {driver_ids[d]}, NaN in {n_scenarios - n_present[d]} of {n_scenarios})"
    ]


def _sim_cell_line(race: str, bad: np.ndarray, x: np.ndarray, driver_ids: list[str], what: str) -> list[str]:
    if not bad.any():
        return []
    s, d = np.argwhere(bad)[0]
    return [
        f"sim_position: race {race} has {what} in {int(bad.sum())} cell(s) "
        f"(first: scenario {s}, {driver_ids[d]}: {x[s, d]:g})"
    ]


def _permutation_line(
    race: str, repeated: np.ndarray, x: np.ndarray, driver_ids: list[str], n_entered: int
) -> list[str]:
    if not repeated.any():
        return []
    s = int(np.argmax(repeated))
    values, counts = np.unique(x[s][~np.isnan(x[s])], return_counts=True)
    pos = values[counts > 1][0]
    holders = ", ".join(driver_ids[d] for d in np.nonzero(x[s] == pos)[0])
    return [
        f"sim_position: race {race} has {int(repeated.sum())} scenario(s) that are not a permutation "
        f"of 1..{n_entered} (first: scenario {s}, position {pos:g} held by {holders})"
    ]


def _entry_problems(ds: xr.Dataset, sim_entered: np.ndarray) -> list[str]:
    """Drivers simulated must be the drivers who finished; every race needs two."""
    finish_entered = ~np.isnan(_values(ds, "finish_position").astype(np.float64))
    race_ids, driver_ids = _labels(ds, "race"), _labels(ds, "driver")
    no_finish, no_sims = [], []
    for r in np.nonzero((sim_entered != finish_entered).any(axis=1))[0]:
        only_sims = np.nonzero(sim_entered[r] & ~finish_entered[r])[0]
        only_finish = np.nonzero(finish_entered[r] & ~sim_entered[r])[0]
        if only_sims.size:
            no_finish.append(
                f"entry mismatch: race {race_ids[r]}: driver(s) {_names(driver_ids, only_sims)} "
                "have simulations but no finish_position"
            )
        if only_finish.size:
            no_sims.append(
                f"entry mismatch: race {race_ids[r]}: driver(s) {_names(driver_ids, only_finish)} "
                "have a finish_position but no simulations"
            )
    n_entered = (sim_entered | finish_entered).sum(axis=1)
    few = [
        f"race {race_ids[r]} has fewer than 2 entered drivers ({n_entered[r]}): nothing to rank"
        for r in np.nonzero(n_entered < 2)[0]
    ]
    return (
        _capped(no_finish, what="races with simulated drivers missing a finish")
        + _capped(no_sims, what="races with finishers missing simulations")
        + _capped(few, what="races with fewer than 2 entered drivers")
    )


def _points_problems(ds: xr.Dataset, usable: set[str]) -> list[str]:
    """Points must be missing exactly where positions are."""
    problems = []
    for points, positions in (("sim_points", "sim_position"), ("points", "finish_position")):
        if points in usable and positions in usable:
            problems += _nan_pattern_lines(ds, points, positions)
    return problems


def _nan_pattern_lines(ds: xr.Dataset, points: str, positions: str) -> list[str]:
    a, b = _values(ds, points), _values(ds, positions)
    n_races = a.shape[0]
    cells_per_race = int(np.prod(a.shape[1:]))
    race_ids, driver_ids = _labels(ds, "race"), _labels(ds, "driver")
    lines = []
    for block in _race_blocks(n_races, cells_per_race):
        differ = np.isnan(a[block]) != np.isnan(b[block])
        for i in np.nonzero(differ.reshape(differ.shape[0], -1).any(axis=1))[0]:
            where = np.argwhere(differ[i])[0]
            first = (f"scenario {where[0]}, " if len(where) == 2 else "") + driver_ids[where[-1]]
            lines.append(
                f"{points}: race {race_ids[block.start + i]} is NaN where {positions} is not, or the reverse, "
                f"in {int(differ[i].sum())} cell(s) (first: {first})"
            )
    return _capped(lines, what=f"races whose {points} NaN pattern differs from {positions}")


# ---------------------------------------------------------- validation helpers


def _values(ds: xr.Dataset, name: str) -> np.ndarray:
    """The numpy values of a variable in its canonical dimension order (a view)."""
    return ds[name].transpose(*VARIABLE_DIMS[name]).values


def _labels(ds: xr.Dataset, dim: str) -> list[str]:
    """Ids along ``dim`` as strings, or ``#i`` where the dataset has no ids."""
    if dim in ds.coords:
        return [str(v) for v in ds[dim].values.tolist()]
    return [f"#{i}" for i in range(ds.sizes.get(dim, 0))]


def _race_blocks(n_races: int, cells_per_race: int) -> Iterator[slice]:
    step = max(1, _BLOCK_CELLS // max(1, cells_per_race))
    for start in range(0, n_races, step):
        yield slice(start, min(start + step, n_races))


def _first_cell_lines(
    ds: xr.Dataset, bad: np.ndarray, line: Callable[[str, str], str], values: np.ndarray, *, what: str
) -> list[str]:
    """One line per race with a bad [race, driver] cell: ``line(race, "driver: value")``."""
    race_ids, driver_ids = _labels(ds, "race"), _labels(ds, "driver")
    lines = []
    for r in np.nonzero(bad.any(axis=1))[0]:
        d = int(np.argmax(bad[r]))
        lines.append(line(race_ids[r], f"{driver_ids[d]}: {values[r, d]:g}"))
    return _capped(lines, what=what)


def _capped(lines: list[str], *, what: str) -> list[str]:
    if len(lines) <= MAX_LINES_PER_PROBLEM:
        return lines
    return lines[:MAX_LINES_PER_PROBLEM] + [f"… and {len(lines) - MAX_LINES_PER_PROBLEM} more {what}"]


def _race_list(ds: xr.Dataset, mask: np.ndarray, *, limit: int = 10) -> str:
    ids = [r for r, bad in zip(_labels(ds, "race"), mask.tolist()) if bad]
    return ", ".join(ids[:limit]) + _more(len(ids) - limit)


def _names(ids: list[str], indices: np.ndarray, *, limit: int = 10) -> str:
    names = [ids[i] for i in indices[:limit]]
    return ", ".join(names) + _more(len(indices) - limit)


def _more(n: int) -> str:
    return f" and {n} more" if n > 0 else ""


def _dims_text(dims: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


def _count_word(n: int) -> str:
    return {2: "two", 3: "three", 4: "four"}.get(n, str(n))


# --------------------------------------------------------------------- selection


def select_window(ds: xr.Dataset, *, as_of: date | None, window_days: int | None) -> xr.Dataset:
    """The races strictly before ``as_of``, and on or after ``as_of - window_days``.

    ``as_of=None`` keeps every race (``window_days`` then needs ``as_of``).
    """
    if as_of is None:
        if window_days is not None:
            raise ValueError("window_days needs as_of: the window ends at as_of")
        return ds
    end = _day(as_of)
    dates = ds["race_date"].values
    keep = dates < end
    if window_days is not None:
        keep &= dates >= end - np.timedelta64(timedelta(days=window_days))
    return ds.isel(race=np.nonzero(keep)[0])


def select_archetypes(ds: xr.Dataset, archetypes: Sequence[str]) -> xr.Dataset:
    """The races whose archetype is one of ``archetypes``."""
    keep = np.isin(np.asarray(ds["archetype"].values).astype(str), list(archetypes))
    return ds.isel(race=np.nonzero(keep)[0])


def _day(value: date) -> np.datetime64:
    if isinstance(value, datetime):
        return np.datetime64(value.replace(tzinfo=None), "ns")
    return np.datetime64(value, "D")


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
    finish = _values(ds, "finish_position").astype(np.float64)[keep]
    entered = ~np.isnan(finish)
    p = _event_probabilities(_values(ds, "sim_position"), keep, thresholds)
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
    for block in _race_blocks(races.size, n_scenarios * n_drivers):
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

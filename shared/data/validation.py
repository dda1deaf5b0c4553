"""Validation of the calibration dataset: every problem found, each named, at once.

The contract (see :mod:`shared.data.dataset` for the layout): the variables of
:data:`VARIABLE_DIMS` with those dimensions, the race coordinates
:data:`RACE_COORDINATES`, known archetypes, unique ids, and in every race and
scenario the entered drivers holding positions 1..n exactly once, with NaN
(never 0) for a driver not entered. :func:`validate` reports each kind of
problem in its own line (at most :data:`MAX_LINES_PER_PROBLEM` examples),
so a producer can fix them all in one go.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import xarray as xr

from shared.contract.domain import ARCHETYPES, EARLIEST_DATE, LATEST_DATE, archetypes_of, event_threshold
from shared.contract.errors import InvalidDataset
from shared.contract.settings import DataLimits, get_settings

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

#: At most this many lines are reported per kind of problem.
MAX_LINES_PER_PROBLEM = 5
#: Value checks walk the simulations in blocks of races of about this many cells.
_BLOCK_CELLS = 1 << 22




def validate(
    ds: xr.Dataset,
    *,
    archetype: str | None = None,
    events: Sequence[str] = (),
    source: str | None = None,
    limits: DataLimits | None = None,
    now: datetime | None = None,
) -> xr.Dataset:
    """Check ``ds`` against the calibration-dataset contract; return it unchanged.

    Every problem found is collected, one human-readable line each naming the
    variable, race and driver concerned, and raised together as one
    :class:`~shared.contract.errors.InvalidDataset` (with ``source``). ``archetype``
    (one of :data:`~shared.contract.domain.ARCHETYPES`, ``"all"`` or ``None``) adds
    the requirement that the dataset holds races of that archetype, and
    ``events`` that no event's threshold is above the dataset's field (its
    number of drivers). No race may be dated after ``now`` (default: the time
    of validation, UTC) plus ``limits.future_days`` (default: the settings'
    ``limits``): a forecaster's data ends at races that have happened.
    Value checks are vectorised and walk the simulations in blocks of races,
    so memory stays bounded on large datasets.

    ``intrinsic`` is set only for problems of the file's own bytes. The job's
    choices (archetype, events) and a future date are not: a future date
    depends on this worker's clock and ``limits.future_days``, a setting.
    """
    problems, usable = _variable_problems(ds)
    problems += _coordinate_problems(ds)
    # Problems of the job's choosing or this worker's clock and settings, not the file's own: it keeps the file.
    job_problems = _event_problems(ds, events)
    if archetype is not None and archetype != "all":
        job_problems += _archetype_problems(ds, archetypes_of(archetype)[0])
    future_days = (limits or get_settings().limits).future_days
    job_problems += _future_date_problems(ds, now=now or datetime.now(UTC), future_days=future_days)
    if "finish_position" in usable:
        problems += _finish_problems(ds)
    sim_entered = None
    if "sim_position" in usable:
        sim_problems, sim_entered = _simulation_problems(ds)
        problems += sim_problems
    if "finish_position" in usable and sim_entered is not None:
        problems += _entry_problems(ds, sim_entered)
    problems += _points_problems(ds, usable)
    if problems or job_problems:
        log.info("dataset %s rejected: %d problem(s)", source or "<memory>", len(problems) + len(job_problems))
        raise InvalidDataset(job_problems + problems, source=source, intrinsic=bool(problems))
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
    """Every race dated, in [EARLIEST_DATE, LATEST_DATE) (constants: absurd for every worker)."""
    dates = ds["race_date"].values
    if not np.issubdtype(dates.dtype, np.datetime64):
        return [f"race_date: expected datetime64 dates, got values of dtype {dates.dtype}"]
    missing = np.isnat(dates)
    problems = []
    if missing.any():
        problems.append(f"race_date: missing (NaT) for race(s) {_race_list(ds, missing)}")
    outside = ~missing & ((dates < np.datetime64(EARLIEST_DATE, "D")) | (dates >= np.datetime64(LATEST_DATE, "D")))
    if outside.any():
        problems.append(
            f"race_date: race(s) {_race_list(ds, outside, limit=5)} dated outside the dates calq accepts "
            f"({EARLIEST_DATE} up to {LATEST_DATE})"
        )
    return problems


def _future_date_problems(ds: xr.Dataset, *, now: datetime, future_days: float) -> list[str]:
    """Races dated after ``now`` + ``future_days`` (those beyond LATEST_DATE are the file's own fault)."""
    if "race_date" not in ds.variables or ds["race_date"].dims != ("race",):
        return []
    dates = ds["race_date"].values
    if not np.issubdtype(dates.dtype, np.datetime64):
        return []
    cutoff = np.datetime64(now.astimezone(UTC).replace(tzinfo=None), "s") + np.timedelta64(
        round(future_days * 86_400), "s"
    )
    future = ~np.isnat(dates) & (dates > cutoff) & (dates < np.datetime64(LATEST_DATE, "D"))
    if not future.any():
        return []
    return [
        f"race_date: race(s) {_race_list(ds, future, limit=5)} dated after {str(cutoff)[:16].replace('T', ' ')} UTC, "
        f"the time of validation plus {future_days:g} day(s) (limits.future_days): a forecaster's data "
        "holds races that have happened"
    ]


def _event_problems(ds: xr.Dataset, events: Sequence[str]) -> list[str]:
    """No event's threshold above the dataset's field (its driver dimension)."""
    field = ds.sizes.get("driver", 0)
    above = [e for e in events if event_threshold(e) > field]
    if not above or field == 0:
        return []
    return [
        f"events: {', '.join(above)} above the dataset's field of {field} drivers "
        f"(an event's threshold is at most the number of drivers)"
    ]


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
    finish = variable_values(ds, "finish_position").astype(np.float64)
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
    sims = variable_values(ds, "sim_position")
    n_races, n_scenarios, n_drivers = sims.shape
    entered = np.zeros((n_races, n_drivers), dtype=bool)
    found: dict[str, list[str]] = {"partial": [], "nonint": [], "outside": [], "perm": []}
    race_ids, driver_ids = _labels(ds, "race"), _labels(ds, "driver")
    for block in race_blocks(n_races, n_scenarios * n_drivers):
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
    finish_entered = ~np.isnan(variable_values(ds, "finish_position").astype(np.float64))
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
        if points in usable:
            problems += _infinite_lines(ds, points)
        if points in usable and positions in usable:
            problems += _nan_pattern_lines(ds, points, positions)
    return problems


def _infinite_lines(ds: xr.Dataset, name: str) -> list[str]:
    """One line per race where ``name`` holds +inf or -inf (points are finite or NaN)."""
    values = variable_values(ds, name)
    n_races = values.shape[0]
    cells_per_race = int(np.prod(values.shape[1:]))
    race_ids = _labels(ds, "race")
    lines = []
    for block in race_blocks(n_races, cells_per_race):
        bad = np.isinf(values[block]).reshape(block.stop - block.start, -1)
        for i in np.nonzero(bad.any(axis=1))[0]:
            lines.append(
                f"{name}: race {race_ids[block.start + i]} has {int(bad[i].sum())} infinite value(s) "
                "(points must be finite, or NaN for a driver not entered)"
            )
    return _capped(lines, what=f"races with infinite {name}")


def _nan_pattern_lines(ds: xr.Dataset, points: str, positions: str) -> list[str]:
    a, b = variable_values(ds, points), variable_values(ds, positions)
    n_races = a.shape[0]
    cells_per_race = int(np.prod(a.shape[1:]))
    race_ids, driver_ids = _labels(ds, "race"), _labels(ds, "driver")
    lines = []
    for block in race_blocks(n_races, cells_per_race):
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


def variable_values(ds: xr.Dataset, name: str) -> np.ndarray:
    """The numpy values of a variable in its canonical dimension order (a view)."""
    return ds[name].transpose(*VARIABLE_DIMS[name]).values


def _labels(ds: xr.Dataset, dim: str) -> list[str]:
    """Ids along ``dim`` as strings, or ``#i`` where the dataset has no ids."""
    if dim in ds.coords:
        return [str(v) for v in ds[dim].values.tolist()]
    return [f"#{i}" for i in range(ds.sizes.get(dim, 0))]


def race_blocks(n_races: int, cells_per_race: int) -> Iterator[slice]:
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
    return [*lines[:MAX_LINES_PER_PROBLEM], f"… and {len(lines) - MAX_LINES_PER_PROBLEM} more {what}"]


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

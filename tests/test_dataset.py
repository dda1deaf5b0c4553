"""The calibration-dataset contract: validation, I/O, selection and event rows."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from datetime import date

import numpy as np
import pytest
import xarray as xr

from shared.contract.domain import ARCHETYPES
from shared.contract.errors import DatasetNotFound, InvalidDataset
from shared.data.dataset import (
    P_EPS,
    REQUIRED_VARIABLES,
    event_rows,
    forecast_probability,
    open_dataset,
    save_dataset,
    select_archetypes,
    select_races,
    select_window,
    validate,
)
from shared.data.synth import synthesize
from shared.storage.store import sha256_file


@pytest.fixture(scope="module")
def small() -> xr.Dataset:
    """One season, few scenarios, a field of 10 from a pool of 12 (so some are absent)."""
    return synthesize(seasons=1, scenarios=40, seed=3, drivers_per_race=10, pool_size=12)


def problems_of(ds: xr.Dataset, **kwargs) -> list[str]:
    with pytest.raises(InvalidDataset) as caught:
        validate(ds, **kwargs)
    return caught.value.problems


def entered_in(ds: xr.Dataset, race: int) -> np.ndarray:
    return np.flatnonzero(~np.isnan(ds["finish_position"].values[race]))


def driver_at(ds: xr.Dataset, race: int, position: int) -> int:
    return int(np.flatnonzero(ds["finish_position"].values[race] == position)[0])


# ------------------------------------------------------------ broken datasets


def _set(ds: xr.Dataset, name: str, index: tuple, value: float) -> xr.Dataset:
    out = ds.copy(deep=True)
    out[name].values[index] = value
    return out


def _with_coord(ds: xr.Dataset, name: str, values) -> xr.Dataset:
    return ds.assign_coords({name: (ds[name].dims, np.asarray(values))})


def _replace(values: np.ndarray, index: int, value) -> np.ndarray:
    out = values.copy()
    out[index] = value
    return out


def _shared_finish(ds: xr.Dataset) -> xr.Dataset:
    return _set(ds, "finish_position", (0, driver_at(ds, 0, 2)), 1.0)


def _sim_duplicate(ds: xr.Dataset) -> xr.Dataset:
    first, second = entered_in(ds, 0)[:2]
    return _set(ds, "sim_position", (0, 0, first), ds["sim_position"].values[0, 0, second])


def _sims_without_finish(ds: xr.Dataset) -> xr.Dataset:
    last = driver_at(ds, 0, len(entered_in(ds, 0)))
    out = _set(ds, "finish_position", (0, last), np.nan)
    out["points"].values[0, last] = np.nan
    return out


def _finish_without_sims(ds: xr.Dataset) -> xr.Dataset:
    absent = int(np.flatnonzero(np.isnan(ds["finish_position"].values[0]))[0])
    return _set(ds, "finish_position", (0, absent), 3.0)


def _lone_driver(ds: xr.Dataset) -> xr.Dataset:
    out = ds.copy(deep=True)
    winner = driver_at(ds, 0, 1)
    others = np.setdiff1d(np.arange(ds.sizes["driver"]), [winner])
    for name in ("finish_position", "points"):
        out[name].values[0, others] = np.nan
    for name in ("sim_position", "sim_points"):
        out[name].values[0][:, others] = np.nan
    out["sim_position"].values[0][:, winner] = 1.0
    return out


def _sim_gap(ds: xr.Dataset) -> xr.Dataset:
    driver = entered_in(ds, 0)[0]
    out = _set(ds, "sim_position", (0, 3, driver), np.nan)
    out["sim_points"].values[0, 3, driver] = np.nan
    return out


BROKEN: dict[str, tuple[Callable[[xr.Dataset], xr.Dataset], str]] = {
    "missing variable": (lambda ds: ds.drop_vars("finish_position"), "missing required variable finish_position"),
    "wrong dimensions": (
        lambda ds: ds.assign(finish_position=ds["finish_position"].rename(driver="entrant")),
        "finish_position: wrong dimensions (race, entrant)",
    ),
    "not numeric": (
        lambda ds: ds.assign(points=ds["points"].astype(str)),
        "points: expected numbers",
    ),
    "missing race ids": (lambda ds: ds.drop_vars("race"), "missing coordinate race"),
    "missing track": (lambda ds: ds.drop_vars("track"), "missing coordinate track along race"),
    "missing archetype": (lambda ds: ds.drop_vars("archetype"), "missing coordinate archetype along race"),
    "unknown archetype": (
        lambda ds: _with_coord(ds, "archetype", _replace(ds["archetype"].values.astype(object), 0, "dirt_oval")),
        "archetype: unknown value(s) 'dirt_oval'",
    ),
    "blank track": (
        lambda ds: _with_coord(ds, "track", _replace(ds["track"].values, 1, "")),
        "track: missing track name",
    ),
    "race_date not dates": (
        lambda ds: _with_coord(ds, "race_date", ds["race_date"].dt.strftime("%Y-%m-%d").values),
        "race_date: expected datetime64 dates",
    ),
    "race_date NaT": (
        lambda ds: _with_coord(ds, "race_date", _replace(ds["race_date"].values, 2, np.datetime64("NaT"))),
        "race_date: missing (NaT)",
    ),
    "duplicated race ids": (
        lambda ds: ds.assign_coords(race=_replace(ds["race"].values, 1, ds["race"].values[0])),
        "race: duplicated race ids",
    ),
    "duplicated driver ids": (
        lambda ds: ds.assign_coords(driver=_replace(ds["driver"].values, 1, ds["driver"].values[0])),
        "driver: duplicated driver ids",
    ),
    "finish out of range": (
        lambda ds: _set(ds, "finish_position", (0, driver_at(ds, 0, 1)), 99.0),
        "finish_position: race 2024-01-daytona has positions outside 1..n_entered",
    ),
    "finish not integer": (
        lambda ds: _set(ds, "finish_position", (0, driver_at(ds, 0, 1)), 1.5),
        "finish_position: race 2024-01-daytona has non-integer positions",
    ),
    "shared finishing position": (_shared_finish, "has two drivers in position 1"),
    "sim out of range": (
        lambda ds: _set(ds, "sim_position", (0, 0, entered_in(ds, 0)[0]), 0.0),
        "sim_position: race 2024-01-daytona has positions outside 1..n_entered",
    ),
    "sim not integer": (
        lambda ds: _set(ds, "sim_position", (0, 0, entered_in(ds, 0)[0]), 2.25),
        "sim_position: race 2024-01-daytona has non-integer positions",
    ),
    "sim not a permutation": (_sim_duplicate, "scenario(s) that are not a permutation of 1..10"),
    "sim gaps": (_sim_gap, "positions in some scenarios and NaN in others"),
    "sims without finish": (_sims_without_finish, "have simulations but no finish_position"),
    "finish without sims": (_finish_without_sims, "have a finish_position but no simulations"),
    "no races": (lambda ds: ds.isel(race=[]), "the dataset has no races"),
    "no scenarios": (lambda ds: ds.isel(scenario=[]), "sim_position: no scenarios"),
    "lone driver": (_lone_driver, "fewer than 2 entered drivers"),
    "sim_points NaN pattern": (
        lambda ds: _set(ds, "sim_points", (0, 0, entered_in(ds, 0)[0]), np.nan),
        "sim_points: race 2024-01-daytona is NaN where sim_position is not",
    ),
    "points NaN pattern": (
        lambda ds: _set(ds, "points", (1, entered_in(ds, 1)[0]), np.nan),
        "points: race 2024-02-atlanta is NaN where finish_position is not",
    ),
    "points without sim_points": (lambda ds: ds.drop_vars("sim_points"), "points is present without sim_points"),
    "sim_points wrong dimensions": (
        lambda ds: ds.assign(sim_points=ds["sim_points"].isel(scenario=0, drop=True)),
        "sim_points: wrong dimensions (race, driver)",
    ),
}


def test_a_valid_dataset_passes(small):
    assert validate(small) is small
    assert validate(small, archetype="all") is small
    for archetype in ARCHETYPES:
        assert validate(small, archetype=archetype) is small


@pytest.mark.parametrize("kind", list(BROKEN))
def test_each_broken_dataset_is_rejected_with_its_own_message(small, kind):
    breaks, expected = BROKEN[kind]
    problems = problems_of(breaks(small))
    assert any(expected in p for p in problems), problems


def test_each_kind_of_problem_has_a_distinct_message():
    assert len(BROKEN) >= 12
    assert len({expected for _, expected in BROKEN.values()}) == len(BROKEN)


def test_a_shared_finishing_position_names_the_race_the_position_and_the_drivers(small):
    first, second = driver_at(small, 0, 1), driver_at(small, 0, 2)
    names = ", ".join(small["driver"].values[sorted([first, second])])
    assert f"finish_position: race 2024-01-daytona has two drivers in position 1 ({names})" in problems_of(
        _shared_finish(small)
    )


def test_an_archetype_without_races_is_a_problem(small):
    no_road = select_archetypes(small, [a for a in ARCHETYPES if a != "road_course"])
    validate(no_road, archetype="intermediate")
    (problem,) = problems_of(no_road, archetype="road_course")
    assert "no races of archetype road_course" in problem


def test_every_problem_is_reported_together(small):
    broken = _shared_finish(small)
    broken = _with_coord(broken, "archetype", _replace(broken["archetype"].values.astype(object), 3, "oval"))
    broken = _with_coord(broken, "race_date", _replace(broken["race_date"].values, 4, np.datetime64("NaT")))
    broken = broken.drop_vars("sim_points")
    problems = problems_of(broken)
    for expected in ("two drivers in position 1", "unknown value(s) 'oval'", "missing (NaT)", "without sim_points"):
        assert any(expected in p for p in problems), (expected, problems)


def test_problems_of_one_kind_are_capped(small):
    broken = small.copy(deep=True)
    broken["finish_position"].values[:, :] += 0.5
    problems = problems_of(broken)
    assert sum("non-integer positions" in p for p in problems) == 5
    assert any("more races with non-integer finish_position" in p for p in problems)


def test_the_error_carries_its_source(small, tmp_path):
    path = save_dataset(small.drop_vars("track"), tmp_path / "broken.nc")
    with pytest.raises(InvalidDataset) as caught:
        open_dataset(path)
    assert caught.value.source == str(path)
    assert str(path) in str(caught.value)


# ----------------------------------------------------------------------- I/O


def test_save_then_open_round_trips_exactly(small, tmp_path):
    path = save_dataset(small, tmp_path / "sub" / "data.nc")
    loaded = open_dataset(path)
    xr.testing.assert_identical(loaded, small)
    for name in small.variables:
        assert loaded[name].dtype == small[name].dtype, name
    assert loaded.attrs == small.attrs
    assert [p.name for p in path.parent.iterdir()] == ["data.nc"]  # no temporary left behind


def test_open_reads_a_binary_file_object(small, tmp_path):
    path = save_dataset(small, tmp_path / "data.nc")
    with open(path, "rb") as file:
        loaded = open_dataset(io.BytesIO(file.read()), archetype="short_track")
    xr.testing.assert_identical(loaded, small)


def test_a_selection_of_a_loaded_dataset_saves_again(small, tmp_path):
    loaded = open_dataset(save_dataset(small, tmp_path / "data.nc"))
    window = select_window(loaded, as_of=date(2024, 6, 1), window_days=60)
    again = open_dataset(save_dataset(window, tmp_path / "window.nc"))
    xr.testing.assert_identical(again, window)


def test_save_encodes_attributes_netcdf_cannot_hold(small, tmp_path):
    ds = small.assign_attrs(options={"a": 1}, flag=True, nothing=None)
    loaded = open_dataset(save_dataset(ds, tmp_path / "data.nc"))
    assert loaded.attrs["options"] == '{"a": 1}'
    assert loaded.attrs["flag"] == "true"  # JSON-encoded: netCDF has no bool attributes
    assert loaded.attrs["nothing"] == "null"
    assert ds.attrs["flag"] is True  # the caller's dataset is untouched


def test_save_replaces_an_existing_file(small, tmp_path):
    path = tmp_path / "data.nc"
    path.write_bytes(b"old")
    save_dataset(small, path)
    xr.testing.assert_identical(open_dataset(path), small)


@pytest.mark.parametrize("content", [b"this is not netcdf", b""])
def test_a_file_that_is_not_netcdf_is_an_invalid_dataset(tmp_path, content):
    path = tmp_path / "junk.nc"
    path.write_bytes(content)
    for source in (path, str(path), io.BytesIO(content)):
        with pytest.raises(InvalidDataset) as caught:
            open_dataset(source)
        (problem,) = caught.value.problems
        assert ("the file is not NetCDF" if content else "the file is empty") in problem
        assert caught.value.intrinsic


def test_a_missing_file_is_not_found(tmp_path):
    with pytest.raises(DatasetNotFound):
        open_dataset(tmp_path / "nothing.nc")


def test_sha256_file_hashes_the_bytes(tmp_path):
    path = tmp_path / "blob"
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # more than one read buffer
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_required_variables():
    assert set(REQUIRED_VARIABLES) == {"sim_position", "finish_position"}


# ------------------------------------------------------------- probabilities


def test_forecast_probability_follows_the_smoothed_formula():
    nan = np.nan
    positions = np.array(
        [
            [[1, 2, nan, 3], [2, 1, nan, 3], [1, 3, nan, 2], [3, 1, nan, 2]],
            [[1, 2, 3, nan], [1, 3, 2, nan], [1, 2, 3, nan], [1, 3, 2, nan]],
        ]
    )  # [race, scenario, driver]
    p = forecast_probability(positions, 1)
    m = 4
    expected = np.array(
        [
            [(2 + 0.5) / (m + 1), (2 + 0.5) / (m + 1), nan, 0.5 / (m + 1)],
            [(4 + 0.5) / (m + 1), 0.5 / (m + 1), 0.5 / (m + 1), nan],
        ]
    )
    np.testing.assert_allclose(p, expected)
    np.testing.assert_allclose(forecast_probability(positions[0], 2)[[0, 1, 3]], [3.5 / 5, 3.5 / 5, 2.5 / 5])
    assert p.dtype == np.float64


def test_forecast_probability_is_clipped_away_from_0_and_1():
    positions = np.tile(np.array([[1.0, 2.0]]), (50_000, 1))
    np.testing.assert_array_equal(forecast_probability(positions, 1), [1 - P_EPS, P_EPS])


# ---------------------------------------------------------------- event rows


def test_event_rows_has_one_row_per_event_and_entered_race_driver(small):
    events = ["top_1", "top_5"]
    rows = event_rows(small, events=events, archetypes=ARCHETYPES)
    finish = small["finish_position"].values
    assert rows.n_rows == len(events) * int((~np.isnan(finish)).sum())
    assert not np.isnan(finish[rows.race, rows.driver]).any()  # absent drivers have no rows
    assert rows.events == tuple(events) and rows.archetypes == ARCHETYPES
    assert rows.races == tuple(small["race"].values) and rows.drivers == tuple(small["driver"].values)
    thresholds = np.array([1, 5])[rows.event]
    np.testing.assert_array_equal(rows.y, (finish[rows.race, rows.driver] <= thresholds).astype(np.int8))
    assert rows.y.dtype == np.int8 and rows.p.dtype == np.float64
    order = np.lexsort((rows.driver, rows.race, rows.event))
    np.testing.assert_array_equal(order, np.arange(rows.n_rows))


def test_event_rows_probabilities_match_the_simulations(small):
    rows = event_rows(small, events=["top_5"], archetypes=ARCHETYPES)
    expected = forecast_probability(small["sim_position"].values, 5)[rows.race, rows.driver]
    np.testing.assert_array_equal(rows.p, expected)


def test_event_rows_indexes_tracks_and_archetypes(small):
    rows = event_rows(small, events=["top_3"], archetypes=ARCHETYPES)
    race_archetype = small["archetype"].values[rows.race]
    race_track = small["track"].values[rows.race]
    assert (np.array(rows.archetypes)[rows.archetype] == race_archetype).all()
    assert (np.array(rows.tracks)[rows.track] == race_track).all()
    assert (rows.track_archetype[rows.track] == rows.archetype).all()
    keys = list(zip(rows.track_archetype.tolist(), rows.tracks))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert set(rows.tracks) == set(small["track"].values)


def test_event_rows_keeps_only_the_archetypes_asked_for_in_their_order(small):
    asked = ("short_track", "superspeedway")
    rows = event_rows(small, events=["top_1"], archetypes=asked)
    assert rows.archetypes == asked
    kept = small["race"].values[np.isin(small["archetype"].values, asked)]
    assert rows.races == tuple(kept)
    assert set(np.array(rows.archetypes)[rows.archetype]) == set(asked)
    assert [asked[a] for a in rows.track_archetype] == sorted(
        [asked[a] for a in rows.track_archetype], key=asked.index
    )
    by_race = dict(zip(small["race"].values, small["archetype"].values))
    assert all(by_race[rows.races[r]] == asked[a] for r, a in zip(rows.race, rows.archetype))


def test_event_rows_rejects_an_unknown_archetype(small):
    with pytest.raises(ValueError, match="unknown archetype"):
        event_rows(small, events=["top_1"], archetypes=["oval"])


# ----------------------------------------------------------------- selection


def test_select_window_is_strictly_before_as_of(small):
    dates = small["race_date"].values
    as_of = dates[10].astype("datetime64[D]").item()
    before = select_window(small, as_of=as_of, window_days=None)
    assert before.sizes["race"] == 10
    assert (before["race_date"].values < np.datetime64(as_of)).all()


def test_select_window_keeps_the_last_window_days(small):
    dates = small["race_date"].values
    as_of = dates[10].astype("datetime64[D]").item()
    window = select_window(small, as_of=as_of, window_days=14)
    # weekly races: the two before as_of (and one falls exactly 14 days before)
    np.testing.assert_array_equal(window["race_date"].values, dates[8:10])
    assert select_window(small, as_of=as_of, window_days=13).sizes["race"] == 1


def test_select_window_without_as_of_keeps_everything(small):
    assert select_window(small, as_of=None, window_days=None) is small
    with pytest.raises(ValueError, match="needs as_of"):
        select_window(small, as_of=None, window_days=30)
    assert select_window(small, as_of=date(2000, 1, 1), window_days=None).sizes["race"] == 0


def test_select_archetypes(small):
    only = select_archetypes(small, ["road_course"])
    assert set(only["archetype"].values) == {"road_course"}
    assert only.sizes["race"] == int((small["archetype"].values == "road_course").sum())


@pytest.mark.parametrize("window_days", [None, 14, 60])
@pytest.mark.parametrize("archetypes", [["road_course"], ["intermediate", "superspeedway"], list(ARCHETYPES)])
def test_select_races_is_the_window_then_the_archetypes(small, window_days, archetypes):
    dates = small["race_date"].values
    for as_of in (None, dates[0], dates[10], dates[-1] + np.timedelta64(1, "D")):
        day = None if as_of is None else as_of.astype("datetime64[D]").item()
        if day is None and window_days is not None:
            with pytest.raises(ValueError, match="needs as_of"):
                select_races(small, as_of=day, window_days=window_days, archetypes=archetypes)
            continue
        two_steps = select_archetypes(select_window(small, as_of=day, window_days=window_days), archetypes)
        xr.testing.assert_identical(select_races(small, as_of=day, window_days=window_days, archetypes=archetypes),
                                    two_steps)


@pytest.mark.slow
def test_validation_of_a_full_size_dataset_is_fast():
    """180 races × 10,000 scenarios × 50 drivers (40 entered): well under a couple of seconds."""
    rng = np.random.default_rng(0)
    n_races, n_scenarios, n_drivers, field = 180, 10_000, 50, 40
    sims = np.full((n_races, n_scenarios, n_drivers), np.nan, dtype=np.float32)
    finish = np.full((n_races, n_drivers), np.nan)
    for r in range(n_races):
        entered = np.sort(rng.choice(n_drivers, field, replace=False))
        sims[r][:, entered] = rng.random((n_scenarios, field), dtype=np.float32).argsort(axis=1).argsort(axis=1) + 1
        finish[r, entered] = rng.permutation(field) + 1
    ds = xr.Dataset(
        {"sim_position": (("race", "scenario", "driver"), sims), "finish_position": (("race", "driver"), finish)},
        coords={
            "race": [f"r{r:03d}" for r in range(n_races)],
            "driver": [f"d{d:02d}" for d in range(n_drivers)],
            "scenario": np.arange(n_scenarios),
            "race_date": ("race", np.datetime64("2020-02-16") + 7 * np.arange(n_races).astype("timedelta64[D]")),
            "track": ("race", ["Kansas"] * n_races),
            "archetype": ("race", ["intermediate"] * n_races),
        },
    )
    started = time.perf_counter()
    validate(ds)
    assert time.perf_counter() - started < 3.0


@pytest.mark.parametrize("window_days", [None, 14, 60])
def test_a_backfills_race_calendar_sees_the_races_a_job_selects(small, window_days):
    """producer.backfill.RaceCalendar.seen answers from plain arrays with select_races' own rule (in_window)."""
    from producer.backfill import RaceCalendar

    calendar = RaceCalendar.of(small)
    dates = small["race_date"].values
    for as_of in (dates[0], dates[10], dates[10] + np.timedelta64(1, "D"), dates[-1] + np.timedelta64(1, "D")):
        day = as_of.astype("datetime64[D]").item()
        for archetype in ARCHETYPES:
            job_races = select_races(small, as_of=day, window_days=window_days, archetypes=[archetype])["race"].values
            seen = calendar.race_ids[calendar.seen(archetype, day, window_days)]
            assert list(seen) == list(job_races.astype(str)), (archetype, day)

"""Hostile names stored as char arrays (issue 16).

A track name stored as a 2-D char array (NetCDF ``S1`` with a string-length
dimension, which xarray decodes to strings) skipped the name-length check:
a 20,001-character track passed the 200-character limit and made a 1 MB
summary. Each case goes through the real worker handler (the harness of
``tests/test_hostile.py``) and asserts the state, the reason and what
happened to the stored dataset.
"""

from __future__ import annotations

from pathlib import Path

import netCDF4
import xarray as xr

from shared.data.dataset import open_dataset
from tests.test_hostile import base, env, rejected, submit_file  # noqa: F401  (fixtures and the worker harness)


def as_chars(ds: xr.Dataset, path: Path, *names: str) -> Path:
    """Write ``ds`` with the variables ``names`` stored as char arrays, and check that they are."""
    ds.to_netcdf(path, engine="netcdf4", encoding={name: {"dtype": "S1"} for name in names})
    with netCDF4.Dataset(path) as nc:
        for name in names:
            assert nc[name].dtype == "S1" and len(nc[name].dimensions) == 2
    return path


def test_a_20001_character_track_in_a_char_array_is_refused(env, base, tmp_path):  # noqa: F811
    tracks = base["track"].values.astype(object)
    tracks[3] = "T" * 20_001
    ds = base.assign_coords(track=("race", tracks.astype(str)))
    outcome = submit_file(env, as_chars(ds, tmp_path / "chars.nc", "track"))
    rejected(outcome, "track: 1 value(s) longer than 200 characters", "race #3", "20,001 characters")
    assert "T" * 201 not in outcome.reason
    assert outcome.stored  # limits.max_id_chars is this worker's setting: the file is kept


def test_a_long_race_id_in_a_char_array_is_refused(env, base, tmp_path):  # noqa: F811
    races = base["race"].values.astype(object)
    races[0] = "r" * 500
    ds = base.assign_coords(race=races.astype(str))
    outcome = submit_file(env, as_chars(ds, tmp_path / "race-chars.nc", "race"))
    rejected(outcome, "race: 1 value(s) longer than 200 characters", "race #0", "500 characters")


def test_char_array_names_within_the_limit_still_read(base, tmp_path):  # noqa: F811
    path = as_chars(base, tmp_path / "ok.nc", "track", "race", "archetype")
    ds = open_dataset(path)
    assert ds["track"].values.tolist() == base["track"].values.tolist()
    assert ds["race"].values.tolist() == base["race"].values.tolist()

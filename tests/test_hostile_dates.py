"""Hostile dates and events: data a forecaster could not have made, windows that overflow (issue 16).

A dataset dated in the future took ``latest`` for good (a later honest fit
never moves the pointer); ``as_of`` 1600 fitted every race and 2300 none (a
silent nanosecond overflow); ``window_days`` 10^12 ended ``failed`` with an
OverflowError; ``"top_10\\n"`` passed the event pattern and ``top_999`` ran.
Dataset cases go through the real worker handler (the harness of
``tests/test_hostile.py``); message cases through :func:`process` with the
raw message, as a worker receives it. Each asserts the final state, the
reason, and what happened to the stored dataset and the ``latest`` pointers.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest
import xarray as xr

from shared.contract.domain import EARLIEST_DATE, LATEST_DATE, MAX_FIELD, MAX_WINDOW_DAYS, event_threshold
from shared.contract.errors import InvalidDataset
from shared.contract.settings import DataLimits
from shared.data.dataset import select_window, validate
from shared.jobs.handle import Delivery, process
from shared.jobs.services import Services
from tests.test_hostile import base, env, job_for, rejected, save, submit_file  # noqa: F401  (fixtures, harness)

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def dated(ds: xr.Dataset, *days: str, first: int = 0) -> xr.Dataset:
    """``ds`` with races ``first``, ``first + 1``, … dated ``days``."""
    dates = ds["race_date"].values.copy()
    for i, day in enumerate(days):
        dates[first + i] = np.datetime64(day, "ns")
    return ds.assign_coords(race_date=("race", dates))


def no_latest(env) -> None:  # noqa: F811
    _, _, registry = env
    assert registry.latest_all() == {}


# -- race dates --------------------------------------------------------------------------------------


def test_a_race_dated_in_the_future_is_rejected_naming_it_and_the_dataset_is_kept(env, base, tmp_path):  # noqa: F811
    ds = dated(base, "2150-03-01", "2150-03-08")
    outcome = submit_file(env, save(ds, tmp_path / "future.nc"))
    races = [str(r) for r in ds["race"].values[:2]]
    rejected(outcome, "race_date: race(s) " + ", ".join(races), "limits.future_days",
             "a forecaster's data holds races that have happened")
    assert outcome.reason.count("  - ") == 1
    assert outcome.stored  # the allowance is a setting and the clock is this worker's: not the file's own fault
    no_latest(env)


def test_a_race_dated_past_the_latest_date_is_the_files_own_fault(env, base, tmp_path):  # noqa: F811
    ds = dated(base, "2200-06-01", first=3)
    outcome = submit_file(env, save(ds, tmp_path / "2200.nc"))
    rejected(outcome, f"race(s) {ds['race'].values[3]} dated outside the dates calq accepts",
             f"{EARLIEST_DATE} up to {LATEST_DATE}")
    assert "future_days" not in outcome.reason  # reported once, as the absurd date it is
    assert not outcome.stored
    no_latest(env)


def test_a_race_dated_before_1900_is_rejected(env, base, tmp_path):  # noqa: F811
    ds = dated(base, "1850-05-01", first=5)
    outcome = submit_file(env, save(ds, tmp_path / "1850.nc"))
    rejected(outcome, f"race(s) {ds['race'].values[5]} dated outside the dates calq accepts")
    assert not outcome.stored


def test_an_undated_race_is_rejected(env, base, tmp_path):  # noqa: F811
    dates = base["race_date"].values.copy()
    dates[2] = np.datetime64("NaT")
    outcome = submit_file(env, save(base.assign_coords(race_date=("race", dates)), tmp_path / "nat.nc"))
    rejected(outcome, f"race_date: missing (NaT) for race(s) {base['race'].values[2]}")
    assert not outcome.stored


def test_the_future_allowance_is_the_setting_and_counts_from_the_time_of_validation(base):  # noqa: F811
    tomorrow = (NOW + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    ds = dated(base, tomorrow)
    assert validate(ds, now=NOW, limits=DataLimits(future_days=2)) is ds
    with pytest.raises(InvalidDataset) as caught:
        validate(ds, now=NOW, limits=DataLimits(future_days=0.5))
    assert caught.value.problems == [
        f"race_date: race(s) {ds['race'].values[0]} dated after 2026-06-02 00:00 UTC, the time of validation plus "
        "0.5 day(s) (limits.future_days): a forecaster's data holds races that have happened"
    ]
    assert not caught.value.intrinsic


def test_many_future_races_are_named_first_few(base):  # noqa: F811
    ds = dated(base, *[f"2100-01-{d:02d}" for d in range(1, 9)])
    with pytest.raises(InvalidDataset) as caught:
        validate(ds, now=NOW)
    assert caught.value.problems[0].startswith("race_date: race(s) " + ", ".join(map(str, ds["race"].values[:5])))
    assert " and 3 more dated after" in caught.value.problems[0]


# -- as_of and window_days --------------------------------------------------------------------------


def _message(**over) -> dict:
    job = job_for("file:///store/datasets/x.nc", "0" * 64)
    return {**job.to_message(), **over}


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"as_of": "1600-01-01"}, f"as_of: Value error, as_of must lie between {EARLIEST_DATE} and {LATEST_DATE}"),
        ({"as_of": "2300-01-01"}, "as_of must lie between"),
        ({"as_of": "9999-12-31"}, "as_of must lie between"),
        ({"as_of": "2024-02-30"}, "as_of: "),
        ({"as_of": "2024-06-01", "window_days": 10**12}, f"window_days: Input should be less than or equal to {MAX_WINDOW_DAYS}"),
        ({"events": ["top_10\n"]}, "unknown event 'top_10\\n'"),
        ({"events": ["top_5", "top_999"]}, f"event top_999: no field has more than {MAX_FIELD} drivers"),
    ],
    ids=["as_of-1600", "as_of-2300", "as_of-9999", "as_of-not-a-day", "window-1e12", "event-newline", "event-999"],
)
def test_a_job_message_out_of_bounds_is_rejected_and_changes_no_record(env, over, needle):  # noqa: F811
    settings, store, registry = env
    message = _message(**over)
    message.pop("job_id")  # its id would not match the new content: the schema speaks first either way
    result = process(Services(settings, store, registry),
                     Delivery({**message, "job_id": "cj-" + "0" * 24}, worker="hostile@test"))
    assert result["state"] == "rejected"
    assert needle in result["reason"], result["reason"]
    assert "Traceback" not in result["reason"] and "OverflowError" not in result["reason"]
    assert registry.find("cj-" + "0" * 24) is None


def test_select_window_never_overflows(base):  # noqa: F811
    everything = base.sizes["race"]
    assert select_window(base, as_of=LATEST_DATE, window_days=None).sizes["race"] == everything
    assert select_window(base, as_of=date(2025, 1, 1), window_days=MAX_WINDOW_DAYS).sizes["race"] == everything
    assert select_window(base, as_of=LATEST_DATE, window_days=MAX_WINDOW_DAYS).sizes["race"] == 0  # 2100..2200
    assert select_window(base, as_of=EARLIEST_DATE, window_days=MAX_WINDOW_DAYS).sizes["race"] == 0
    for as_of, window in ((date(1600, 1, 1), None), (date(2300, 1, 1), None), (date(2024, 6, 1), 10**12)):
        with pytest.raises(ValueError, match="is outside"):
            select_window(base, as_of=as_of, window_days=window)


# -- events against the dataset's field ---------------------------------------------------------------


def test_an_event_above_the_datasets_field_is_rejected_and_the_dataset_kept(env, base, tmp_path):  # noqa: F811
    field = base.sizes["driver"]
    outcome = submit_file(env, save(base, tmp_path / "d.nc"), events=("top_5", f"top_{field + 5}"))
    rejected(outcome, f"events: top_{field + 5} above the dataset's field of {field} drivers")
    assert outcome.reason.count("  - ") == 1
    assert outcome.stored  # the job's choice, not the file's fault
    assert outcome.record.deliveries <= 1
    no_latest(env)


def test_the_event_pattern_is_matched_whole():
    assert event_threshold("top_10") == 10
    for name in ("top_10\n", "top_10 ", " top_10", "top_010", "top_0", f"top_{MAX_FIELD + 1}"):
        with pytest.raises(ValueError):
            event_threshold(name)

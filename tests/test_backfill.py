"""Backfills in embedded mode: the plan (one job per data window), the run, and picking up after an interruption."""

from __future__ import annotations

from dataclasses import replace
from datetime import date

import numpy as np
import pytest

from producer.backfill import NOT_RUN, Backfill, Outcome, RaceCalendar, counts_table
from producer.client import CalibrationClient
from shared.contract.job import JobState
from shared.contract.settings import Settings
from shared.data.dataset import open_dataset, select_archetypes, select_window
from tests.services import season_file

SAMPLER = {"warmup": 60, "samples": 60, "chains": 2, "seed": 0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return season_file(tmp_path_factory.mktemp("backfill"), scenarios=100, seed=4)


@pytest.fixture
def client(tmp_path):
    return CalibrationClient(Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None))


def backfill(client, dataset, **over):
    options = dict(start=date(2024, 3, 1), end=date(2024, 4, 30), archetypes=["intermediate", "road_course"],
                   window_days=365, events="top_5,top_10", sampler=SAMPLER)
    options.update(over)
    return Backfill(client, dataset, **options)


def test_plan_has_one_job_per_archetype_and_distinct_data_window(client, dataset):
    ds = open_dataset(dataset)
    days = sorted({d for d in ds["race_date"].values.astype("datetime64[D]").astype(object)
                   if date(2024, 3, 1) <= d <= date(2024, 4, 30)})
    windows = backfill(client, dataset).windows()
    for archetype in ("intermediate", "road_course"):
        mine = [w for w in windows if w.archetype == archetype]
        served = [d for w in mine for d in w.days]
        assert len(served) == len(set(served))
        for day in days:
            earlier = select_archetypes(select_window(ds, as_of=day, window_days=365), [archetype])
            assert (day in served) == bool(earlier.sizes["race"]), (archetype, day)
        for w in mine:
            # the job as of the window's first day sees exactly the races of every day it serves
            fitted = select_archetypes(select_window(ds, as_of=w.job.as_of, window_days=365), [archetype])
            assert tuple(fitted["race"].values.astype(str)) == w.races
            for day in w.days:
                assert w.as_of <= day
                seen = select_archetypes(select_window(ds, as_of=day, window_days=365), [archetype])
                assert tuple(seen["race"].values.astype(str)) == w.races
        assert len({w.races for w in mine}) == len(mine)  # distinct windows, one job each
    jobs = [w.job for w in windows]
    assert all(j.window_days == 365 for j in jobs)
    assert len({j.job_id for j in jobs}) == len(jobs)
    # the first road course race (COTA, late March) has no earlier road course data
    assert not any(w.archetype == "road_course" and min(w.days) <= date(2024, 3, 24) for w in windows)
    # far fewer jobs than one per archetype and race date
    per_date = backfill(client, dataset, dedup=False).plan()
    assert len(jobs) < len(per_date) == sum(len(w.days) for w in windows)


def test_two_dates_with_the_same_window_are_one_job_whoever_asks(client, dataset):
    """A job's as_of is its window's first day: plans over different ranges share their jobs."""
    wide = {(w.archetype, w.races): w.job.job_id for w in backfill(client, dataset).windows()}
    narrow = {(w.archetype, w.races): w.job.job_id
              for w in backfill(client, dataset, start=date(2024, 4, 10)).windows()}
    assert narrow and all(wide[key] == job_id for key, job_id in narrow.items())


def _calendar(entries):
    ids = [f"r{i}" for i in range(len(entries))]
    return RaceCalendar(ids, np.array([d for d, _ in entries], dtype="datetime64[D]"), [a for _, a in entries])


def test_a_window_changes_when_a_race_enters_or_leaves_it():
    cal = _calendar([(date(2024, 1, 10), "superspeedway"), (date(2024, 1, 20), "intermediate"),
                     (date(2024, 2, 1), "superspeedway"), (date(2024, 2, 5), "intermediate"),
                     (date(2024, 2, 15), "intermediate"), (date(2024, 3, 1), "intermediate"),
                     (date(2024, 3, 20), "intermediate")])
    days = cal.race_days(date(2024, 1, 1), date(2024, 12, 31))
    windows = cal.windows("superspeedway", days, window_days=30)
    assert [(w.as_of, w.races, w.days) for w in windows] == [
        (date(2024, 1, 11), ("r0",), (date(2024, 1, 20), date(2024, 2, 1))),  # r0 entered on Jan 11
        (date(2024, 2, 2), ("r0", "r2"), (date(2024, 2, 5),)),  # r2 entered
        (date(2024, 2, 10), ("r2",), (date(2024, 2, 15), date(2024, 3, 1))),  # r0 left: Jan 10 + 31 days
        # Mar 20: r2 left on Mar 3, nothing to fit, no job
    ]
    assert cal.window_start("superspeedway", date(2024, 3, 1), 30) == date(2024, 2, 10)
    # without a rolling window only entries change it
    assert [w.days for w in cal.windows("superspeedway", days, window_days=None)] == [
        (date(2024, 1, 20), date(2024, 2, 1)), (date(2024, 2, 5), date(2024, 2, 15), date(2024, 3, 1), date(2024, 3, 20))]


def test_run_then_rerun_skips_what_is_done(client, dataset, monkeypatch):
    plan = backfill(client, dataset, end=date(2024, 3, 31), archetypes=["short_track"])
    outcomes = plan.run(max_in_flight=2)
    assert outcomes and all(o.state == "succeeded" for o in outcomes)

    ran = []
    monkeypatch.setattr(client, "_run_here", lambda job, on_update: ran.append(job.job_id))
    again = backfill(client, dataset, end=date(2024, 3, 31), archetypes=["short_track"]).run()
    assert ran == []
    assert [o.job_id for o in again] == [o.job_id for o in outcomes]
    assert all(o.reused for o in again) and not any(o.reused for o in outcomes)
    assert counts_table(again).title == f"backfill: {len(again)} jobs — {len(again)} reused"


def test_an_interrupted_backfill_picks_up_where_it_stopped(client, dataset, monkeypatch):
    plan = backfill(client, dataset, end=date(2024, 3, 31), archetypes=["short_track"])
    jobs = plan.plan()
    assert len(jobs) >= 2
    real = client._run_here
    calls = []

    def interrupt_second(job, on_update):
        calls.append(job.job_id)
        if len(calls) == 2:
            client.registry.mark_running(job.job_id, worker="embedded")
            raise KeyboardInterrupt
        real(job, on_update)

    monkeypatch.setattr(client, "_run_here", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        plan.run(max_in_flight=1)
    assert client.status(jobs[1].job_id).state is JobState.RUNNING

    monkeypatch.setattr(client, "_run_here", real)
    outcomes = backfill(client, dataset, end=date(2024, 3, 31), archetypes=["short_track"]).run()
    assert all(o.state == "succeeded" for o in outcomes)
    assert client.status(jobs[0].job_id).deliveries == 1  # done once, not again


def test_the_table_has_a_column_for_every_final_state_and_for_reused_and_not_run_jobs():
    states = [s.value for s in JobState if s.finished]
    outcomes = [Outcome("superspeedway", date(2024, 3, 1), f"cj-{i}", state, None if state == "succeeded" else "why")
                for i, state in enumerate([*states, "succeeded", NOT_RUN])]
    outcomes[-2] = replace(outcomes[-2], reused=True)
    table = counts_table(outcomes)
    assert [c.header for c in table.columns] == ["archetype", "done", "reused", "failed", "rejected", "cancelled",
                                                 "not run"]
    assert table.title == "backfill: 6 jobs — 1 done, 1 reused, 1 failed, 1 rejected, 1 cancelled, 1 not run"

"""Backfills in embedded mode: the plan, the run, and picking up after an interruption."""

from __future__ import annotations

from datetime import date

import pytest

from producer.backfill import Backfill, outcome_table
from producer.client import CalibrationClient
from shared.contract.job import JobState
from shared.contract.settings import Settings
from shared.data.dataset import save_dataset
from shared.data.synth import synthesize

SAMPLER = {"warmup": 60, "samples": 60, "chains": 2, "seed": 0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("backfill") / "season.nc"
    save_dataset(synthesize(seasons=1, scenarios=100, seed=4), path)
    return path


@pytest.fixture
def client(tmp_path):
    return CalibrationClient(Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None))


def backfill(client, dataset, **over):
    options = dict(start=date(2024, 3, 1), end=date(2024, 4, 30), archetypes=["intermediate", "road_course"],
                   window_days=365, events="top_5,top_10", sampler=SAMPLER)
    options.update(over)
    return Backfill(client, dataset, **options)


def test_plan_has_one_job_per_archetype_and_race_date_with_earlier_data(client, dataset):
    jobs = backfill(client, dataset).plan()
    import numpy as np

    from shared.data.dataset import open_dataset

    ds = open_dataset(dataset)
    days = sorted({d for d in ds["race_date"].values.astype("datetime64[D]").astype(object)
                   if date(2024, 3, 1) <= d <= date(2024, 4, 30)})
    planned = {(j.archetype, j.as_of) for j in jobs}
    for day in days:
        for archetype in ("intermediate", "road_course"):
            earlier = (ds["archetype"].values == archetype) & (ds["race_date"].values < np.datetime64(day))
            assert ((archetype, day) in planned) == bool(earlier.any()), (archetype, day)
    assert all(j.window_days == 365 for j in jobs)
    # the first road course race (COTA, late March) has no earlier road course data
    assert not any(j.archetype == "road_course" and j.as_of <= date(2024, 3, 24) for j in jobs)
    assert len({j.job_id for j in jobs}) == len(jobs)


def test_run_then_rerun_skips_what_is_done(client, dataset, monkeypatch):
    plan = backfill(client, dataset, end=date(2024, 3, 20), archetypes=["intermediate"])
    outcomes = plan.run(max_in_flight=2)
    assert outcomes and all(o.state == "succeeded" for o in outcomes)

    ran = []
    monkeypatch.setattr(client, "_run_here", lambda job, on_update: ran.append(job.job_id))
    again = backfill(client, dataset, end=date(2024, 3, 20), archetypes=["intermediate"]).run()
    assert ran == []
    assert [o.job_id for o in again] == [o.job_id for o in outcomes]
    assert "0 failed, 0 rejected" in outcome_table(again).title


def test_an_interrupted_backfill_picks_up_where_it_stopped(client, dataset, monkeypatch):
    plan = backfill(client, dataset, end=date(2024, 3, 20), archetypes=["intermediate"])
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
    outcomes = backfill(client, dataset, end=date(2024, 3, 20), archetypes=["intermediate"]).run()
    assert all(o.state == "succeeded" for o in outcomes)
    assert client.status(jobs[0].job_id).deliveries == 1  # done once, not again

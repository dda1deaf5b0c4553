"""Which stored fit a job warm-starts from, and that finding one never costs the job.

The rule is tested on plain records; then jobs run embedded on a real local
store: the second job of an archetype starts from the first, the setting
turns it off, and a stored posterior that cannot be read leaves the job
cold, never failed.
"""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from producer.client import CalibrationClient
from shared.contract.job import CalibrationJob, JobState
from shared.contract.settings import Settings
from shared.data.dataset import save_dataset
from shared.data.synth import synthesize
from shared.jobs.warm_source import StoredFit, nearest_fit

SAMPLER = {"warmup": 60, "samples": 60, "chains": 2, "seed": 0}


def fit(job_id: str, through: date, **over) -> StoredFit:
    fields = dict(job_id=job_id, model_version=job(None).model_version, events=frozenset({"top_5", "top_10"}), converged=True,
                  centered=False, data_through=through, posterior_uri=f"file:///store/{job_id}.nc")
    fields.update(over)
    return StoredFit(**fields)


def job(as_of: date | None, events=("top_5", "top_10")) -> CalibrationJob:
    return CalibrationJob(archetype="intermediate", dataset_uri="file:///d.nc", dataset_sha256="0" * 64,
                          events=events, as_of=as_of, sampler=SAMPLER)


def test_the_nearest_earlier_fit_is_chosen_else_the_nearest_later():
    fits = [fit("a", date(2024, 3, 1)), fit("b", date(2024, 5, 1)), fit("c", date(2024, 7, 1))]
    assert nearest_fit(job(date(2024, 6, 1)), fits).job_id == "b"
    assert nearest_fit(job(date(2024, 5, 1)), fits).job_id == "a"  # the job sees races strictly before as_of
    assert nearest_fit(job(date(2024, 1, 1)), fits).job_id == "a"  # none earlier: the nearest later one
    assert nearest_fit(job(None), fits).job_id == "c"  # all races: the newest


def test_only_usable_fits_count():
    day = date(2024, 6, 1)
    me = job(day)
    unusable = [
        fit("unconverged", date(2024, 5, 30), converged=False),
        fit("other-model", date(2024, 5, 30), model_version=me.model_version + "-other"),
        fit("fewer-events", date(2024, 5, 30), events=frozenset({"top_5"})),
        fit("centred", date(2024, 5, 30), centered=True),
        fit("no-posterior", date(2024, 5, 30), posterior_uri=None),
        fit(me.job_id, date(2024, 5, 30)),  # never the job itself (a redelivery finds its own summary)
    ]
    assert nearest_fit(me, unusable) is None
    assert nearest_fit(me, [*unusable, fit("far", date(2023, 1, 1))]).job_id == "far"
    assert nearest_fit(job(day, events=("top_5",)), [fit("more-events", date(2024, 5, 1))]).job_id == "more-events"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("warm") / "season.nc"
    ds = synthesize(seasons=1, scenarios=100, seed=4)
    save_dataset(ds, path)
    days = sorted({d for d, a in zip(ds["race_date"].values.astype("datetime64[D]").astype(object), ds["archetype"].values)
                   if a == "intermediate"})
    return path, [d + timedelta(days=1) for d in days]


def run(client, path, as_of):
    job_id = client.submit(path, "intermediate", events="top_5,top_10", as_of=as_of, **SAMPLER)
    status = client.status(job_id)
    assert status.state == JobState.SUCCEEDED, status.reason
    return client.result(job_id)


def test_the_next_as_of_job_starts_from_the_previous_fit(tmp_path, dataset):
    path, days = dataset
    client = CalibrationClient(Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None))
    first = run(client, path, days[5])
    assert first.warm_start is None  # an empty store: cold
    second = run(client, path, days[6])
    assert second.warm_start is not None and second.warm_start.job_id == first.job_id
    assert second.warm_start.data_through == first.data_through
    assert second.warm_start.posterior_uri == first.posterior_uri
    assert second.attempts[0].warm_start and second.attempts[0].warmup == 50
    earlier = run(client, path, days[3])  # nothing before it: the nearest later fit
    assert earlier.warm_start.job_id == first.job_id


def test_the_setting_turns_warm_starts_off(tmp_path, dataset):
    path, days = dataset
    client = CalibrationClient(Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None, warm_start=False))
    run(client, path, days[5])
    second = run(client, path, days[6])
    assert second.warm_start is None and not second.attempts[0].warm_start


def test_an_unreadable_stored_posterior_leaves_the_job_cold_not_failed(tmp_path, dataset, caplog):
    path, days = dataset
    client = CalibrationClient(Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None))
    first = run(client, path, days[5])
    posterior = first.posterior_uri.removeprefix("file://")
    with open(posterior, "wb") as handle:
        handle.write(b"CDF\x01 not a posterior")
    (tmp_path / "store" / "posteriors" / "intermediate" / "garbage.json").write_text("{not json")
    second = run(client, path, days[6])
    assert second.warm_start is None and second.converged in (True, False)
    assert "starting cold" in caplog.text and "skipping unreadable summary" in caplog.text


@pytest.mark.integration
def test_warm_starts_read_the_previous_fit_from_s3(s3_settings, dataset):
    path, days = dataset
    client = CalibrationClient(s3_settings)
    first = run(client, path, days[5])
    second = run(client, path, days[6])
    assert first.posterior_uri.startswith("s3://")
    assert second.warm_start is not None and second.warm_start.posterior_uri == first.posterior_uri


def test_the_posterior_just_written_is_handed_over_only_while_the_store_holds_its_bytes(tmp_path, dataset):
    """The next job's warm start takes the written posterior from memory: the same groups, values, coordinates
    and attributes as read back from the store; once the stored object changes, or a signed summary records
    other bytes, nothing is handed over (the store is read, as before)."""
    from shared.jobs import handover
    from shared.jobs.handover import WARM_GROUPS
    from shared.storage.store import Store

    path, days = dataset
    settings = Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None)
    client = CalibrationClient(settings)
    first = run(client, path, days[5])
    store = Store.from_settings(settings)
    held = handover.take(first.posterior_uri, store, groups=WARM_GROUPS)
    assert held is not None
    read = store.get_inference_data(first.posterior_uri, groups=WARM_GROUPS)
    assert held.groups() == read.groups() == list(WARM_GROUPS)
    for group in WARM_GROUPS:
        assert getattr(held, group).identical(getattr(read, group)), group
    assert handover.take(first.posterior_uri, store, groups=WARM_GROUPS, sha256="0" * 64) is None
    posterior = first.posterior_uri.removeprefix("file://")
    with open(posterior, "ab") as handle:
        handle.write(b"\0")  # the stored bytes are no longer the ones written
    assert handover.take(first.posterior_uri, store, groups=WARM_GROUPS) is None
    handover.forget()

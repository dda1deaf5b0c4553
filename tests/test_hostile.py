"""Hostile inputs, the files and job fields a careless or hostile producer sends (issue 8).

Each case goes the way a job goes on a worker: the dataset is put in a real
store, the job is claimed in the store registry and handed to
:func:`shared.jobs.handle.process` with the real :func:`run_job`. Each case
asserts the final record state and the specific reason, that no traceback
and no secret or target-derived text is in it, and what happened to the
stored dataset (deleted only when its own bytes failed). None of the cases
reaches the sampler: they are refused before the work they would cost.

The message cases (malformed Celery messages against a real worker) are in
``tests/test_hostile_worker.py``.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import pytest
import xarray as xr
from rich.console import Console

from producer.backfill import Outcome, outcome_table
from producer.render import describe, jobs_table, progress_bar, status_table
from shared.contract.errors import DatasetNotAllowed
from shared.contract.job import CalibrationJob, JobState, JobStatus, Progress, SamplerSettings
from shared.contract.settings import Settings
from shared.data.dataset import save_dataset
from shared.data.synth import synthesize
from shared.jobs.handle import Delivery, process
from shared.jobs.registry import StoreRegistry
from shared.jobs.services import Services
from shared.storage.store import Store, dataset_key, sha256_file

MARKUP = "r[/red][link=x]x[/link][/]"
SAMPLER = SamplerSettings(warmup=10, samples=10, chains=1)


# -- the harness ---------------------------------------------------------------


@dataclass
class Outcome8:
    record: JobStatus
    job: CalibrationJob
    stored: bool  # whether the job's content address still holds a file afterwards
    store: Store
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return self.record.reason or ""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> xr.Dataset:
    return synthesize(seasons=1, scenarios=20, seed=0, drivers_per_race=8, pool_size=10)


@pytest.fixture
def env(tmp_path: Path):
    settings = Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None)
    store = Store.from_settings(settings, cache_dir=tmp_path / "cache")
    return settings, store, StoreRegistry(store)


def run(env, job: CalibrationJob) -> Outcome8:
    settings, store, registry = env
    registry.claim(job)
    result = within(30, lambda: process(Services(settings, store, registry),
                                        Delivery(job.to_message(), worker="hostile@test")))
    record = registry.get(job.job_id)
    assert result["state"] == record.state.value
    key = dataset_key(job.dataset_sha256)
    stored = os.path.isfile(store._root + "/" + key)
    return Outcome8(record=record, job=job, stored=stored, store=store)


def job_for(uri: str, sha: str, **over: Any) -> CalibrationJob:
    fields: dict[str, Any] = {"archetype": "all", "dataset_uri": uri, "dataset_sha256": sha, "sampler": SAMPLER}
    return CalibrationJob(**{**fields, **over})


def submit_file(env, path: Path, **over: Any) -> Outcome8:
    """Upload ``path`` to the store as a producer does, then run a job on it."""
    _, store, _ = env
    uri, sha = store.upload_dataset(path)
    return run(env, job_for(uri, sha, **over))


def submit_bytes(env, data: bytes, **over: Any) -> Outcome8:
    """Put raw bytes at their content address in the store (the producer uploads anything)."""
    _, store, _ = env
    sha = hashlib.sha256(data).hexdigest()
    uri = store.put_bytes(dataset_key(sha), data)
    return run(env, job_for(uri, sha, **over))


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``, failing the test if it has not returned in ``seconds`` (a FIFO must never block)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # re-raised in the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def rejected(outcome: Outcome8, *needles: str) -> None:
    """The job ended rejected, its reason holds every needle, and no traceback."""
    assert outcome.record.state is JobState.REJECTED, (outcome.record.state, outcome.reason)
    for needle in needles:
        assert needle in outcome.reason, f"{needle!r} not in {outcome.reason!r}"
    assert "Traceback" not in outcome.reason
    assert outcome.record.posterior_uri is None and outcome.record.summary_uri is None


def save(ds: xr.Dataset, path: Path) -> Path:
    return save_dataset(ds, path)


def declared(path: Path, *, race: int, scenario: int, driver: int, dtype: str = "f4",
             variables: tuple[str, ...] = ("sim_position",)) -> Path:
    """A tiny file whose header declares [race, scenario, driver] arrays (chunks never written)."""
    with netCDF4.Dataset(path, "w") as nc:
        nc.createDimension("race", race)
        nc.createDimension("scenario", scenario)
        nc.createDimension("driver", driver)
        for name in variables:
            nc.createVariable(name, dtype, ("race", "scenario", "driver"), zlib=True,
                              chunksizes=(1, max(1, min(scenario, 1000)), max(1, driver)))
        nc.createVariable("finish_position", "f8", ("race", "driver"), zlib=True)
    return path


# -- 1. confinement: a job reads only its own content address -----------------

OUTSIDE_URIS = [
    "file:///etc/passwd",
    "file:///proc/self/environ",
    "file:///etc/does-not-exist",
    "file://host/etc/passwd",
    "file://localhost/etc/passwd",
    "s3://another-bucket/datasets/data.nc",
    "file:///",
]


@pytest.mark.parametrize("uri", OUTSIDE_URIS)
def test_a_uri_outside_the_store_is_rejected_with_the_one_message(env, uri):
    sha = hashlib.sha256(b"whatever").hexdigest()
    outcome = run(env, job_for(uri, sha))
    rejected(outcome)
    assert outcome.reason == DatasetNotAllowed.MESSAGE


def test_climbing_out_of_the_store_with_dotdot_is_rejected(env):
    _, store, _ = env
    passwd_sha = sha256_file("/etc/passwd")
    uri = store.dataset_uri(passwd_sha).replace(f"datasets/{passwd_sha}.nc", "datasets/../../../../../../etc/passwd")
    outcome = run(env, job_for(uri, passwd_sha))
    rejected(outcome)
    assert outcome.reason == DatasetNotAllowed.MESSAGE


def test_no_hash_oracle_and_no_existence_oracle(env):
    """The answer for a file that exists equals the one for a file that does not, and holds no hash."""
    real_sha = sha256_file("/etc/passwd")
    guess = "0" * 64
    reasons = {
        run(env, job_for(f"file://{path}", sha)).reason
        for path in ("/etc/passwd", "/etc/no-such-file", "/etc")
        for sha in (real_sha, guess)
    }
    assert reasons == {DatasetNotAllowed.MESSAGE}
    assert real_sha not in DatasetNotAllowed.MESSAGE


def test_a_valid_dataset_outside_the_store_is_not_calibrated(env, base, tmp_path):
    path = save(base, tmp_path / "elsewhere.nc")
    outcome = run(env, job_for(f"file://{path}", sha256_file(path)))
    rejected(outcome)
    assert outcome.reason == DatasetNotAllowed.MESSAGE
    assert not outcome.store.list("posteriors")


def test_another_files_content_address_is_not_this_jobs(env, base, tmp_path):
    """A job naming one stored dataset's URI with another hash is refused (the URI is not its address)."""
    _, store, _ = env
    uri, _ = store.upload_dataset(save(base, tmp_path / "d.nc"))
    outcome = run(env, job_for(uri, "1" * 64))
    rejected(outcome)
    assert outcome.reason == DatasetNotAllowed.MESSAGE


def test_a_dataset_never_uploaded_is_not_found_at_its_address(env):
    _, store, _ = env
    sha = "2" * 64
    outcome = run(env, job_for(store.dataset_uri(sha), sha))
    rejected(outcome, "nothing at", f"datasets/{sha}.nc")


def test_a_tampered_stored_dataset_is_rejected_without_its_hash_and_deleted(env, base, tmp_path):
    _, store, _ = env
    uri, sha = store.upload_dataset(save(base, tmp_path / "d.nc"))
    store.put_bytes(store.key_of(uri), b"tampered")
    outcome = run(env, job_for(uri, sha))
    rejected(outcome, f"do not have sha256 {sha}")
    assert hashlib.sha256(b"tampered").hexdigest() not in outcome.reason
    assert not outcome.stored  # corrupt bytes at a content address: deleted, a re-upload repairs it


def test_a_folder_at_the_content_address_is_named(env):
    _, store, _ = env
    sha = "3" * 64
    os.makedirs(os.path.join(store._root, dataset_key(sha)))
    outcome = run(env, job_for(store.dataset_uri(sha), sha))
    rejected(outcome, "not a regular file")


def test_a_fifo_at_the_content_address_never_blocks(env):
    _, store, _ = env
    sha = "4" * 64
    os.makedirs(os.path.join(store._root, "datasets"), exist_ok=True)
    os.mkfifo(os.path.join(store._root, dataset_key(sha)))
    outcome = run(env, job_for(store.dataset_uri(sha), sha))  # run() fails if it takes 30 s
    rejected(outcome, "not a regular file")


# -- 2. the file itself: refused from its header before anything is decoded ---


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "the file is empty"),
        (b"race,driver\n1,2\n", "the file is not NetCDF"),
        (b"<html>not found</html>", "the file is not NetCDF"),
        (b"\x89HDF\r\n\x1a\n" + b"\x00" * 100, "truncated or corrupt"),
        (b"CDF\x01" + b"\xff" * 60, "NetCDF"),
    ],
    ids=["empty", "csv", "html", "hdf5-signature-only", "classic-garbage"],
)
def test_bytes_that_are_not_a_dataset_are_rejected_and_deleted(env, content, needle):
    outcome = submit_bytes(env, content)
    rejected(outcome, needle)
    assert not outcome.stored


def test_a_truncated_file_says_truncated(env, base, tmp_path):
    data = save(base, tmp_path / "d.nc").read_bytes()
    outcome = submit_bytes(env, data[: len(data) // 2])
    rejected(outcome, "truncated or corrupt", "upload the complete file again")
    assert "HDF error" in outcome.reason and not outcome.stored


def test_a_file_declaring_50_gb_is_refused_from_its_header(env, tmp_path):
    path = declared(tmp_path / "huge.nc", race=2000, scenario=20_000, driver=200, dtype="f8")
    assert path.stat().st_size < 100_000  # it declares 64 GB in a few KB
    outcome = submit_file(env, path)
    rejected(outcome, "limits.max_decoded_bytes", "once decoded")
    assert outcome.stored  # over this worker's limit, not a fault of its bytes: kept for workers that accept it


def test_a_file_larger_than_the_limit_is_refused_before_it_is_hashed(env, tmp_path):
    settings, store, registry = env
    small = Settings(storage_url=settings.storage_url, compile_cache_dir=None, limits={"max_decoded_bytes": 1000})
    data = b"\x89HDF\r\n\x1a\n" + b"\x00" * 5000
    sha = hashlib.sha256(data).hexdigest()
    uri = store.put_bytes(dataset_key(sha), data)
    outcome = run((small, store, registry), job_for(uri, sha))
    rejected(outcome, "5,008 bytes", "limits.max_decoded_bytes")
    assert outcome.stored  # a limit of this worker's settings: the file is kept


@pytest.mark.parametrize(
    ("dims", "limit"),
    [
        ({"race": 2001, "scenario": 20, "driver": 2}, "limits.max_races"),
        ({"race": 2, "scenario": 20_001, "driver": 2}, "limits.max_scenarios"),
        ({"race": 2, "scenario": 20, "driver": 201}, "limits.max_drivers"),
        ({"race": 3, "scenario": 1, "driver": 5}, "limits.min_scenarios"),
        ({"race": 3, "scenario": 19, "driver": 5}, "limits.min_scenarios"),
    ],
    ids=["races", "scenarios", "drivers", "one-scenario", "nineteen-scenarios"],
)
def test_each_dimension_limit_is_named(env, tmp_path, dims, limit):
    outcome = submit_file(env, declared(tmp_path / "d.nc", **dims))
    rejected(outcome, limit)
    assert outcome.stored  # limits are one worker's settings: another may accept the file


def test_a_scenario_axis_of_one_says_how_many_are_needed(env, base, tmp_path):
    outcome = submit_file(env, save(base.isel(scenario=[0]), tmp_path / "one.nc"))
    rejected(outcome, "only 1 scenario(s) per race", "at least 20")
    assert outcome.stored


def test_a_ten_megabyte_track_name_is_refused_without_loading_it_all(env, base, tmp_path):
    tracks = base["track"].values.astype(object)
    tracks[3] = "T" * 10_000_000
    ds = base.assign_coords(track=("race", tracks))
    outcome = submit_file(env, save(ds, tmp_path / "long.nc"))
    rejected(outcome, "track: 1 value(s) longer than 200 characters", "race #3", "10,000,000 characters")
    assert len(outcome.reason) < 2000
    assert outcome.stored  # limits.max_id_chars is this worker's setting


def test_a_long_race_id_is_refused(env, base, tmp_path):
    races = base["race"].values.astype(object)
    races[0] = "r" * 500
    outcome = submit_file(env, save(base.assign_coords(race=races), tmp_path / "long-id.nc"))
    rejected(outcome, "race: 1 value(s) longer than 200", "limits.max_id_chars")
    assert outcome.stored


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) >= 1
    i = data.index(old)
    return data[:i] + new + data[i + len(old):]


def test_one_non_utf8_track_name_names_its_race(env, base, tmp_path):
    tracks = base["track"].values.astype(object)
    tracks[5] = "Zzqqtrack"
    data = save(base.assign_coords(track=("race", tracks)), tmp_path / "d.nc").read_bytes()
    outcome = submit_bytes(env, _replace_once(data, b"Zzqqtrack", b"Zzq\xfftrack"))
    rejected(outcome, "track: value(s) that are not valid UTF-8 text at race #5")
    assert "missing" not in outcome.reason
    assert not outcome.stored  # its own bytes, for every worker: deleted


def test_a_non_utf8_driver_id_names_its_driver(env, base, tmp_path):
    drivers = base["driver"].values.astype(object)
    drivers[2] = "dqzq"
    data = save(base.assign_coords(driver=drivers), tmp_path / "d.nc").read_bytes()
    outcome = submit_bytes(env, _replace_once(data, b"dqzq", b"d\xfeqq"))
    rejected(outcome, "driver: value(s) that are not valid UTF-8 text at driver #2")


def test_data_inside_a_netcdf_group_names_the_group(env, base, tmp_path):
    path = tmp_path / "grouped.nc"
    base.to_netcdf(path, group="forecast", engine="netcdf4")
    outcome = submit_file(env, path)
    rejected(outcome, "inside NetCDF group(s) 'forecast'", "holding sim_position, finish_position", "root group")
    assert outcome.reason.count("missing") <= 1


# -- 3. the contract, on loaded data -----------------------------------------


def test_infinite_sim_points_are_rejected(env, base, tmp_path):
    ds = base.copy(deep=True)
    values = ds["sim_points"].values
    entered = np.argwhere(~np.isnan(values))
    values[tuple(entered[0])] = np.inf
    values[tuple(entered[-1])] = -np.inf
    outcome = submit_file(env, save(ds, tmp_path / "inf.nc"))
    rejected(outcome, "sim_points: race", "infinite value(s)")
    assert outcome.reason.count("infinite value(s)") == 2  # two races named
    assert not outcome.stored


def test_infinite_points_are_rejected(env, base, tmp_path):
    ds = base.copy(deep=True)
    r, d = np.argwhere(~np.isnan(ds["points"].values))[0]
    ds["points"].values[r, d] = -np.inf
    outcome = submit_file(env, save(ds, tmp_path / "inf.nc"))
    rejected(outcome, f"points: race {base['race'].values[r]} has 1 infinite value(s)")


def test_duplicated_race_ids_are_rejected(env, base, tmp_path):
    races = base["race"].values.astype(object)
    races[1] = races[0]
    outcome = submit_file(env, save(base.assign_coords(race=races), tmp_path / "dup.nc"))
    rejected(outcome, "duplicated race ids")
    assert not outcome.stored


def test_an_unknown_archetype_value_is_rejected(env, base, tmp_path):
    archetypes = base["archetype"].values.astype(object)
    archetypes[0] = "dirt_track"
    ds = base.assign_coords(archetype=("race", archetypes))
    outcome = submit_file(env, save(ds, tmp_path / "arch.nc"))
    rejected(outcome, "archetype: unknown value(s) 'dirt_track'")


def test_wrong_dimensions_are_rejected(env, base, tmp_path):
    ds = base.drop_vars(["sim_position"]).assign(sim_position=base["sim_position"].isel(scenario=0))
    outcome = submit_file(env, save(ds, tmp_path / "dims.nc"))
    rejected(outcome, "sim_position: wrong dimensions (race, driver)")


def test_markup_in_a_race_id_is_plain_text_everywhere(env, base, tmp_path):
    races = base["race"].values.astype(object)
    races[0] = MARKUP
    races[1] = MARKUP  # duplicated, so the reason quotes it
    outcome = submit_file(env, save(base.assign_coords(race=races), tmp_path / "markup.nc"))
    rejected(outcome, MARKUP)
    console = Console(file=io.StringIO(), width=2000)
    console.print(status_table(outcome.record))
    console.print(jobs_table([outcome.record]))
    console.print(outcome_table([Outcome(archetype="all", as_of=None, job_id=outcome.job.job_id,
                                         state="rejected", reason=f"race {MARKUP}: duplicated")]))
    running = outcome.record.model_copy(update={"state": JobState.RUNNING, "progress": Progress(phase=MARKUP)})
    with progress_bar(console) as bar:
        task = bar.add_task(MARKUP, total=1.0, phase="queued")
        phase, done = describe(running)
        bar.update(task, completed=done, phase=phase)
    text = console.file.getvalue()
    assert MARKUP in text and text.count(MARKUP) >= 4


# -- 4. a job's own choices: rejected, and the shared dataset is kept ---------


def test_an_archetype_the_dataset_lacks_keeps_the_dataset(env, base, tmp_path):
    ds = base.isel(race=np.nonzero(base["archetype"].values != "road_course")[0])
    outcome = submit_file(env, save(ds, tmp_path / "d.nc"), archetype="road_course")
    rejected(outcome, "no races of archetype road_course")
    assert outcome.stored  # valid for every other job: never deleted because one job misused it


def test_a_window_without_races_keeps_the_dataset(env, base, tmp_path):
    from datetime import date

    outcome = submit_file(env, save(base, tmp_path / "d.nc"), as_of=date(2000, 1, 1))
    rejected(outcome, "no races of archetype all before 2000-01-01")
    assert outcome.stored


def test_memory_error_while_loading_is_a_clear_rejection(env, base, tmp_path, monkeypatch):
    def no_memory(self, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(xr.Dataset, "load", no_memory)
    outcome = submit_file(env, save(base, tmp_path / "d.nc"))
    rejected(outcome, "did not fit in this worker's memory", "limits.max_decoded_bytes")
    assert outcome.stored  # not the file's fault


@pytest.mark.parametrize(
    ("sampler", "limit"),
    [
        ({"warmup": 10, "samples": 10, "chains": 64}, "64 chains, above this worker's limit of 8 (limits.max_chains)"),
        ({"warmup": 100_000, "samples": 100_000, "chains": 1}, "limits.max_draws_per_chain"),
    ],
    ids=["chains", "draws"],
)
def test_a_job_above_the_workers_caps_is_rejected_naming_the_cap(env, base, tmp_path, sampler, limit):
    outcome = submit_file(env, save(base, tmp_path / "d.nc"), sampler=SamplerSettings(**sampler))
    rejected(outcome, "job over this worker's limits", limit)
    assert outcome.stored


def test_too_many_events_are_capped_by_the_worker(env, base, tmp_path):
    events = ",".join(f"top_{i}" for i in range(1, 13))
    outcome = submit_file(env, save(base, tmp_path / "d.nc"), events=events)
    rejected(outcome, "12 events, above this worker's limit of 10 (limits.max_events)")


def test_a_producers_time_limit_never_lengthens_the_workers(env, base, tmp_path, monkeypatch):
    """time_limit_s above the worker's limit: the worker's applies, from before the fetch."""
    import shared.jobs.run as runner
    from shared.contract.errors import InvalidDataset

    seen: dict[str, float] = {}

    def calibrate(dataset, job, *, control, **_):
        seen["remaining"] = control.remaining_s()
        raise InvalidDataset(["stop here"])

    monkeypatch.setattr(runner, "calibrate", calibrate)
    settings, store, registry = env
    short = Settings(storage_url=settings.storage_url, compile_cache_dir=None, job_time_limit_s=60,
                     visibility_timeout_s=120)
    path = save(base, tmp_path / "d.nc")
    uri, sha = store.upload_dataset(path)
    outcome = run((short, store, registry), job_for(uri, sha, time_limit_s=7 * 24 * 3600))
    rejected(outcome, "stop here")
    assert 0 < seen["remaining"] <= 60


def test_an_unknown_model_version_is_invalid():
    with pytest.raises(ValueError, match="unknown model_version"):
        job_for("file:///x.nc", "0" * 64, model_version="logit-hier/999")
    with pytest.raises(ValueError, match="at most 2048"):
        job_for("file:///" + "a" * 3000, "0" * 64)


def test_a_summary_is_read_only_from_the_store(env):
    """A record's summary_uri is followed only inside the store (a duplicate delivery reads it back)."""
    from shared.contract.errors import NotFound
    from shared.storage.catalog import Catalog

    _, store, _ = env
    catalog = Catalog(store)
    for uri in ("file:///etc/passwd", "s3://another-bucket/posteriors/x.json",
                store.uri("posteriors/all/x.json").replace("posteriors/all/x.json", "posteriors/../../../etc/passwd")):
        with pytest.raises(NotFound, match="only from this store"):
            catalog.read(uri)
    assert store.holds(store.uri("posteriors/all/x.json"))

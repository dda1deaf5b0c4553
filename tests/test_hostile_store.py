"""Hostile store objects and shared datasets (issue 16, part B): nothing is trusted because it is there.

Anyone who can write the store (every producer holds its key) can plant an
object. These cases plant them and check what the readers make of them:

- a dataset is deleted only for faults of its own bytes, never for one
  worker's limits (another worker accepts it);
- uploads compare hashes, not sizes: bytes planted at a content address
  first are replaced, and the owner's job, rejected for their hash, runs
  when it is submitted again;
- with a signing key, summaries and posteriors carry a worker's HMAC:
  a planted, forged, re-pointed or swapped summary or posterior is skipped
  by warm start, repair (``reindex``), the rebuild of ``latest`` and the
  catalog lookups the report and the client use.

The jobs go the way they go on a worker (the harness of
``tests/test_hostile.py``: a real local store, the store registry,
:func:`shared.jobs.handle.process` with the real :func:`run_job`).
"""

from __future__ import annotations

import pytest

from shared.contract.job import CalibrationJob, JobState, JobStatus, SamplerSettings
from shared.contract.settings import Settings
from shared.jobs.handle import process
from shared.storage.store import Store, dataset_key, sha256_file
from tests import test_hostile as hostile
from tests.test_hostile import job_for, rejected, run, save

# The harness's fixtures: a real local store with its registry, and a small synthetic dataset.
env = hostile.env
base = hostile.base

#: A second seed: a different job on the same dataset.
OTHER_SEED = SamplerSettings(warmup=10, samples=10, chains=1, seed=1)



def fitted(env, job: CalibrationJob) -> JobStatus:
    """Claim ``job`` and run it to the end on the harness's worker (a real fit: some seconds); its record."""
    settings, store, registry = env
    registry.claim(job)
    process(job.to_message(), registry=registry, store=store, settings=settings, worker="store@test")
    return registry.get(job.job_id)


# -- a dataset is deleted only for faults of its own bytes ----------------------


def test_a_dataset_over_one_workers_max_races_is_kept_and_runs_on_another(env, base, tmp_path):
    settings, store, registry = env
    races = base.sizes["race"]
    strict = Settings(storage_url=settings.storage_url, compile_cache_dir=None, limits={"max_races": races - 1})
    uri, sha = store.upload_dataset(save(base, tmp_path / "d.nc"))

    refused = run((strict, store, registry), job_for(uri, sha))
    rejected(refused, f"race: {races:,} along race", f"limit of {races - 1:,} (limits.max_races)")
    assert refused.stored  # a limit of one worker's settings: the shared dataset stays

    accepted = fitted(env, job_for(uri, sha, sampler=OTHER_SEED))
    assert accepted.state is JobState.SUCCEEDED, accepted.reason
    assert store.exists(uri)


# -- uploads compare hashes, not sizes -----------------------------------------


def _plant_same_size(store, path) -> str:
    """Bytes of the file's size but not its content, put at its content address first; the address's key."""
    data = path.read_bytes()
    key = dataset_key(sha256_file(path))
    store.put_bytes(key, bytes(len(data)))
    return key


def test_same_size_bytes_planted_at_the_address_are_replaced_by_the_upload_and_the_job_runs(env, base, tmp_path):
    _, store, _ = env
    path = save(base, tmp_path / "d.nc")
    key = _plant_same_size(store, path)

    uri, sha = store.upload_dataset(path)
    assert store.key_of(uri) == key and store.get_bytes(key) == path.read_bytes()
    record = fitted(env, job_for(uri, sha))
    assert record.state is JobState.SUCCEEDED, record.reason


def test_a_job_rejected_for_planted_bytes_runs_when_submitted_again(env, base, tmp_path):
    settings, store, registry = env
    path = save(base, tmp_path / "d.nc")
    uri, sha = store.upload_dataset(path)
    store.put_bytes(store.key_of(uri), bytes(path.stat().st_size))  # someone overwrites it before the job runs
    job = job_for(uri, sha)

    first = run(env, job)
    rejected(first, f"do not have sha256 {sha}")
    assert not first.stored  # not the address's content: deleted

    store.upload_dataset(path)  # the owner uploads again and resubmits the same job (the same id)
    record, enqueue = registry.claim(job)
    assert enqueue and record.state is JobState.QUEUED and record.reason is None
    process(job.to_message(), registry=registry, store=store, settings=settings, worker="store@test")
    assert registry.get(job.job_id).state is JobState.SUCCEEDED


def test_a_job_rejected_for_its_own_bytes_stays_rejected_when_submitted_again(env):
    _, _, registry = env
    outcome = hostile.submit_bytes(env, b"not a dataset at all")
    rejected(outcome, "the file is not NetCDF")
    record, enqueue = registry.claim(outcome.job)
    assert not enqueue and record == outcome.record


@pytest.mark.parametrize(
    "reason",
    [
        "dataset hash mismatch",
        "invalid calibration dataset:\n  - dataset x: its bytes do not have sha256 " + "0" * 64 + ", the hash the job names",
        "dataset x: its bytes do not have sha256 " + "0" * 64 + ", the hash the job names and more",
    ],
    ids=["words-only", "inside-another-reason", "with-a-tail"],
)
def test_only_the_whole_hash_mismatch_message_reopens_a_rejected_job(env, reason):
    _, _, registry = env
    job = job_for("file:///nowhere.nc", "0" * 64)
    registry.claim(job)
    registry.mark_running(job.job_id, worker="w")
    registry.reject(job.job_id, reason)
    record, enqueue = registry.claim(job)
    assert not enqueue and record.state is JobState.REJECTED and record.reason == reason


@pytest.mark.integration
def test_an_s3_upload_replaces_same_size_planted_bytes(s3_settings, base, tmp_path):
    store = Store.from_settings(s3_settings, cache_dir=tmp_path / "cache")
    path = save(base, tmp_path / "d.nc")
    key = _plant_same_size(store, path)
    uri, sha = store.upload_dataset(path)
    assert store.get_bytes(key) == path.read_bytes()
    assert store.fetch_dataset(uri, sha).read_bytes() == path.read_bytes()
    assert store.upload_dataset(path) == (uri, sha)  # now in place: nothing to do

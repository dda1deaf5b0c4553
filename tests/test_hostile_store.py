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

from shared.contract.job import CalibrationJob, JobState, JobStatus, SamplerSettings
from shared.contract.settings import Settings
from shared.jobs.handle import process
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

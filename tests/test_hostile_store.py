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

import hashlib
import json
import logging
import subprocess
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from shared.contract.errors import NotFound, Unverified
from shared.contract.job import CalibrationJob, JobState, JobStatus, SamplerSettings
from shared.contract.settings import Settings
from shared.contract.summary import CalibrationSummary
from shared.jobs.handle import Delivery, process
from shared.jobs.registry import StoreRegistry
from shared.jobs.services import Services
from shared.jobs.submissions import repair_from_store
from shared.jobs.warm_source import find_warm_source
from shared.storage.catalog import Catalog
from shared.storage.provenance import key_bytes, seal
from shared.storage.store import Store, dataset_key, posterior_key, sha256_file, summary_key
from tests import test_hostile as hostile
from tests.services import calq_environ, run_calq
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
    process(Services(settings, store, registry), Delivery(job.to_message(), worker="store@test"))
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
    process(Services(settings, store, registry), Delivery(job.to_message(), worker="store@test"))
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


# -- proof of authorship: summaries and posteriors signed by workers ----------

KEY = "the-fleet-signing-key"
#: A string put in every forged summary: it must never reach a log line or a reason.
MARK = "FORGED-CONTENT-7f3a"


@pytest.fixture(scope="module")
def worker_fit(tmp_path_factory, base) -> tuple[CalibrationSummary, bytes, Store]:
    """One real job on a worker holding the signing key: its summary as stored, its posterior's bytes, its store."""
    root = tmp_path_factory.mktemp("signed")
    settings = Settings(storage_url=str(root / "store"), compile_cache_dir=None, signing_key=KEY)
    store = Store.from_settings(settings, cache_dir=root / "cache")
    uri, sha = store.upload_dataset(save(base, root / "d.nc"))
    record = fitted((settings, store, StoreRegistry(store)), job_for(uri, sha))
    assert record.state is JobState.SUCCEEDED, record.reason
    summary = CalibrationSummary.model_validate_json(store.get_bytes(record.summary_uri))
    return summary, store.get_bytes(record.posterior_uri), store


@dataclass
class Fleet:
    """A fresh store whose readers hold ``key``, with the real fit's posterior bytes to plant copies of."""

    settings: Settings
    store: Store
    registry: StoreRegistry
    fit: CalibrationSummary
    posterior: bytes

    @property
    def catalog(self) -> Catalog:
        return Catalog(self.store)

    def write(self, job_id: str, *, data_through: date, key: str | None = KEY, at: str | None = None,
              **update) -> str:
        """Put a converged summary of ``job_id`` (the real fit's fields) and a copy of its posterior in the store.

        Sealed under ``key`` as a worker seals (None: unsigned); ``update``
        changes fields before sealing; ``at`` writes it at another job's key.
        Returns the summary's URI.
        """
        posterior = self.store.put_bytes(posterior_key("all", job_id), self.posterior)
        fields = {
            "job_id": job_id, "converged": True, "data_through": data_through,
            "summary_uri": self.store.uri(summary_key("all", job_id)), "posterior_uri": posterior,
            "provenance": None, **update,
        }
        summary = seal(self.fit.model_copy(update=fields), posterior_sha256=hashlib.sha256(self.posterior).hexdigest(),
                       key=key_bytes(key))
        return self.store.put_bytes(summary_key("all", at or job_id), summary.model_dump_json(indent=2).encode())

    def warm_job(self, as_of: date) -> CalibrationJob:
        return job_for(self.store.dataset_uri("0" * 64), "0" * 64, as_of=as_of)


def fleet_of(tmp_path, worker_fit, *, key: str | None = KEY, settings: Settings | None = None) -> Fleet:
    """A fleet on a fresh local store (or the one ``settings`` name) whose readers hold ``key``."""
    summary, posterior, _ = worker_fit
    settings = (settings or Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None)).model_copy(
        update={"signing_key": SecretStr(key) if key else None})
    store = Store.from_settings(settings, cache_dir=tmp_path / "cache")
    return Fleet(settings, store, StoreRegistry(store), summary, posterior)


@pytest.fixture
def fleet(tmp_path, worker_fit) -> Fleet:
    return fleet_of(tmp_path, worker_fit)


def test_a_summary_a_worker_wrote_verifies_and_records_its_posteriors_hash(worker_fit):
    summary, posterior, store = worker_fit
    assert summary.provenance is not None and len(summary.provenance.signature) == 64
    assert summary.provenance.posterior_sha256 == hashlib.sha256(posterior).hexdigest()
    assert Catalog(store).read(summary.summary_uri).model_dump_json() == summary.model_dump_json()  # NaN != NaN
    assert [s.job_id for s in Catalog(store).summaries()] == [summary.job_id]
    other = Store(store.url, signing_key="another-key")
    with pytest.raises(Unverified, match="does not verify"):
        Catalog(other).read(summary.summary_uri)


D0 = date(2024, 6, 1)
LEGIT, FORGED, OTHER = "cj-legit-0001", "cj-forged-0001", "cj-other-0001"


def _forge_unsigned(fleet: Fleet) -> None:
    fleet.write(FORGED, data_through=D0, key=None, calq_version=MARK)


def _forge_with_another_key(fleet: Fleet) -> None:
    fleet.write(FORGED, data_through=D0, key="a-producer-guessed-this", calq_version=MARK)


def _forge_by_editing_a_signed_summary(fleet: Fleet) -> None:
    uri = fleet.write(FORGED, data_through=D0 - timedelta(days=30), calq_version=MARK)
    document = json.loads(fleet.store.get_bytes(uri))
    document["data_through"] = D0.isoformat()  # the signature no longer covers what it says
    fleet.store.put_bytes(fleet.store.key_of(uri), json.dumps(document).encode())


def _signed_posterior_elsewhere(target: str):
    def forge(fleet: Fleet) -> None:  # signed with the fleet's own key: the URI check holds by itself
        fleet.write(FORGED, data_through=D0, posterior_uri=target.format(store=fleet.store.url), calq_version=MARK)
    return forge


def _signed_summary_at_another_jobs_key(fleet: Fleet) -> None:
    fleet.write(OTHER, data_through=D0, at=FORGED, calq_version=MARK)  # a valid summary of OTHER, at FORGED's key


FORGERIES = {
    "unsigned": _forge_unsigned,
    "another-key": _forge_with_another_key,
    "edited-after-signing": _forge_by_editing_a_signed_summary,
    "posterior-etc-passwd": _signed_posterior_elsewhere("file:///etc/passwd"),
    "posterior-other-bucket": _signed_posterior_elsewhere("s3://another-bucket/calq/posteriors/all/cj-forged-0001.nc"),
    "posterior-another-jobs": _signed_posterior_elsewhere("{store}/posteriors/all/cj-legit-0001.nc"),
    "at-another-jobs-key": _signed_summary_at_another_jobs_key,
}


@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
def test_a_planted_summary_is_skipped_by_every_reader(fleet, forge, caplog):
    fleet.write(LEGIT, data_through=D0 - timedelta(days=10))  # what a worker wrote: older data
    forge(fleet)  # nearer the job below, newer for latest: chosen everywhere if it were trusted
    caplog.set_level(logging.WARNING)

    # the catalog: summaries, lookups by id (the report, the client), latest rebuilt from the store
    assert [s.job_id for s in fleet.catalog.summaries()] == [LEGIT]
    with pytest.raises(NotFound):
        fleet.catalog.summary(FORGED)
    assert {p.job_id for p in fleet.catalog.latest_pointers().values()} == {LEGIT}
    # reindex: latest rebuilt, records repaired; no succeeded record for a job never submitted
    assert fleet.registry.rebuild_latest(fleet.catalog) > 0
    assert {p.job_id for p in fleet.registry.latest_all().values()} == {LEGIT}
    assert repair_from_store(fleet.registry, fleet.catalog) == [LEGIT]
    assert fleet.registry.repair(FORGED, fleet.catalog) is None
    assert fleet.registry.find(FORGED) is None and fleet.registry.find(OTHER) is None
    # warm start: the worker's fit, never the planted one
    warm = find_warm_source(fleet.warm_job(D0 + timedelta(days=1)), fleet.store)
    assert warm is not None and warm.job_id == LEGIT

    forged_key = summary_key("all", FORGED)
    assert forged_key in caplog.text  # skipped with a warning naming its key...
    assert MARK not in caplog.text and "root:" not in caplog.text  # ...never its content
    assert "Traceback" not in caplog.text


def test_a_verified_summarys_replaced_posterior_is_never_decoded(fleet, caplog):
    uri = fleet.write(LEGIT, data_through=D0 - timedelta(days=10))
    summary = fleet.catalog.read(uri)
    assert "posterior" in fleet.catalog.posterior(summary, groups=["posterior"]).groups()  # as the worker wrote it
    key = posterior_key("all", LEGIT)
    fleet.store.put_bytes(key, fleet.posterior[:-1] + bytes([fleet.posterior[-1] ^ 1]))  # one bit, same size
    caplog.set_level(logging.WARNING)
    assert find_warm_source(fleet.warm_job(D0), fleet.store) is None  # cold, not failed
    assert "starting cold" in caplog.text and "not the ones its signed summary records" in caplog.text
    with pytest.raises(Unverified, match="not the ones its signed summary records"):
        fleet.catalog.posterior(summary)  # what a report or client reading the posterior goes through
    with pytest.raises(Unverified, match="not signed"):
        fleet.catalog.posterior(summary.model_copy(update={"provenance": None}))


def test_without_a_key_every_summary_at_its_own_key_is_trusted_as_before(tmp_path, worker_fit):
    fleet = fleet_of(tmp_path, worker_fit, key=None)
    fleet.write(LEGIT, data_through=D0 - timedelta(days=10))
    fleet.write(FORGED, data_through=D0, key=None)
    summaries = list(fleet.catalog.summaries())
    assert [s.job_id for s in summaries] == [FORGED, LEGIT]
    assert fleet.catalog.posterior(summaries[0], groups=["posterior"]) is not None  # nothing to check it against
    warm = find_warm_source(fleet.warm_job(D0 + timedelta(days=1)), fleet.store)
    assert warm is not None and warm.job_id == FORGED
    assert repair_from_store(fleet.registry, fleet.catalog) == [FORGED, LEGIT]


def test_without_a_key_a_posterior_outside_the_store_is_still_refused(tmp_path, worker_fit, caplog):
    fleet = fleet_of(tmp_path, worker_fit, key=None)
    fleet.write(FORGED, data_through=D0, key=None, posterior_uri="file:///etc/passwd")
    assert list(fleet.catalog.summaries()) == []
    assert find_warm_source(fleet.warm_job(D0 + timedelta(days=1)), fleet.store) is None
    assert "names a summary or posterior elsewhere" in caplog.text and "passwd" not in caplog.text


def test_calq_reindex_latest_and_result_skip_a_planted_summary(fleet):
    fleet.write(LEGIT, data_through=D0 - timedelta(days=10))
    fleet.write(FORGED, data_through=D0, key=None, calq_version=MARK)  # what a producer holding the store's key can write
    environ = calq_environ(CALQ_STORAGE_URL=fleet.store.url, CALQ_SIGNING_KEY=KEY)

    def calq(*args: str) -> subprocess.CompletedProcess:
        return run_calq(environ, Path.cwd(), *args, check=False, timeout=120)

    reindexed = calq("reindex", "--json")
    assert reindexed.returncode == 0, reindexed.stderr[-2000:]
    assert json.loads(reindexed.stdout)["repaired"] == 1  # the worker's job only: no record for one never submitted
    assert fleet.registry.find(FORGED) is None
    latest = calq("latest", "intermediate", "--json")
    assert latest.returncode == 0, latest.stderr[-2000:]
    assert json.loads(latest.stdout)["job_id"] == LEGIT
    planted = calq("result", FORGED)
    assert planted.returncode != 0 and "Traceback" not in planted.stderr
    for result in (reindexed, latest, planted):
        assert MARK not in result.stdout + result.stderr


@pytest.mark.integration
def test_on_s3_a_planted_summary_is_skipped_and_a_signed_one_warm_starts(s3_settings, tmp_path, worker_fit):
    fleet = fleet_of(tmp_path, worker_fit, settings=s3_settings)
    fleet.write(LEGIT, data_through=D0 - timedelta(days=10))
    fleet.write(FORGED, data_through=D0, key="not-the-fleet-key")
    assert [s.job_id for s in fleet.catalog.summaries()] == [LEGIT]
    warm = find_warm_source(fleet.warm_job(D0 + timedelta(days=1)), fleet.store)
    assert warm is not None and warm.job_id == LEGIT and warm.posterior_uri.startswith("s3://")
    fleet.store.put_bytes(posterior_key("all", LEGIT), bytes(len(fleet.posterior)))  # replaced after signing
    with pytest.raises(Unverified):
        fleet.catalog.posterior(fleet.catalog.summary(LEGIT))

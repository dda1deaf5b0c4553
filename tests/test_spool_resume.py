"""A process killed while its finished draws waited for the store loses nothing.

A real process fits a job and dies (``os._exit``, no clean-up) in the
middle of uploading the posterior; the next run of the job on this host
writes the spooled results without fitting again. Spooled files that are
not the job's, or not readable, are discarded and the job is fitted.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared.contract.control import JobControl
from shared.contract.job import CalibrationJob
from shared.contract.settings import RecoverySettings, Settings
from shared.contract.summary import CalibrationSummary
from shared.data.dataset import save_dataset
from shared.data.synth import synthesize
from shared.jobs import run as runner
from shared.jobs.spool import spool_paths
from shared.storage.store import Store

ROOT = Path(__file__).resolve().parent.parent
SAMPLER = {"warmup": 60, "samples": 60, "chains": 2, "seed": 0}

KILLED_WHILE_WRITING = textwrap.dedent("""
    import os, sys
    from shared.fit.device import use_host_devices
    use_host_devices()
    from shared.contract.job import CalibrationJob
    from shared.contract.settings import Settings
    from shared.jobs.run import run_job
    from shared.storage.store import Store

    settings = Settings.model_validate_json(sys.argv[1])
    job = CalibrationJob.model_validate_json(sys.argv[2])

    def die(self, *args, **kwargs):  # the process is killed while the posterior goes up: no clean-up runs
        os._exit(137)

    Store.put_file = die
    run_job(job, store=Store.from_settings(settings), settings=settings)
""")


@pytest.fixture
def setup(tmp_path):
    settings = Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None, warm_start=False,
                        recovery=RecoverySettings(spool_dir=tmp_path / "spool"))
    store = Store.from_settings(settings)
    uri, sha = store.upload_dataset(save_dataset(synthesize(seasons=1, scenarios=100, seed=2), tmp_path / "season.nc"))
    job = CalibrationJob(archetype="road_course", dataset_uri=uri, dataset_sha256=sha, events=("top_5",), sampler=SAMPLER)
    return settings, store, job


def kill_while_writing(settings: Settings, job: CalibrationJob) -> None:
    Settings.model_config["env_file"] = None
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_WRITING, settings.model_dump_json(), job.model_dump_json()],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu",
                                                                   "PYTHONPATH": str(ROOT), "HOME": str(Path.home())},
    )
    assert result.returncode == 137, result.stderr[-3000:]


def never_fit(*args, **kwargs):
    raise AssertionError("the job was fitted again")


def test_the_next_run_writes_the_spooled_draws_instead_of_fitting_again(setup, monkeypatch, caplog):
    settings, store, job = setup
    caplog.set_level(logging.INFO)
    kill_while_writing(settings, job)
    posterior, summary_file = spool_paths(settings.recovery, job.job_id)
    assert posterior.is_file() and summary_file.is_file()
    assert [u for u in store.list("posteriors") if job.job_id in u] == []  # nothing reached the store

    spooled = CalibrationSummary.model_validate_json(summary_file.read_text())
    monkeypatch.setattr(runner, "calibrate", never_fit)
    phases = []
    summary = runner.run_job(job, store=store, settings=settings, control=JobControl(on_progress=phases.append))
    assert summary == spooled == CalibrationSummary.model_validate_json(store.get_bytes(summary.summary_uri))
    assert summary.posterior_uri == store.uri(f"posteriors/road_course/{job.job_id}.nc")
    assert sorted(Path(u).suffix for u in store.list("posteriors") if job.job_id in u) == [".json", ".nc"]
    idata = store.get_inference_data(summary.posterior_uri)
    assert idata.posterior.attrs["job_id"] == job.job_id and idata.posterior.sizes["draw"] == summary.attempts[-1].samples
    assert not posterior.exists() and not summary_file.exists()
    assert "writing them instead of fitting again" in caplog.text
    assert [p.phase for p in phases] == ["write", "write", "write"]


@pytest.mark.parametrize("spoiled", ["garbage", "another job", "empty posterior"])
def test_spooled_files_that_are_not_the_jobs_are_discarded_and_the_job_fitted(setup, spoiled, caplog):
    settings, store, job = setup
    fake = _a_summary_of(store, settings, job) if spoiled != "garbage" else None
    posterior, summary_file = spool_paths(settings.recovery, job.job_id)
    posterior.parent.mkdir(parents=True, exist_ok=True)
    posterior.write_bytes(b"" if spoiled == "empty posterior" else b"CDF\x01")
    if spoiled == "garbage":
        summary_file.write_text("{not json")
    elif spoiled == "another job":
        summary_file.write_text(fake.model_copy(update={"job_id": "cj-000000000000000000000000"}).model_dump_json())
    else:
        summary_file.write_text(fake.model_dump_json())
    summary = runner.run_job(job, store=store, settings=settings)
    assert summary.job_id == job.job_id and summary.attempts  # fitted
    assert "discarding unreadable spooled results" in caplog.text
    assert not posterior.exists() and not summary_file.exists()


def _a_summary_of(store: Store, settings: Settings, job: CalibrationJob) -> CalibrationSummary:
    """A real summary of ``job``, from a fit in a scratch store (then the store is emptied of it)."""
    summary = runner.run_job(job, store=store, settings=settings)
    for uri in store.list("posteriors"):
        store.delete(uri)
    return summary

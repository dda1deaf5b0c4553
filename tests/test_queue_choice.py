"""Which queue a job waits in: a small interactive job is not worth a GPU (shared.jobs.lanes.routed_queue)."""

from __future__ import annotations

from datetime import date

from producer.client import job_rows
from shared.contract.job import CalibrationJob
from shared.data.synth import synthesize
from shared.fit.calibrate import prepare
from shared.jobs.lanes import GPU_MIN_ROWS, routed_queue


def test_a_gpu_fleet_sends_small_jobs_to_the_cpu_queue_and_large_ones_to_the_gpu():
    assert routed_queue("gpu", lambda: GPU_MIN_ROWS - 1) == "calq.cpu"
    assert routed_queue("calq.gpu", lambda: GPU_MIN_ROWS) == "calq.gpu"


def test_a_cpu_fleet_moves_nothing_and_counts_no_rows():
    def never() -> int:
        raise AssertionError("rows counted on a CPU fleet")

    assert routed_queue("calq.cpu", never) == "calq.cpu"


def test_a_jobs_rows_are_its_events_times_its_entered_race_driver_pairs():
    ds = synthesize(seasons=1, scenarios=50, seed=3)
    for archetype, as_of in (("intermediate", None), ("all", date(2024, 9, 5))):
        job = CalibrationJob(archetype=archetype, dataset_uri="file:///d.nc", dataset_sha256="0" * 64,
                             events=("top_5", "top_10"), as_of=as_of)
        assert job_rows(ds, job) == prepare(ds, job).rows.n_rows

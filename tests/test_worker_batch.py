"""A backfill's jobs as one batch message to a real ``calq worker`` (worker.batch, shared.jobs.batch).

Its own redis-server and one CPU worker process (tests.services.local_fleet),
a local store shared by the producer and the worker.
"""

from __future__ import annotations

from datetime import date

import pytest

from producer.backfill import Backfill
from producer.client import CalibrationClient
from shared.contract.summary import ConvergenceCriteria
from tests.services import LENIENT, convergence_environ, local_fleet, season_file

pytestmark = pytest.mark.integration

TINY = {"warmup": 80, "samples": 80, "chains": 2}


def test_a_backfill_goes_as_one_batch_and_each_job_gets_its_record_summary_and_posterior(tmp_path):
    dataset = season_file(tmp_path, scenarios=100, seed=3)
    with local_fleet(tmp_path, CALQ_BATCH__MAX_JOBS="8", **convergence_environ(LENIENT)) as fleet:
        settings = fleet.settings.model_copy(update={"convergence": ConvergenceCriteria(**LENIENT)})
        client = CalibrationClient(settings)
        assert client.batch_jobs == settings.batch.max_jobs == 32  # the producer's own cap
        plan = Backfill(client, dataset, start=date(2024, 1, 1), end=date(2024, 6, 30), archetypes=["superspeedway"],
                        events="top_5", sampler=TINY)
        windows = plan.windows()
        assert 3 <= len(windows) <= 8, len(windows)
        outcomes = plan.run(windows=windows, max_in_flight=len(windows), timeout=600)  # room for them all: one batch
        log = (tmp_path / "worker.log").read_text()
        assert [o.state for o in outcomes] == ["succeeded"] * len(windows), (outcomes, log[-3000:])
        assert "calq.calibrate_batch" in log and "calq.calibrate[" not in log  # one batch message, no single ones
        for window in windows:
            record = client.status(window.job.job_id)
            assert record.state.value == "succeeded" and record.deliveries == 1
            summary = client.result(window.job.job_id)
            assert summary.job_id == window.job.job_id and summary.as_of == window.as_of
            posterior = client.store.get_inference_data(summary.posterior_uri)
            assert posterior.posterior.sizes["draw"] == TINY["samples"]

"""``calq evaluate --fleet``: the backfill's jobs go to a real ``calq worker``, the evaluation waits for them.

Real redis-server (fixture), one CPU worker process, a local store shared by
the producer and the worker.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from producer.client import CalibrationClient
from shared.contract.settings import Settings
from shared.contract.summary import ConvergenceCriteria
from shared.data.dataset import save_dataset
from shared.data.synth import synthesize
from tests.services import calq_environ, calq_worker, convergence_environ, run_calq

pytestmark = pytest.mark.integration

TINY = ["--warmup", "80", "--samples", "80", "--chains", "2"]
LENIENT = {"min_ess_bulk": 10, "max_rhat": 1.2, "max_divergences": 5}
ARGS = ["--from", "2024-01-01", "--to", "2024-04-21", "--archetypes", "superspeedway", "--events", "top_5"]


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-fleet")
    environ = calq_environ(CALQ_BROKER_URL=redis_server.url, CALQ_STORAGE_URL=str(root / "store"),
                           **convergence_environ(LENIENT))
    settings = Settings(broker_url=redis_server.url, storage_url=str(root / "store"), compile_cache_dir=None,
                        convergence=ConvergenceCriteria(**LENIENT))
    with calq_worker(environ, root):
        yield environ, root, settings


def calq(fleet, *args) -> subprocess.CompletedProcess:
    environ, root, _ = fleet
    return run_calq(environ, root, *args, explain=root / "worker.log")


def test_evaluate_on_the_fleet_runs_the_jobs_on_the_worker_and_scores_the_races(fleet):
    _, root, settings = fleet
    dataset = save_dataset(synthesize(seasons=1, scenarios=100, seed=3), root / "season.nc")
    (record,) = json.loads(calq(fleet, "evaluate", str(dataset), *ARGS, *TINY, "--fleet", "--json").stdout)
    # Daytona opens the season unscored; Atlanta and Talladega are scored by fits on the races before them
    assert record["races"] == 2 and record["unscored_races"] == 1 and record["rows"] == 2 * 38
    client = CalibrationClient(settings)
    for race in record["per_race"]:
        status = client.status(race["job_id"])
        assert status.state.value == "succeeded" and status.worker.startswith("calq-cpu0@")
    # the worker ran the later window after the earlier one, and warm-started it from that fit
    first, second = sorted((client.result(r["job_id"]) for r in record["per_race"]), key=lambda s: s.data_through)
    assert first.warm_start is None
    assert second.warm_start is not None and second.warm_start.job_id == first.job_id
    assert second.attempts[0].warm_start
    # resumable: a second run finds every job done and scores the same
    again = json.loads(calq(fleet, "evaluate", str(dataset), *ARGS, *TINY, "--fleet", "--json").stdout)
    assert again == [record]
    assert all(client.status(r["job_id"]).deliveries == 1 for r in record["per_race"])

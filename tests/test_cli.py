"""The README's commands, run as a newcomer runs them (subprocesses, embedded mode), with tiny settings."""

from __future__ import annotations

import json
import subprocess

import arviz as az
import pytest

from shared.contract.summary import CalibrationSummary
from tests.services import calq_environ, convergence_environ, run_calq

TINY = ["--warmup", "60", "--samples", "60", "--chains", "2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    # tiny runs cannot reach 400 effective draws; lenient criteria let them count as converged
    return calq_environ(CALQ_STORAGE_URL=str(root / "store"), **convergence_environ()), root


def calq(env, *args, check=True) -> subprocess.CompletedProcess:
    environ, root = env
    return run_calq(environ, root, *args, check=check)


@pytest.fixture(scope="module")
def dataset(env):
    calq(env, "synth", "season.nc", "--seasons", "1", "--scenarios", "200", "--seed", "1")
    return env[1] / "season.nc"


@pytest.fixture(scope="module")
def calibrated(env, dataset):
    result = calq(env, "calibrate", str(dataset), "--archetype", "road_course", "--events", "top_5,top_10", *TINY, "--json")
    return CalibrationSummary.model_validate_json(result.stdout)


def test_synth_writes_a_valid_dataset(dataset):
    from shared.data.dataset import open_dataset

    ds = open_dataset(dataset)
    assert ds.sizes["race"] == 36 and ds.sizes["scenario"] == 200


def test_report_scores_the_raw_forecasts(env, dataset):
    report = json.loads(calq(env, "report", str(dataset), "--json").stdout)
    assert {r["archetype"] for r in report["events"]} == {"superspeedway", "intermediate", "short_track", "road_course"}
    assert len(report["ensemble"]) == 4 and report["joint_events"]


def test_calibrate_json_is_a_summary_with_a_readable_posterior(calibrated):
    s = calibrated.model_dump(mode="json")
    for key in ("job_id", "archetype", "converged", "posterior_uri"):
        assert key in s
    for key in ("max_rhat", "min_ess_bulk", "divergences"):
        assert key in s["diagnostics"]
    assert calibrated.posterior_uri.startswith("file://")
    idata = az.from_netcdf(calibrated.posterior_uri.removeprefix("file://"))
    assert idata.posterior.attrs["job_id"] == calibrated.job_id


def test_apply_calibrates_new_probabilities(env, calibrated):
    track = calibrated.tracks["road_course"][0]
    out = calq(env, "apply", calibrated.posterior_uri, "--track", track, "--event", "top_5", "--p", "0.05,0.2,0.5", "--json")
    rows = json.loads(out.stdout)
    assert [r["p"] for r in rows] == [0.05, 0.2, 0.5]
    assert all(set(r) == {"p", "mean", "low", "high", "track_seen"} and r["low"] <= r["mean"] <= r["high"] for r in rows)
    assert all(r["track_seen"] is True for r in rows)  # a track of the fit


def test_status_result_and_latest_read_the_embedded_records(env, calibrated):
    status = json.loads(calq(env, "status", calibrated.job_id, "--json").stdout)
    assert status["state"] == "succeeded" and status["posterior_uri"] == calibrated.posterior_uri
    result = CalibrationSummary.model_validate_json(calq(env, "result", calibrated.job_id, "--json").stdout)
    assert result == calibrated
    latest = CalibrationSummary.model_validate_json(calq(env, "latest", "road_course", "--json").stdout)
    assert latest.job_id == calibrated.job_id


def test_submitting_the_same_job_again_runs_nothing(env, dataset, calibrated):
    out = calq(env, "submit", str(dataset), "--archetype", "road_course", "--events", "top_5,top_10", *TINY, "--json")
    assert json.loads(out.stdout) == {"job_id": calibrated.job_id}


@pytest.mark.integration
def test_submit_on_the_batch_lane_waits_in_the_batch_queue(env, dataset, redis_url):
    import redis

    environ, root = env
    fleet = ({**environ, "CALQ_BROKER_URL": redis_url, "CALQ_DEFAULT_QUEUE": "calq.cpu"}, root)
    batch = json.loads(calq(fleet, "submit", str(dataset), "--archetype", "intermediate", *TINY, "--seed", "11",
                            "--lane", "batch", "--json").stdout)["job_id"]
    interactive = json.loads(calq(fleet, "submit", str(dataset), "--archetype", "intermediate", *TINY, "--seed", "12",
                                  "--json").stdout)["job_id"]
    queued = redis.Redis.from_url(redis_url)
    in_queue = lambda name: [json.loads(m)["headers"]["id"] for m in queued.lrange(name, 0, -1)]  # noqa: E731
    assert in_queue("calq.cpu.batch") == [batch]
    assert in_queue("calq.cpu") == [interactive]


def test_a_broken_dataset_is_refused_with_its_reasons(env, dataset):
    import numpy as np

    from shared.data.dataset import open_dataset, save_dataset

    ds = open_dataset(dataset)
    ds["finish_position"][0, :] = np.where(np.isnan(ds["finish_position"][0, :]), np.nan, 3.0)
    save_dataset(ds, env[1] / "broken.nc")
    result = calq(env, "calibrate", str(env[1] / "broken.nc"), "--archetype", "superspeedway", *TINY, check=False)
    assert result.returncode != 0
    assert "invalid calibration dataset" in result.stderr and "position 3" in result.stderr


def test_unknown_job_is_not_found(env):
    result = calq(env, "status", "cj-000000000000000000000000", check=False)
    assert result.returncode == 1 and "not found" in result.stderr


def test_demo_calibrates_every_archetype(env):
    out = calq(env, "demo", "--seasons", "1", "--scenarios", "100", *TINY, "--json")
    summaries = [CalibrationSummary.model_validate(s) for s in json.loads(out.stdout)]
    assert sorted(s.archetype for s in summaries) == ["intermediate", "road_course", "short_track", "superspeedway"]

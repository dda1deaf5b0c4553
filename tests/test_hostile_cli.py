"""Hostile files through the CLI as a producer runs it (subprocesses, embedded mode; issue 8).

``calq report`` and ``calq calibrate`` on a FIFO, a folder, a file declaring
64 GB, a dataset whose ids hold rich markup: each ends with a clear message
and exit code, quickly, with no traceback; ``calq synth`` never writes fewer
scenarios than the minimum; ``calq config`` masks every secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import netCDF4
import pytest

from shared.data.dataset import save_dataset
from shared.data.synth import synthesize
from tests.services import calq_environ, free_port, run_calq

MARKUP = "r[/red][link=x]x[/link][/]"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-cli")
    return calq_environ(CALQ_STORAGE_URL=str(root / "store")), root


def calq(env, *args: str, timeout: float = 120, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ, root = env
    return run_calq({**environ, **(extra or {})}, root, *args, check=False, timeout=timeout)


def clean_failure(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "MarkupError" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr[-3000:])


def test_report_on_a_fifo_a_folder_and_a_huge_header_ends_quickly(env):
    _, root = env
    fifo = root / "pipe.nc"
    os.mkfifo(fifo)
    folder = root / "folder.nc"
    folder.mkdir()
    huge = root / "huge.nc"
    with netCDF4.Dataset(huge, "w") as nc:
        for name, size in (("race", 2000), ("scenario", 20_000), ("driver", 200)):
            nc.createDimension(name, size)
        nc.createVariable("sim_position", "f8", ("race", "scenario", "driver"), zlib=True, chunksizes=(1, 1000, 200))
    for path, needle in ((fifo, "not a regular file but a FIFO"), (folder, "not a file but a folder"),
                         (huge, "limits.max_decoded_bytes")):
        start = time.monotonic()
        result = calq(env, "report", str(path), timeout=60)  # a FIFO used to block forever
        clean_failure(result, needle)
        assert time.monotonic() - start < 60


def test_markup_in_race_ids_and_track_names_is_printed_as_text(env):
    _, root = env
    ds = synthesize(seasons=1, scenarios=20, seed=2, drivers_per_race=8, pool_size=10)
    races = ds["race"].values.astype(object)
    races[0] = MARKUP
    tracks = ds["track"].values.astype(object)
    tracks[0] = "[bold]Daytona[/bold][link=http://x]"
    good = save_dataset(ds.assign_coords(race=races, track=("race", tracks)), root / "markup.nc")
    report = calq(env, "report", str(good))
    assert report.returncode == 0, report.stderr[-3000:]
    races[1] = MARKUP  # duplicated: the reason quotes it
    bad = save_dataset(ds.assign_coords(race=races), root / "markup-dup.nc")
    result = calq(env, "calibrate", str(bad), "--archetype", "superspeedway", "--warmup", "10", "--samples", "10",
                  "--chains", "1")
    clean_failure(result, MARKUP, "duplicated race ids")


def test_synth_never_writes_fewer_than_the_minimum_scenarios(env):
    result = calq(env, "synth", "few.nc", "--scenarios", "5")
    assert result.returncode == 2 and "greater than or equal to 20" in result.stderr, result.stderr
    assert not (env[1] / "few.nc").exists()


def test_calq_config_masks_every_secret(env):
    secret = "s3cr3t-" + "x" * 12
    nobody = f"127.0.0.1:{free_port()}"  # `calq config` connects to nothing; if it did, nothing listens here
    extra = {"CALQ_BROKER_URL": f"redis://:{secret}@{nobody}/0", "CALQ_RESULT_BACKEND":
             f"redis://user:{secret}@{nobody}/1", "CALQ_S3__SECRET_ACCESS_KEY": secret,
             "CALQ_STORAGE_URL": "s3://bucket/prefix", "CALQ_S3__ACCESS_KEY_ID": "id"}
    result = calq(env, "config", extra=extra)
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    shown = json.loads(result.stdout)
    assert shown["s3"]["secret_access_key"] == "***" and "***" in shown["broker_url"]
    broken = calq(env, "config", extra={**extra, "CALQ_JOB_TIME_LIMIT_S": secret})
    assert broken.returncode == 2 and "CALQ_JOB_TIME_LIMIT_S" in broken.stderr  # named as the variable to fix
    assert secret not in broken.stdout + broken.stderr  # invalid settings are named, their values never shown

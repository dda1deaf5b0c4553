"""Listings at 80 columns (issue 22): ``calq jobs`` keeps whole job ids and one line per job.

The backfill's outcome table at 80 columns is in tests/test_ctrl_c.py, beside the Ctrl-C that prints it.
"""

from __future__ import annotations

import re
from pathlib import Path

from producer.client import CalibrationClient
from shared.contract.job import Progress
from shared.contract.settings import Settings
from shared.data.synth import synthesize
from tests.services import calq_environ, run_calq

ROOT = Path(__file__).resolve().parents[1]
#: As long as a fleet worker's name gets: its queue, process and pid at a long host name.
WORKER = "calq-cpu0-12345@worker-host-with-a-long-name.internal.example"


def test_calq_jobs_at_80_columns_keeps_whole_ids_and_one_line_per_job(tmp_path):
    client = CalibrationClient(Settings(storage_url=str(tmp_path / "calq-store"), compile_cache_dir=None))
    ds = synthesize(seasons=1, scenarios=10, seed=1, drivers_per_race=6, pool_size=8)
    ids = []
    for seed, archetype in enumerate(["superspeedway", "intermediate", "short_track", "road_course"]):
        job = client.make_job(ds, archetype, seed=seed)
        client.registry.claim(job)
        ids.append(job.job_id)
    client.registry.mark_running(ids[0], worker=WORKER)
    client.registry.progress(ids[0], Progress(phase="sampling", fraction=0.45, draws_done=450, draws_total=1000))
    client.registry.cancel(ids[0], "not needed")  # running (cancelling): the longest state
    client.registry.mark_running(ids[1], worker=WORKER)
    client.registry.fail(ids[1], "made to fail by the test")

    environ = calq_environ(COLUMNS="80", CALQ_STORAGE_URL=str(tmp_path / "calq-store"))
    shown = run_calq(environ, tmp_path, "jobs", check=False, timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, shown.stdout
    assert "…" not in shown.stdout
    parts = shown.stdout.count("jobs (newest first)")
    rows = [line for line in lines if line.startswith("│")]
    assert parts >= 1 and len(rows) == 4 * parts, shown.stdout  # one line per job in every part: nothing wrapped
    for job_id in ids:  # every part names each job by its whole id
        assert sum(re.match(rf"│ {job_id} ", line) is not None for line in rows) == parts, (job_id, shown.stdout)
    for whole in ("running (cancelling)", "cancelling (sampling 450/1000) 62%", WORKER, "failed", "queued", "superspeedway"):
        assert whole in shown.stdout, whole  # each value whole, on one line
    # the worker is too long to stand beside the id in 80 columns: below the tables, whole, under its job's id
    assert f"{ids[0]} on\n  {WORKER}\n" in shown.stdout and f"{ids[1]} on\n  {WORKER}\n" in shown.stdout
    wide = run_calq({**environ, "COLUMNS": "200"}, tmp_path, "jobs", check=False, timeout=120)
    assert wide.returncode == 0 and " on\n" not in wide.stdout and wide.stdout.count("jobs (newest first)") == 1
    assert sum(WORKER in line and ids[0] in line for line in wide.stdout.splitlines()) == 1  # one table, one row

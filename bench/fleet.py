"""Benchmark the fleet path: queue latency, throughput and Redis round trips per job.

It starts its own ``redis-server`` on a free port and one ``calq worker
--gpus none`` (a CPU worker, solo pool) on a local store, warms the worker
with one job, then measures:

- **enqueue → start latency** with an idle warm worker: jobs submitted one
  at a time; ``started_at − submitted_at`` from calq's job records;
- **throughput**: 50 small jobs submitted at once through the one worker;
- **Redis round trips per job**: commands the server counted
  (``INFO commandstats``) during the throughput run, per job.

Small jobs: one short-track season, 2 chains × (100 + 100) draws, so the
queueing overhead is visible next to the sampling.

Usage: ``python bench/fleet.py [--latency-jobs 20] [--jobs 50] [--json bench/results/fleet.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import print_measures, save_json  # noqa: E402
from tests.services import LocalFleet, local_fleet, season_file  # noqa: E402

SAMPLER = {"warmup": 100, "samples": 100, "chains": 2}


@contextlib.contextmanager
def season_on_a_fleet(prefix: str) -> Iterator[tuple[LocalFleet, Any, Path, str]]:
    """In a new temporary folder, ``tests.services.local_fleet`` (its own compile cache) and a season uploaded to it.

    Yields the fleet, a client on it, the season's file (200 scenarios, seed 9) and its ``dataset_ref``.
    """
    from producer.client import CalibrationClient

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, \
            local_fleet(Path(tmp), CALQ_COMPILE_CACHE_DIR=str(Path(tmp) / "jax")) as fleet:
        client = CalibrationClient(fleet.settings)
        dataset = season_file(Path(tmp), scenarios=200, seed=9)
        yield fleet, client, dataset, client.upload(dataset)


def commands(client) -> int:
    return sum(v["calls"] for k, v in client.info("commandstats").items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fleet.json")
    args = parser.parse_args()

    import redis

    with season_on_a_fleet("calq-bench-fleet-") as (fleet, client, dataset, ref):
        def job(seed: int):
            return client.make_job(dataset, "short_track", events="top_5,top_10", seed=seed,
                                   dataset_ref=ref, **SAMPLER)

        t = time.perf_counter()
        client.wait(client.submit_job(job(0)), timeout=600)
        warmup_s = time.perf_counter() - t

        latencies = []
        for seed in range(1, args.latency_jobs + 1):
            job_id = client.submit_job(job(seed))
            client.wait(job_id, timeout=600)
            record = client.status(job_id)
            latencies.append((record.started_at - record.submitted_at).total_seconds())

        r = redis.Redis.from_url(fleet.url)
        before = commands(r)
        t0 = time.perf_counter()
        ids = [client.submit_job(job(1000 + i)) for i in range(args.jobs)]
        submit_s = time.perf_counter() - t0
        for job_id in ids:
            client.wait(job_id, timeout=1800)
        elapsed = time.perf_counter() - t0
        round_trips = (commands(r) - before) / args.jobs
        records = [client.status(j) for j in ids]
        run_s = [(rec.finished_at - rec.started_at).total_seconds() for rec in records]

    result = {
        "warmup_job_s": warmup_s,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "latency_jobs": len(latencies),
        "jobs": args.jobs,
        "submit_s": submit_s,
        "elapsed_s": elapsed,
        "jobs_per_minute": 60 * args.jobs / elapsed,
        "mean_run_s": float(np.mean(run_s)),
        "redis_commands_per_job": round_trips,
    }
    rows = [
        ("first job (compile, cold worker)", f"{warmup_s:.2f} s"),
        (f"enqueue → start, idle warm worker, p50 ({len(latencies)} jobs)", f"{result['latency_p50_s'] * 1000:.0f} ms"),
        ("enqueue → start, p99", f"{result['latency_p99_s'] * 1000:.0f} ms"),
        (f"throughput, {args.jobs} jobs, one worker", f"{result['jobs_per_minute']:.1f} jobs/min"),
        ("mean run time per job (start → finish)", f"{result['mean_run_s']:.2f} s"),
        (f"submitting {args.jobs} jobs", f"{submit_s:.2f} s"),
        ("Redis commands per job (producer + worker)", f"{round_trips:.0f}"),
    ]
    print_measures(rows)
    save_json(args.json, result)


if __name__ == "__main__":
    main()

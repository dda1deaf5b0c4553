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
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLER = {"warmup": 100, "samples": 100, "chains": 2}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int, workdir: Path, *, appendonly: bool = False) -> subprocess.Popen:
    """A redis-server on 127.0.0.1:``port``, answering before this returns (AOF on with ``appendonly``)."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH (apt-get install redis-server)")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes" if appendonly else "no",
         "--maxmemory-policy", "noeviction", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.1)
    sys.exit("redis-server did not start")


def commands(client) -> int:
    return sum(v["calls"] for k, v in client.info("commandstats").items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fleet.json")
    args = parser.parse_args()

    import redis

    from producer.client import CalibrationClient
    from shared.contract.settings import Settings
    from shared.data.dataset import save_dataset
    from shared.data.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="calq-bench-fleet-") as tmp:
        tmp = Path(tmp)
        port = free_port()
        url = f"redis://127.0.0.1:{port}/0"
        redis_proc = start_redis(port, tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALQ_")}
        env.update(CALQ_BROKER_URL=url, CALQ_STORAGE_URL=str(tmp / "store"), CALQ_COMPILE_CACHE_DIR=str(tmp / "jax"))
        worker = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "worker", "--gpus", "none"],
            env=env, cwd=ROOT, stdout=open(tmp / "worker.log", "w"), stderr=subprocess.STDOUT,
        )
        try:
            client = CalibrationClient(Settings(broker_url=url, storage_url=str(tmp / "store"), compile_cache_dir=None))
            dataset = tmp / "season.nc"
            save_dataset(synthesize(seasons=1, scenarios=200, seed=9), dataset)
            ref = client.upload(dataset)

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

            r = redis.Redis.from_url(url)
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
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=120)
            redis_proc.terminate()
            redis_proc.wait()

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
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}} | value")
    print(f"{'-' * width} | -----")
    for k, v in rows:
        print(f"{k:<{width}} | {v}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

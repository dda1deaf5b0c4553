"""Benchmark the calibration API on loopback, and the lanes behind it.

It starts its own ``redis-server`` on a free port, one CPU worker
(bench/faults.py's launcher) and ``calq serve`` in its own process on a
local store, fits one job so ``latest`` has a posterior (4 chains × 1,000
draws, the default sampler's size), then:

- **API table**: for ``POST /v1/calibrate`` (``--p`` forecast probabilities,
  40 by default), ``GET /v1/jobs/{id}`` and ``GET /v1/latest/{archetype}``:
  p50 and p95 latency of ``--requests`` sequential requests on one
  keep-alive connection, and requests/s of ``--threads`` clients sending
  ``--requests`` each at once. Every loop is bounded; the load generator
  runs on the same machine as the server, so on 2 cores it takes a share
  of the CPU the server would otherwise have. Targets (issue 19):
  calibrate p50 ≤ 5 ms and ≥ 500 requests/s.
- **lane table**: the worker runs one batch job; ``--batch`` (200) more
  batch jobs are queued behind it straight on the batch queue, then one
  interactive job is submitted. It must start within one running job's
  time: reported are the running job's duration, how long the interactive
  job waited to start, and how many batch jobs started before it.

Usage: ``python bench/api.py [--requests 2000] [--threads 4] [--workers 1] [--p 40] [--batch 200]
[--json bench/results/api.json]``. Figures from a shared machine are slowed
by whatever else runs there.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.services import Worker, calq_environ, convergence_environ, free_port, start_redis, stop_process, until  # noqa: E402

#: The fit behind ``latest``: the default sampler's 4 × 1,000 draws, so calibrate works on a posterior of real size.
LATEST = {"warmup": 200, "samples": 1000, "chains": 4}
#: The lane bench's queued jobs, and its running job (long enough to see who starts next).
SMALL = {"warmup": 100, "samples": 150, "chains": 2}
RUNNING = {"warmup": 300, "samples": 1500, "chains": 2}
TARGET_P50_MS = 5.0
TARGET_RPS = 500.0


def measure(client_factory, request, *, requests: int, threads: int) -> dict[str, float]:
    """p50/p95 latency (ms) of ``requests`` sequential calls, and requests/s of ``threads`` clients at once."""
    client = client_factory()
    for _ in range(min(50, requests)):
        request(client)
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        request(client)
        latencies.append((time.perf_counter() - start) * 1000)
    client.close()
    clients = [client_factory() for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def load(c) -> None:
        barrier.wait()
        for _ in range(requests):
            request(c)

    workers = [threading.Thread(target=load, args=(c,)) for c in clients]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    for c in clients:
        c.close()
    return {"p50_ms": float(np.percentile(latencies, 50)), "p95_ms": float(np.percentile(latencies, 95)),
            "requests_per_s": threads * requests / elapsed, "requests": requests, "threads": threads}


def serve(env: dict[str, str], port: int, log: Path, *, workers: int) -> subprocess.Popen:
    out = open(log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "serve", "--port", str(port), "--workers", str(workers)],
                            env={**env, "CALQ_LOG_LEVEL": "WARNING"}, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    def healthy() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    until(healthy, timeout=120, what="the API to answer /healthz", every=0.25)
    return proc


def lane_bench(client, dataset, ref, *, batch: int) -> dict[str, float]:
    """One batch job running, ``batch`` more queued behind it, then one interactive job: who starts next."""
    from shared.contract.job import JobState
    from shared.jobs.celery_app import BATCH

    def job(seed: int, sampler: dict[str, int]):
        return client.make_job(dataset, "intermediate", events="top_5", seed=seed, dataset_ref=ref, **sampler)

    running = job(50_000, RUNNING)
    client.submit_job(running, lane=BATCH)
    until(lambda: client.status(running.job_id).state is JobState.RUNNING, timeout=300, what="the running job to start", every=0.05)
    queued = [job(60_000 + i, SMALL) for i in range(batch)]
    for j in queued:
        client.submit_job(j, lane=BATCH)
    interactive = job(70_000, SMALL)
    submitted = time.time()
    client.submit_job(interactive)
    record = until(lambda: (r := client.status(interactive.job_id)).started_at and r,
                   timeout=900, what="the interactive job to start", every=0.05)
    ran = client.wait(running.job_id, timeout=900)
    first = client.status(running.job_id)
    started_before = sum(1 for j in queued if (r := client.registry.find(j.job_id)) and r.started_at
                         and r.started_at < record.started_at)
    for j in queued:  # the rest never runs
        client.cancel(j.job_id, "bench over")
    running_s = (first.finished_at - first.started_at).total_seconds()
    waited_s = record.started_at.timestamp() - submitted
    return {"batch_queued": batch, "running_job_s": running_s, "interactive_waited_s": waited_s,
            "batch_started_before": started_before, "within_one_job": waited_s <= running_s,
            "running_job_draws": ran.sampler.chains * (ran.sampler.warmup + ran.sampler.samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per loop (bounded)")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="calq serve --workers (server processes)")
    parser.add_argument("--p", type=int, default=40, help="forecast probabilities per calibrate request")
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "api.json")
    args = parser.parse_args()

    from producer.api.tokens import RedisTokens
    from producer.client import CalibrationClient
    from shared.contract.settings import Settings
    from shared.data.dataset import save_dataset
    from shared.data.synth import synthesize

    tmp = Path(tempfile.mkdtemp(prefix="calq-bench-api-"))
    redis_proc, redis_server = start_redis(tmp)
    url = redis_server.url
    env = calq_environ(CALQ_BROKER_URL=url, CALQ_STORAGE_URL=str(tmp / "store"), CALQ_COMPILE_CACHE_DIR=str(tmp / "jax"),
                       CALQ_WARM_START="false", **convergence_environ())
    settings = Settings(broker_url=url, storage_url=str(tmp / "store"), compile_cache_dir=None)
    client = CalibrationClient(settings)
    dataset = save_dataset(synthesize(seasons=1, scenarios=200, seed=5), tmp / "season.nc")
    ref = client.upload(dataset)
    worker = Worker(env, tmp / "worker.log", children=1)
    api_port = free_port()
    api = serve(env, api_port, tmp / "api.log", workers=args.workers)
    try:
        worker.wait_ready(180)
        fitted = client.submit(dataset, "intermediate", events="top_5", dataset_ref=ref, **LATEST)
        client.wait(fitted, timeout=900)
        secret, _ = RedisTokens(client.registry.redis).create("bench", role="producer")
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}

        def factory() -> http.client.HTTPConnection:
            return http.client.HTTPConnection("127.0.0.1", api_port, timeout=30)  # keep-alive, and light on the CPU

        def call(method: str, path: str, body: bytes | None = None):
            def request(conn: http.client.HTTPConnection) -> None:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                if response.status != 200:
                    raise SystemExit(f"{method} {path}: {response.status} {data[:300]!r}")
            return request

        p = np.linspace(0.01, 0.6, args.p).round(4).tolist()
        body = json.dumps({"archetype": "intermediate", "track": "Kansas", "event": "top_5", "p": p}).encode()
        endpoints = {
            f"POST /v1/calibrate ({args.p} p)": call("POST", "/v1/calibrate", body),
            "GET /v1/jobs/{id}": call("GET", f"/v1/jobs/{fitted}"),
            "GET /v1/latest/{archetype}": call("GET", "/v1/latest/intermediate"),
        }
        rows = {name: measure(factory, call, requests=args.requests, threads=args.threads) for name, call in endpoints.items()}
        lanes = lane_bench(client, dataset, ref, batch=args.batch)
    finally:
        api.terminate()
        api.wait(30)
        worker.stop(120)
        stop_process(redis_proc, timeout=10)

    draws = LATEST["chains"] * LATEST["samples"]
    print(f"\nAPI on loopback, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average "
          f"{os.getloadavg()[0]:.1f}, {args.requests} requests per loop, {args.threads} clients for requests/s, "
          f"{args.workers} server process(es); "
          f"calibrate on a posterior of {draws:,} draws")
    print(f"{'endpoint':34} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>8}")
    for name, r in rows.items():
        print(f"{name:34} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} {r['requests_per_s']:8.0f}")
    calibrate = next(iter(rows.values()))
    print(f"calibrate targets: p50 ≤ {TARGET_P50_MS} ms: {'met' if calibrate['p50_ms'] <= TARGET_P50_MS else 'MISSED'}; "
          f"≥ {TARGET_RPS:.0f} req/s: {'met' if calibrate['requests_per_s'] >= TARGET_RPS else 'MISSED'}")
    print(f"\nlanes: one running batch job ({lanes['running_job_s']:.1f} s), {lanes['batch_queued']} batch jobs queued behind it")
    print(f"interactive job started after {lanes['interactive_waited_s']:.1f} s "
          f"({'within' if lanes['within_one_job'] else 'NOT within'} one running job's time); "
          f"batch jobs that started before it: {lanes['batch_started_before']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                 "load_average": os.getloadavg()[0]}, "posterior_draws": draws,
                                     "server_processes": args.workers,
                                     "endpoints": rows, "lanes": lanes}, indent=2))
    print(f"\nwrote {args.json}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

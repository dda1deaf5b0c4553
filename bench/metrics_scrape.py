"""What seeing the fleet costs: one ``/metrics`` request and one ``calq fleet --json``, with 10,000 jobs in Redis.

It starts its own ``redis-server`` and fills it as a busy fleet would leave it:
``--jobs`` job records (the registry's layout, ``{prefix}:job:{id}`` indexed by
``{prefix}:index``), as many finished jobs in the fleet's recent list (all in
the last hour: the most ``calq fleet`` ever reads), ``--queued`` messages
waiting in ``calq.cpu`` (half at a kombu priority step), and ``--workers``
heartbeat records. The metrics are the supervisor's: multiprocess mode, with
``--children`` child processes that each recorded finished jobs of every
archetype and state (so the scrape merges that many files), served by
:func:`shared.jobs.metrics.serve`.

Measured: the median and the slowest of ``--repeats`` ``GET /metrics``
requests over HTTP; the fleet view read in-process
(:func:`shared.jobs.telemetry.read_fleet`); and ``calq fleet --json`` as a
command (a fresh Python process, as an operator runs it). Prints a table and
writes JSON (default ``bench/results/metrics_scrape.json``).

Usage: ``python bench/metrics_scrape.py [--jobs 10000] [--repeats 20] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.metrics import time_call  # noqa: E402
from tests.services import calq_environ, start_redis, stop_process  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "metrics_scrape.json"
ARCHETYPES = ("superspeedway", "intermediate", "short_track", "road_course")
STATES = ("succeeded", "failed", "rejected", "cancelled")
PREFIX = "calq"


def record_as_child(jobs: int, seed: int) -> None:
    """A worker child: records ``jobs`` finished jobs into the multiprocess folder, then exits."""
    import random

    from shared.jobs import metrics

    rng = random.Random(seed)
    worker = f"calq-cpu{seed}@bench"
    metrics.worker_state(worker, busy=False, version="bench", device="cpu")
    for i in range(jobs):
        state = STATES[i % len(STATES)]
        metrics.job_finished(
            archetype=ARCHETYPES[i % len(ARCHETYPES)], state=state, lane="default",
            phase_seconds={p: rng.expovariate(1 / 10) for p in metrics.PHASES}, rows=rng.randint(200, 30_000),
            runs=["converged"] if state == "succeeded" else ["interrupted"], remedies=["target_accept"] * (i % 3 == 0),
            divergences=rng.randint(0, 3),
        )


def fill_redis(client, *, jobs: int, queued: int, workers: int) -> None:
    from shared.contract.job import JobState, JobStatus, utcnow
    from shared.jobs import metrics, telemetry

    now, wall = utcnow(), time.time()
    pipe = client.pipeline(transaction=False)
    for i in range(jobs):
        job_id = f"cj-{i:024x}"
        status = JobStatus(job_id=job_id, archetype=ARCHETYPES[i % 4], state=JobState.SUCCEEDED,
                           submitted_at=now, started_at=now, finished_at=now, updated_at=now)
        pipe.set(f"{PREFIX}:job:{job_id}", status.model_dump_json())
        pipe.zadd(f"{PREFIX}:index", {job_id: wall - i})
        entry = telemetry.FinishedJob(job_id=job_id, archetype=ARCHETYPES[i % 4], state=STATES[i % 4],
                                      seconds=5 + i % 50, converged=i % 10 != 0, finished_at=wall - (i % 3500))
        pipe.zadd(f"{PREFIX}:fleet:recent", {entry.model_dump_json(): entry.finished_at})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    lists = metrics.priority_lists("calq.cpu")
    for i in range(queued):
        client.rpush(lists[0] if i % 2 else lists[1], f"message-{i}")
    for w in range(workers):
        beat = telemetry.WorkerBeat(worker=f"calq-cpu{w}@bench", pid=1000 + w, node="bench", device="cpu",
                                    version="bench", state="busy" if w % 2 else "idle", heartbeat_at=wall,
                                    started_at=wall - 600, jobs_done=w * 10,
                                    job_id="cj-0" if w % 2 else None, phase="sampling" if w % 2 else None,
                                    lease_since=wall - 30 if w % 2 else None)
        telemetry.publish_beat(client, PREFIX, beat, ttl_s=3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--queued", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="calq-bench-scrape-"))
    from shared.jobs import metrics

    metrics.prepare_multiprocess(workdir / "metrics")  # before any metric exists, as the supervisor does
    redis_proc, redis_server = start_redis(workdir)
    try:
        import redis

        from shared.jobs.celery_app import ALL_QUEUES
        from shared.jobs.telemetry import read_fleet

        client = redis.Redis(port=redis_server.port)
        fill_redis(client, jobs=args.jobs, queued=args.queued, workers=args.workers)
        spawn = multiprocessing.get_context("spawn")
        children = [spawn.Process(target=record_as_child, args=(args.jobs // args.children, seed))
                    for seed in range(args.children)]
        for child in children:
            child.start()
        for child in children:
            child.join()

        server = metrics.serve(0, host="127.0.0.1", redis_client=client, queues=ALL_QUEUES)
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        size = len(urllib.request.urlopen(url, timeout=30).read())
        scrape = time_call(lambda: urllib.request.urlopen(url, timeout=30).read(), args.repeats)
        view = read_fleet(client, PREFIX, ALL_QUEUES)
        assert len(view.workers) == args.workers and view.queues["calq.cpu"] == args.queued
        in_process = time_call(lambda: read_fleet(client, PREFIX, ALL_QUEUES), args.repeats)
        environ = {k: v for k, v in calq_environ(CALQ_BROKER_URL=redis_server.url).items() if not k.startswith("PROMETHEUS_")}

        def command() -> None:
            done = subprocess.run([sys.executable, "-m", "producer.cli", "fleet", "--json"], env=environ, cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]

        cli = time_call(command, max(3, args.repeats // 4))
        server.shutdown()
    finally:
        stop_process(redis_proc, timeout=10)

    rows = [
        ("GET /metrics", scrape, f"{size / 1024:.0f} KiB, {args.children} child files merged"),
        ("read_fleet (in-process)", in_process, f"{args.workers} workers, {args.jobs} recent jobs"),
        ("calq fleet --json (command)", cli, "includes Python start-up and imports"),
    ]
    print(f"{args.jobs} job records and recent jobs, {args.queued} queued messages, {args.workers} workers "
          f"({platform.machine()}, {os.cpu_count()} CPUs)")
    print(f"{'what':<30} {'median ms':>10} {'max ms':>10}  notes")
    for name, times, note in rows:
        print(f"{name:<30} {statistics.median(times) * 1000:>10.1f} {max(times) * 1000:>10.1f}  {note}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "jobs": args.jobs, "queued": args.queued, "workers": args.workers, "children": args.children,
        "metrics_bytes": size, "machine": platform.machine(), "cpus": os.cpu_count(),
        "results": {name: {"median_s": statistics.median(times), "max_s": max(times), "runs": len(times)}
                    for name, times, _ in rows},
    }, indent=2) + "\n")
    print(f"wrote {args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json}")


if __name__ == "__main__":
    main()

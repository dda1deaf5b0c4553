"""Benchmark cancellation on a real worker: how long a cancelled job takes to stop, and the worker to move on.

It starts its own ``redis-server`` on a free port and one ``calq worker
--gpus none`` (a CPU worker, solo pool) on a local store, warms the worker
with one job, then, ``--rounds`` times:

- submits a long job (one chain, 10k + 10k draws: it is never run to the
  end) and a small one queued behind it;
- waits until the long job is sampling, then a random 0–2 s more, and
  cancels it (``CalibrationClient.cancel``);
- measures **cancel → stopped**: from the request to the record's
  ``finished_at`` (state ``cancelled``), and **stopped → next job started**:
  to the small job's ``started_at``;

and cancels ``--rounds`` queued jobs, measuring **cancel → cancelled** for a
queued job (one Redis transaction).

A running job reads its cancel flag at most once a second (shared.contract.control.CANCEL_POLL_S)
and checks it between sampling chunks, so the stop time is at most about
one poll interval plus one chunk.

Usage: ``python bench/cancel.py [--rounds 5] [--json bench/results/cancel.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet import free_port, start_redis  # noqa: E402

LONG = {"warmup": 10_000, "samples": 10_000, "chains": 1}  # the worker caps draws per chain at 20k
SMALL = {"warmup": 50, "samples": 50, "chains": 1}


def until(predicate, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError("condition not met")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "cancel.json")
    args = parser.parse_args()

    from producer.client import CalibrationClient
    from shared.contract.job import JobState
    from shared.contract.settings import Settings
    from shared.data.dataset import save_dataset
    from shared.data.synth import synthesize

    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="calq-bench-cancel-") as tmp:
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

            def job(seed: int, sampler: dict):
                return client.make_job(dataset, "intermediate", events="top_5", seed=seed, dataset_ref=ref, **sampler)

            client.wait(client.submit_job(job(0, SMALL)), timeout=600)  # compile the small bucket
            stop_s, next_s, phases = [], [], []
            for round_ in range(args.rounds):
                long_id = client.submit_job(job(100 + round_, LONG))
                small_id = client.submit_job(job(200 + round_, SMALL))
                until(lambda job_id=long_id: (s := client.status(job_id)).progress is not None
                      and s.progress.phase in ("warmup", "sampling"))
                time.sleep(rng.uniform(0, 2))
                phases.append(client.status(long_id).progress.phase)  # where it was when asked to stop
                asked = time.time()
                client.cancel(long_id, "bench")
                final = until(lambda job_id=long_id: (s := client.status(job_id)).state.finished and s)
                assert final.state is JobState.CANCELLED, final
                stop_s.append(final.finished_at.timestamp() - asked)
                started = until(lambda job_id=small_id: client.status(job_id).started_at)
                next_s.append((started - final.finished_at).total_seconds())
                client.wait(small_id, timeout=600)

            queued_s = []
            for round_ in range(args.rounds):
                blocker = client.submit_job(job(300 + round_, LONG))
                queued = client.submit_job(job(400 + round_, SMALL))
                t = time.perf_counter()
                record, _ = client.cancel(queued)
                queued_s.append(time.perf_counter() - t)
                assert record.state is JobState.CANCELLED
                client.cancel(blocker)
                client.registry.wait(blocker, timeout=600)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=120)
            redis_proc.terminate()
            redis_proc.wait()

    result = {
        "rounds": args.rounds,
        "stop_s": stop_s,
        "stop_p50_s": float(np.percentile(stop_s, 50)),
        "stop_max_s": float(max(stop_s)),
        "next_job_start_p50_s": float(np.percentile(next_s, 50)),
        "next_job_start_max_s": float(max(next_s)),
        "queued_cancel_p50_ms": float(np.percentile(queued_s, 50) * 1000),
        "stopped_in_phase": phases,
    }
    rows = [
        (f"running job: cancel → cancelled, p50 ({args.rounds} rounds)", f"{result['stop_p50_s']:.2f} s"),
        ("running job: cancel → cancelled, max", f"{result['stop_max_s']:.2f} s"),
        ("cancelled → next queued job started, p50", f"{result['next_job_start_p50_s']:.2f} s"),
        ("cancelled → next queued job started, max", f"{result['next_job_start_max_s']:.2f} s"),
        ("queued job: cancel → cancelled, p50", f"{result['queued_cancel_p50_ms']:.1f} ms"),
        ("phase the running job was in when cancelled", ", ".join(sorted(set(phases)))),
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

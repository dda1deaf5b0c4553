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
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet import season_on_a_fleet  # noqa: E402
from bench.report import print_measures, save_json  # noqa: E402
from tests.services import until  # noqa: E402

LONG = {"warmup": 10_000, "samples": 10_000, "chains": 1}  # the worker caps draws per chain at 20k
SMALL = {"warmup": 50, "samples": 50, "chains": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "cancel.json")
    args = parser.parse_args()

    from shared.contract.job import JobState

    rng = random.Random(0)
    with season_on_a_fleet("calq-bench-cancel-") as (_, client, dataset, ref):
        def job(seed: int, sampler: dict):
            return client.make_job(dataset, "intermediate", events="top_5", seed=seed, dataset_ref=ref, **sampler)

        client.wait(client.submit_job(job(0, SMALL)), timeout=600)  # compile the small bucket
        stop_s, next_s, phases = [], [], []
        for round_ in range(args.rounds):
            long_id = client.submit_job(job(100 + round_, LONG))
            small_id = client.submit_job(job(200 + round_, SMALL))
            until(lambda job_id=long_id: (s := client.status(job_id)).progress is not None
                  and s.progress.phase in ("warmup", "sampling"), timeout=600, what="the long job sampling", every=0.05)
            time.sleep(rng.uniform(0, 2))
            phases.append(client.status(long_id).progress.phase)  # where it was when asked to stop
            asked = time.time()
            client.cancel(long_id, "bench")
            final = until(lambda job_id=long_id: (s := client.status(job_id)).state.finished and s, timeout=600,
                          what="the long job stopped", every=0.05)
            assert final.state is JobState.CANCELLED, final
            stop_s.append(final.finished_at.timestamp() - asked)
            started = until(lambda job_id=small_id: client.status(job_id).started_at, timeout=600,
                            what="the small job started", every=0.05)
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
    print_measures(rows)
    save_json(args.json, result)


if __name__ == "__main__":
    main()

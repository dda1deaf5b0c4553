"""Benchmark recovery from SIGKILL: how long a killed worker's job waits, and what it costs.

It starts its own ``redis-server`` (AOF) on a free port and ``python -m
worker --gpus none`` on a local store, at the default recovery settings
(lease 60 s, heartbeat 10 s, reaper every 15 s) unless ``--lease`` says
otherwise, then, ``--kills`` times: submits a job long enough to be
killed mid-sampling, waits until it samples, SIGKILLs what runs it, and
measures

- **recovery**: from the kill until the job's record says running again
  (a new ``started_at``) on a live worker;
- **finish**: from the kill until it succeeded;
- **jobs lost**: jobs that did not end succeeded;
- **duplicate runs**: sampler runs beyond the killed one and the one that
  finished (the record's ``sampler_runs``), over all jobs.

Two kinds of kill (``--mode``):

- ``child``: the Celery child running the job; its supervisor hands the job
  back at once and restarts the child (with ``--children 1``, the job waits
  for the restart; with 2, the other child takes it);
- ``worker``: the supervisor and its children at once, then a new worker is
  started; the job comes back when its lease lapses and a reaper finds it.

Usage: ``python bench/faults.py [--mode child|worker] [--kills 5] [--children 1] [--lease 60]
[--json bench/results/faults-child.json]``. Figures from a shared machine
are slowed by whatever else runs there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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

SAMPLER = {"warmup": 100, "samples": 3000, "chains": 2}
CONVERGENCE = {"CALQ_CONVERGENCE__MIN_ESS_BULK": "10", "CALQ_CONVERGENCE__MAX_RHAT": "1.2",
               "CALQ_CONVERGENCE__MAX_DIVERGENCES": "5"}


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def child_named(supervisor: int, name: str) -> int | None:
    for pid in children_of(supervisor):
        try:
            if name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return None


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


class Worker:
    def __init__(self, env: dict[str, str], log: Path, children: int) -> None:
        self.log, self.children = log, children
        out = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", "--gpus", "none", "--cpu-workers", str(children)],
                                     env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        out.close()

    def wait_ready(self) -> None:
        wait_until(lambda: self.log.read_text(errors="replace").count(" ready.") >= self.children, 180,
                   "the worker to be ready", poll=0.25)

    def kill_all(self) -> None:
        kids = children_of(self.proc.pid)
        self.proc.kill()
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.kill_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("child", "worker"), default="child")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--children", type=int, default=1)
    parser.add_argument("--lease", type=float, default=None, help="lease seconds (default: the settings' 60 s)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out_json = args.json or ROOT / "bench" / "results" / f"faults-{args.mode}.json"


    from producer.client import CalibrationClient
    from shared.contract.job import JobState
    from shared.contract.settings import Settings
    from shared.data.dataset import save_dataset
    from shared.data.synth import synthesize

    tmp = Path(tempfile.mkdtemp(prefix="calq-bench-faults-"))
    port = free_port()
    redis_proc = start_redis(port, tmp, appendonly=True)
    url = f"redis://127.0.0.1:{port}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALQ_")}
    env.update(CALQ_BROKER_URL=url, CALQ_STORAGE_URL=str(tmp / "store"), CALQ_COMPILE_CACHE_DIR=str(tmp / "jax"),
               CALQ_RECOVERY__SPOOL_DIR=str(tmp / "spool"), PYTHONPATH=str(ROOT), **CONVERGENCE,
               CALQ_WARM_START="false")  # faults strike mid-sampling: job lengths must not depend on earlier fits
    if args.lease is not None:
        env.update(CALQ_RECOVERY__LEASE_S=str(args.lease), CALQ_RECOVERY__HEARTBEAT_S=str(args.lease / 6),
                   CALQ_RECOVERY__REAPER_INTERVAL_S=str(args.lease / 4))
    settings = Settings(broker_url=url, storage_url=str(tmp / "store"), compile_cache_dir=None)
    client = CalibrationClient(settings)
    dataset = tmp / "season.nc"
    save_dataset(synthesize(seasons=1, scenarios=200, seed=5), dataset)
    ref = client.upload(dataset)

    workers = [Worker(env, tmp / "worker0.log", args.children)]
    rows = []
    try:
        workers[0].wait_ready()
        for i in range(args.kills):
            job_id = client.submit(dataset, "intermediate", events="top_5,top_10", seed=1000 + i, dataset_ref=ref,
                                   **SAMPLER)

            def sampling(job_id=job_id):
                r = client.registry.find(job_id)
                return r is not None and r.state is JobState.RUNNING and r.progress is not None and \
                    r.progress.phase == "sampling" and r.progress.fraction >= 0.1 and r

            first = wait_until(sampling, 300, f"job {i} to sample")
            live = workers[-1]
            if args.mode == "child":
                pid = child_named(live.proc.pid, first.worker)
                if pid is None:
                    raise SystemExit(f"no child named {first.worker}")
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
            else:
                live.kill_all()
                killed = time.monotonic()
                workers.append(Worker(env, tmp / f"worker{len(workers)}.log", args.children))

            def again(job_id=job_id, first=first):
                r = client.registry.find(job_id)
                return r is not None and r.state is JobState.RUNNING and r.started_at != first.started_at and r

            wait_until(again, 600, f"job {i} to run again")
            recovery = time.monotonic() - killed
            wait_until(lambda job_id=job_id: (r := client.registry.find(job_id)) and r.state.finished, 600,
                       f"job {i} to finish")
            finish = time.monotonic() - killed
            record = client.registry.get(job_id)
            runs = record.sampler_runs
            rows.append({"job_id": job_id, "recovery_s": recovery, "finish_s": finish, "state": record.state.value,
                         "sampler_runs": runs, "deliveries": record.deliveries})
            print(f"kill {i + 1}/{args.kills}: running again after {recovery:.1f} s, {record.state.value} after "
                  f"{finish:.1f} s, sampler runs {runs}", flush=True)
            if args.mode == "worker":
                workers[-1].wait_ready()
    finally:
        for worker in workers:
            worker.stop()
        redis_proc.terminate()
        redis_proc.wait(10)

    recovery = np.array([r["recovery_s"] for r in rows])
    finish = np.array([r["finish_s"] for r in rows])
    lost = sum(r["state"] != "succeeded" for r in rows)
    duplicates = sum(max(0, r["sampler_runs"] - 2) for r in rows)
    result = {
        "mode": args.mode, "kills": len(rows), "children": args.children,
        "lease_s": args.lease or Settings().recovery.lease_s,
        "recovery_p50_s": float(np.median(recovery)), "recovery_max_s": float(recovery.max()),
        "finish_p50_s": float(np.median(finish)), "finish_max_s": float(finish.max()),
        "jobs_lost": int(lost), "duplicate_runs": int(duplicates),
        "sampler": SAMPLER, "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared: figures slowed by other load)",
        "runs": rows,
    }
    print()
    print(f"| SIGKILL of the {args.mode} ({len(rows)} kills, {args.children} child(ren), lease {result['lease_s']:g} s) "
          "| p50 | max |")
    print("|---|---|---|")
    print(f"| kill → running again on a live worker | {result['recovery_p50_s']:.1f} s | {result['recovery_max_s']:.1f} s |")
    print(f"| kill → succeeded | {result['finish_p50_s']:.1f} s | {result['finish_max_s']:.1f} s |")
    print(f"| jobs lost | {lost} | |")
    print(f"| duplicate sampler runs | {duplicates} | |")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out_json}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

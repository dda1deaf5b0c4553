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

And four faults of issue 18 ("Exactly once under partitions"), the first
three with two worker "hosts" (two supervisors, one child each, their own spools):

- ``partition``: the child running a job is frozen (SIGSTOP) as it
  finishes, and thawed once the other host finished the job; **recovery**
  is freeze → running on the other host, **finish** freeze → succeeded, and
  **duplicate writes** counts store objects beyond one summary and the one
  posterior it names (the frozen worker must write nothing);
- ``flush``: FLUSHALL while a job runs and three more are queued, then
  ``calq reindex``'s function at once; **recovery** is flush → the running job
  succeeded, **finish** flush → every job succeeded;
- ``disk-full``: the store (a local folder on a 32 MiB tmpfs, needs root) is
  filled as a job finishes and freed 5 s after its write starts waiting;
  **recovery** and **finish** are space freed → succeeded;
- ``half-open``: one host reaching Redis only through a loopback proxy
  (``tests.services.TcpProxy``); while it is idle, every connection open is
  frozen for good (open and silent, as a hung NAT leaves it; new ones get
  through) and a job submitted 2 s later; **recovery** is freeze → the job
  taken, **finish** freeze → succeeded; the proxy is thawed after each.

Usage: ``python bench/faults.py [--mode child|worker|partition|flush|disk-full|half-open] [--kills 5] [--children 1]
[--lease 60] [--json bench/results/faults-child.json]``. Figures from a shared machine
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

from tests.services import Worker, calq_environ, convergence_environ, start_redis, stop_process, until  # noqa: E402

SAMPLER = {"warmup": 100, "samples": 3000, "chains": 2}
CONVERGENCE = convergence_environ()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("child", "worker", *PARTITION_MODES), default="child")
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
    if args.mode == "disk-full":
        (tmp / "store").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(tmp / "store")], check=True)
    redis_proc, redis_server = start_redis(tmp, args=("--appendonly", "yes"))
    port, url = redis_server.port, redis_server.url
    env = calq_environ(CALQ_BROKER_URL=url, CALQ_STORAGE_URL=str(tmp / "store"), CALQ_COMPILE_CACHE_DIR=str(tmp / "jax"),
                       CALQ_RECOVERY__SPOOL_DIR=str(tmp / "spool"), **CONVERGENCE,
                       CALQ_WARM_START="false")  # faults strike mid-sampling: job lengths must not depend on earlier fits
    if args.lease is not None:
        env.update(CALQ_RECOVERY__LEASE_S=str(args.lease), CALQ_RECOVERY__HEARTBEAT_S=str(args.lease / 6),
                   CALQ_RECOVERY__REAPER_INTERVAL_S=str(args.lease / 4))
    settings = Settings(broker_url=url, storage_url=str(tmp / "store"), compile_cache_dir=None)
    client = CalibrationClient(settings)
    dataset = tmp / "season.nc"
    save_dataset(synthesize(seasons=1, scenarios=200, seed=5), dataset)
    ref = client.upload(dataset)

    proxy = None
    if args.mode == "half-open":
        from tests.services import TcpProxy

        proxy = TcpProxy("127.0.0.1", port)
        workers = [Worker({**env, "CALQ_BROKER_URL": proxy.url_for(url), "CALQ_RECOVERY__SPOOL_DIR": str(tmp / "spool-a")},
                          tmp / "worker-a.log")]
    elif args.mode in PARTITION_MODES:
        workers = [Worker({**env, "CALQ_RECOVERY__SPOOL_DIR": str(tmp / f"spool-{host}")}, tmp / f"worker-{host}.log")
                   for host in "ab"]
    else:
        workers = [Worker(env, tmp / "worker0.log", children=args.children)]
    rows = []
    try:
        for worker in workers:
            worker.wait_ready(180)
        for i in range(args.kills if args.mode not in PARTITION_MODES else 0):
            job_id = client.submit(dataset, "intermediate", events="top_5,top_10", seed=1000 + i, dataset_ref=ref,
                                   **SAMPLER)

            def sampling(job_id=job_id):
                r = client.registry.find(job_id)
                return r is not None and r.state is JobState.RUNNING and r.progress is not None and \
                    r.progress.phase == "sampling" and r.progress.fraction >= 0.1 and r

            first = until(sampling, timeout=300, what=f"job {i} to sample", every=0.05)
            live = workers[-1]
            if args.mode == "child":
                pid = live.child_named(first.worker)
                if pid is None:
                    raise SystemExit(f"no child named {first.worker}")
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
            else:
                live.kill_all()
                killed = time.monotonic()
                workers.append(Worker(env, tmp / f"worker{len(workers)}.log", children=args.children))

            def again(job_id=job_id, first=first):
                r = client.registry.find(job_id)
                return r is not None and r.state is JobState.RUNNING and r.started_at != first.started_at and r

            until(again, timeout=600, what=f"job {i} to run again", every=0.05)
            recovery = time.monotonic() - killed
            until(lambda job_id=job_id: (r := client.registry.find(job_id)) and r.state.finished,
                  timeout=600, what=f"job {i} to finish", every=0.05)
            finish = time.monotonic() - killed
            record = client.registry.get(job_id)
            runs = record.sampler_runs
            rows.append({"job_id": job_id, "recovery_s": recovery, "finish_s": finish, "state": record.state.value,
                         "sampler_runs": runs, "deliveries": record.deliveries})
            print(f"kill {i + 1}/{args.kills}: running again after {recovery:.1f} s, {record.state.value} after "
                  f"{finish:.1f} s, sampler runs {runs}", flush=True)
            if args.mode == "worker":
                workers[-1].wait_ready(180)
        for i in range(args.kills if args.mode in PARTITION_MODES else 0):
            rows.append(PARTITION_MODES[args.mode](client, dataset, ref, workers, url=url, tmp=tmp, seed=2000 + 10 * i,
                                                   proxy=proxy))
            print(f"{args.mode} {i + 1}/{args.kills}: {rows[-1]}", flush=True)
    finally:
        for worker in workers:
            worker.stop(120)
        if proxy is not None:
            proxy.close()
        stop_process(redis_proc, timeout=10)
        if args.mode == "disk-full":
            subprocess.run(["umount", str(tmp / "store")], check=False)

    recovery = np.array([r["recovery_s"] for r in rows])
    finish = np.array([r["finish_s"] for r in rows])
    lost = sum(r["state"] != "succeeded" for r in rows)
    duplicates = sum(max(0, r["sampler_runs"] - (1 if args.mode in ("flush", "disk-full", "half-open") else 2)) for r in rows)
    result = {
        "mode": args.mode, "kills": len(rows), "children": args.children,
        "lease_s": args.lease or Settings().recovery.lease_s,
        "recovery_p50_s": float(np.median(recovery)), "recovery_max_s": float(recovery.max()),
        "finish_p50_s": float(np.median(finish)), "finish_max_s": float(finish.max()),
        "jobs_lost": int(lost), "duplicate_runs": int(duplicates),
        "duplicate_writes": int(sum(r.get("extra_objects", 0) for r in rows)),
        "sampler": SAMPLER, "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared: figures slowed by other load)",
        "runs": rows,
    }
    print()
    fault, recovered, finished = LABELS.get(args.mode, (f"SIGKILL of the {args.mode}", "kill → running again on a live worker",
                                                         "kill → succeeded"))
    print(f"| {fault} ({len(rows)} times, {args.children} child(ren), lease {result['lease_s']:g} s) | p50 | max |")
    print("|---|---|---|")
    print(f"| {recovered} | {result['recovery_p50_s']:.1f} s | {result['recovery_max_s']:.1f} s |")
    print(f"| {finished} | {result['finish_p50_s']:.1f} s | {result['finish_max_s']:.1f} s |")
    print(f"| duplicate store writes | {result['duplicate_writes']} | |")
    print(f"| jobs lost | {lost} | |")
    print(f"| duplicate sampler runs | {duplicates} | |")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out_json}")
    shutil.rmtree(tmp, ignore_errors=True)


# -- issue 18: partitions, flushes, full disks ----------------------------------------------------------


def _record(client, job_id):
    try:
        return client.registry.find(job_id)
    except Exception:
        return None


def _finishing(client, job_id):
    from shared.contract.job import JobState

    r = _record(client, job_id)
    return r is not None and r.state is JobState.RUNNING and r.progress is not None and (
        (r.progress.phase == "sampling" and r.progress.fraction >= 0.9) or r.progress.phase in ("diagnostics", "write")) and r


def _done(client, job_id):
    r = _record(client, job_id)
    return r is not None and r.state.finished and r


def _row(client, job_id, recovery, finish):
    record = client.registry.get(job_id)
    summary_objects = [u for u in client.store.list("posteriors") if job_id in u]
    return {"job_id": job_id, "recovery_s": recovery, "finish_s": finish, "state": record.state.value,
            "sampler_runs": record.sampler_runs, "deliveries": record.deliveries,
            "extra_objects": max(0, len(summary_objects) - 2)}


def partition(client, dataset, ref, workers, *, url, tmp, seed, **_):
    """Freeze the child running a job as it finishes; the other host runs it; thaw it after."""
    job_id = client.submit(dataset, "intermediate", events="top_5,top_10", seed=seed, dataset_ref=ref,
                           warmup=100, samples=600, chains=2)
    first = until(lambda: _finishing(client, job_id), timeout=300, what="the job to finish", every=0.05)
    pid = int(first.worker.partition("#")[2])  # a record's worker is "{node}#{pid}"
    os.kill(pid, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        until(lambda: (r := _record(client, job_id)) and r.worker not in (None, first.worker),
              timeout=300, what="the job to run on the other host", every=0.05)
        recovery = time.monotonic() - frozen
        until(lambda: _done(client, job_id), timeout=300, what="the job to finish", every=0.05)
        finish = time.monotonic() - frozen
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(5)  # the thawed worker stops without writing (or would write now)
    return _row(client, job_id, recovery, finish)


def flush(client, dataset, ref, workers, *, url, tmp, seed, **_):
    """FLUSHALL with a job running and three queued, then reindex at once (a new client: a new process's queues)."""
    import redis

    from producer.client import CalibrationClient
    from shared.jobs.submissions import reindex

    running = client.submit(dataset, "intermediate", events="top_5,top_10", seed=seed, dataset_ref=ref, **SAMPLER)
    until(lambda: (r := _record(client, running)) and r.progress is not None and r.progress.phase == "sampling",
          timeout=300, what="the job to sample", every=0.05)
    queued = [client.submit(dataset, "intermediate", events="top_5", seed=seed + 1 + k, dataset_ref=ref,
                            warmup=100, samples=200, chains=2) for k in range(3)]
    redis.Redis.from_url(url).flushall()
    flushed = time.monotonic()
    fresh = CalibrationClient(client.settings)
    reindex(registry=fresh.registry, store=fresh.store, publish=fresh.send)
    until(lambda: _done(client, running), timeout=600, what="the running job to finish", every=0.05)
    recovery = time.monotonic() - flushed
    for job_id in queued:
        until(lambda job_id=job_id: _done(client, job_id), timeout=600, what="a queued job to finish", every=0.05)
    finish = time.monotonic() - flushed
    row = _row(client, running, recovery, finish)
    row["queued_lost"] = sum(client.registry.get(j).state.value != "succeeded" for j in queued)
    row["sampler_runs"] = 1  # the flush took the record's counter: one run, as each worker's log says
    return row


def disk_full(client, dataset, ref, workers, *, url, tmp, seed, **_):
    """Fill the store's disk as a job finishes; free it 5 s after the write starts waiting."""
    job_id = client.submit(dataset, "intermediate", events="top_5,top_10", seed=seed, dataset_ref=ref,
                           warmup=100, samples=600, chains=2)
    until(lambda: _finishing(client, job_id), timeout=300, what="the job to finish", every=0.05)
    filler = tmp / "store" / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * (1 << 20))
                out.flush()
        except OSError:
            pass
    until(lambda: (r := _record(client, job_id)) and r.progress is not None
               and r.progress.phase == "waiting for storage", timeout=120, what="the write to wait for space", every=0.05)
    time.sleep(5)
    filler.unlink()
    freed = time.monotonic()
    until(lambda: _done(client, job_id), timeout=300, what="the job to finish", every=0.05)
    took = time.monotonic() - freed
    return _row(client, job_id, took, took)


def half_open(client, dataset, ref, workers, *, url, tmp, seed, proxy, **_):
    """Freeze every open connection of the host behind ``proxy`` while it is idle; submit a job 2 s later."""
    from shared.contract.job import JobState

    time.sleep(3)  # idle: its consumer waits on the broker
    proxy.freeze(new="forwarded")
    frozen = time.monotonic()
    try:
        time.sleep(2)  # past the 1 s a BRPOP already waiting on the dead connection holds a message
        job_id = client.submit(dataset, "intermediate", events="top_5,top_10", seed=seed, dataset_ref=ref,
                               warmup=100, samples=200, chains=2)
        until(lambda: (r := _record(client, job_id)) and r.state is not JobState.QUEUED,
              timeout=600, what="the job to be taken", every=0.05)
        recovery = time.monotonic() - frozen
        until(lambda: _done(client, job_id), timeout=600, what="the job to finish", every=0.05)
        finish = time.monotonic() - frozen
    finally:
        proxy.thaw()
    return _row(client, job_id, recovery, finish)


PARTITION_MODES = {"partition": partition, "flush": flush, "disk-full": disk_full, "half-open": half_open}
LABELS = {
    "partition": ("worker frozen at the write phase", "freeze → running on the other host", "freeze → succeeded"),
    "flush": ("FLUSHALL mid-run, 3 jobs queued, reindex at once", "flush → the running job succeeded",
              "flush → every job succeeded"),
    "disk-full": ("store disk full at the write, freed 5 s later", "space freed → succeeded", "space freed → succeeded"),
    "half-open": ("every open Redis connection of an idle host hung (a NAT)", "freeze → new job taken",
                  "freeze → new job succeeded"),
}


if __name__ == "__main__":
    main()

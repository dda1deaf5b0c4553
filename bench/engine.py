"""Benchmark the calibration engine: cold process, warm worker, persistent compile cache.

For a typical archetype job (intermediate, top_1/top_5/top_10, 4 chains ×
(500 warmup + 1000 draws)) on one season and on five seasons of synthetic
data, it measures per phase (import, load, compile, sample, diagnostics,
write) and end to end:

- **cold**: a fresh process with an empty compilation cache, first job;
- **warm**: the same process, a second job on new data (another seed) —
  what a long-running worker sees;
- **cached**: a fresh process whose persistent compilation cache was filled
  by the cold run — a restarted worker.

Usage: ``python bench/engine.py [--seasons 1 5] [--json bench/results/engine.json]``.
Each scenario runs in its own subprocess so imports and compiles are real.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.fit.device import use_host_devices

ROOT = Path(__file__).resolve().parent.parent


def child(seasons: int, cache: str, jobs: int, store: str) -> dict:
    """Run ``jobs`` jobs in this process and report the phase timings of each."""
    t0 = time.perf_counter()
    from shared.contract.job import CalibrationJob
    from shared.contract.settings import Settings
    from shared.data.dataset import save_dataset
    from shared.data.synth import synthesize
    from shared.jobs.run import prepare_process, run_job
    from shared.storage.store import Store

    settings = Settings(storage_url=store, compile_cache_dir=cache)
    prepare_process(settings)
    import arviz  # noqa: F401 - part of a worker's start-up
    import_s = time.perf_counter() - t0
    st = Store.from_settings(settings)
    results = []
    for j in range(jobs):
        path = Path(store) / f"data-{seasons}-{j}.nc"
        save_dataset(synthesize(seasons=seasons, scenarios=1000, seed=100 + j), path)
        uri, sha = st.upload_dataset(path)
        job = CalibrationJob(archetype="intermediate", dataset_uri=uri, dataset_sha256=sha,
                             sampler={"seed": j})
        t = time.perf_counter()
        summary = run_job(job, store=st, settings=settings)
        wall = time.perf_counter() - t
        tm, d = summary.timings, summary.diagnostics
        results.append({
            "load_s": tm.load_s, "compile_s": tm.compile_s, "sample_s": tm.sample_s,
            "diagnostics_s": tm.diagnostics_s, "write_s": tm.write_s, "total_s": wall,
            "rows": summary.n_rows, "min_ess_bulk": d.min_ess_bulk, "ess_per_s": d.ess_bulk_per_second,
            "leapfrog": d.mean_leapfrog_steps, "divergences": d.divergences, "converged": summary.converged,
        })
    return {"import_s": import_s, "jobs": results}


def run_child(seasons: int, cache: str, jobs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="calq-bench-store-") as store:
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        use_host_devices(environ=env)  # as a CPU worker gets them
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--seasons", str(seasons), "--cache", cache, "--jobs", str(jobs),
             "--store", store],
            env=env, cwd=ROOT, capture_output=True, text=True, check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seasons", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "engine.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.seasons[0], args.cache, args.jobs, args.store)))
        return

    rows = []
    for seasons in args.seasons:
        with tempfile.TemporaryDirectory(prefix="calq-bench-cache-") as cache:
            cold_process = run_child(seasons, cache, jobs=2)
            cached_process = run_child(seasons, cache, jobs=1)
        for label, import_s, job in (
            ("cold", cold_process["import_s"], cold_process["jobs"][0]),
            ("warm", 0.0, cold_process["jobs"][1]),
            ("cached", cached_process["import_s"], cached_process["jobs"][0]),
        ):
            rows.append({"seasons": seasons, "run": label, "import_s": import_s, **job})

    header = ("seasons", "run", "rows", "import", "load", "compile", "sample", "diag", "write", "job total",
              "non-sample %", "ESS/s", "leapfrog", "div")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        non_sample = 100 * (r["total_s"] - r["sample_s"]) / r["total_s"]
        print(" | ".join([
            str(r["seasons"]), r["run"], str(r["rows"]), f"{r['import_s']:.2f}", f"{r['load_s']:.2f}",
            f"{r['compile_s']:.2f}", f"{r['sample_s']:.2f}", f"{r['diagnostics_s']:.2f}", f"{r['write_s']:.2f}",
            f"{r['total_s']:.2f}", f"{non_sample:.0f}", f"{r['ess_per_s']:.0f}", f"{r['leapfrog']:.0f}",
            str(r["divergences"]),
        ]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": os.uname().machine, "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

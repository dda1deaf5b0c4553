"""calq on a GPU: worker pinning, JAX on CUDA, and the sampler against the same machine's CPU.

Run on a machine with an NVIDIA GPU::

    python bench/gpu.py [--json bench/results/gpu.json] [--large-seasons 6]

1. **Pinning.** The plan of ``calq worker --gpus auto`` (one child per GPU
   that ``nvidia-smi`` lists, ``CUDA_VISIBLE_DEVICES`` pinned,
   ``JAX_PLATFORMS=cuda``), and a child started with exactly that
   environment: the devices JAX sees there.
2. **The sampler**, in one child per platform, each with the environment its
   worker gets (the GPU child's from the plan; the CPU child's as ``calq
   worker --gpus none`` gives it, four host devices): a small job
   (intermediate, one season, 2 events) and a large one (all archetypes,
   ``--large-seasons`` seasons, 3 events), each run cold (it compiles),
   cold again (compiled, another seed) and warm from the first fit. Printed:
   compile and sampling seconds, mean leapfrog steps, min bulk ESS and ESS
   per sampling second; written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLER = {"warmup": 500, "samples": 1000, "chains": 4}
JOBS = {
    "small": {"archetype": "intermediate", "seasons": 1, "events": ("top_5", "top_10")},
    "large": {"archetype": "all", "seasons": None, "events": ("top_1", "top_5", "top_10")},
}


def child(large_seasons: int) -> dict:
    """Run in a worker-like process: the devices JAX sees and the jobs' figures."""
    from shared.fit.device import use_host_devices

    use_host_devices()  # a no-op where JAX_PLATFORMS names only an accelerator
    import jax

    from shared.contract.job import CalibrationJob
    from shared.data.synth import synthesize
    from shared.fit.calibrate import calibrate
    from shared.fit.warm import WarmSource

    out = {"devices": [str(d) for d in jax.devices()], "platform": jax.devices()[0].platform, "jobs": {}}
    for label, spec in JOBS.items():
        seasons = spec["seasons"] or large_seasons
        ds = synthesize(seasons=seasons, scenarios=300, seed=1, first_season=2018)  # every race dated in the past

        def job(seed, spec=spec):
            return CalibrationJob(archetype=spec["archetype"], dataset_uri="file:///bench.nc", dataset_sha256="0" * 64,
                                  events=spec["events"], sampler={**SAMPLER, "seed": seed})

        runs = []
        first_idata, first = None, None
        for kind, seed, warm in (("cold, compiles", 1, False), ("cold, compiled", 2, False), ("warm", 3, True)):
            source = WarmSource(first_idata, first.job.job_id, None, first.data_through) if warm else None
            began = time.perf_counter()
            idata, fit = calibrate(ds, job(seed), warm=source)
            wall = time.perf_counter() - began
            if first is None:
                first_idata, first = idata, fit
            d = fit.diagnostics
            runs.append({
                "run": kind, "rows": fit.n_rows, "attempts": len(fit.attempts), "wall_s": wall,
                "compile_s": fit.compile_s, "sample_s": fit.sample_s, "divergences": d.divergences,
                "max_rhat": d.max_rhat, "min_ess_bulk": d.min_ess_bulk, "ess_per_s": d.ess_bulk_per_second,
                "mean_leapfrog": d.mean_leapfrog_steps, "warmup": fit.attempts[-1].warmup,
            })
            print(label, runs[-1], file=sys.stderr, flush=True)
        out["jobs"][label] = runs
    return out


def pinning() -> dict:
    """The GPU worker plan on this machine, and what JAX sees in a child with its environment."""
    from worker.supervisor import detect_gpus, plan_workers

    gpus = detect_gpus()
    specs = plan_workers("auto", hostname="bench")
    seen = []
    for spec in specs:
        env = {**os.environ, **spec.env}
        probe = subprocess.run(
            [sys.executable, "-c", "import jax, json; print(json.dumps([str(d) for d in jax.devices()]))"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        seen.append({"worker": spec.name, "env": spec.env, "jax_devices": probe.stdout.strip() or probe.stderr[-500:]})
    return {"nvidia_smi_gpus": gpus, "workers": seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    parser.add_argument("--large-seasons", type=int, default=6)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.large_seasons)))
        return

    from worker.supervisor import plan_workers

    results = {"machine": platform.platform(), "python": platform.python_version(), "pinning": pinning(), "platforms": {}}
    print(json.dumps(results["pinning"], indent=1))
    plans = {"gpu": plan_workers("auto", hostname="bench"), "cpu": [] if args.skip_cpu else plan_workers("none", hostname="bench")}
    for name, specs in plans.items():
        if not specs or (name == "gpu" and specs[0].gpu is None):
            continue
        env = {**os.environ, **specs[0].env}
        run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--large-seasons", str(args.large_seasons)],
                             env=env, capture_output=True, text=True, timeout=540)
        sys.stderr.write(run.stderr[-4000:])
        if run.returncode != 0:
            results["platforms"][name] = {"error": run.stderr[-2000:]}
            continue
        results["platforms"][name] = json.loads(run.stdout.strip().splitlines()[-1])

    print(f"\n{'platform':8} {'job':6} {'run':16} {'rows':>6} {'compile s':>9} {'sample s':>9} {'leapfrog':>8} "
          f"{'min ESS':>8} {'ESS/s':>8} {'div':>4} {'R-hat':>6}")
    for name, result in results["platforms"].items():
        for label, runs in result.get("jobs", {}).items():
            for r in runs:
                print(f"{name:8} {label:6} {r['run']:16} {r['rows']:>6} {r['compile_s']:>9.1f} {r['sample_s']:>9.1f} "
                      f"{r['mean_leapfrog']:>8.1f} {r['min_ess_bulk']:>8.0f} {r['ess_per_s']:>8.0f} {r['divergences']:>4} "
                      f"{r['max_rhat']:>6.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

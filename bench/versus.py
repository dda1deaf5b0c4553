"""calq against plain NumPyro on the same model and the same data, in the same run.

For three sizes (~1.5k, ~6k and ~24k rows of synthetic seasons) it fits the
documented calibration model twice over:

- **plain NumPyro**: ``MCMC(NUTS(model))``, the model written as its
  documentation reads (non-centred track level, same priors, a Bernoulli
  likelihood per row, no padding), 4 chains ``chain_method="parallel"`` on 4
  host devices, 500 + 1000, ArviZ for ESS. *fresh*: a new process (import,
  data, compile, sample, ESS), timed from outside; *warm*: a second
  ``MCMC.run`` in that process with another key (same-shaped data, so the
  compile is not repeated).
- **calq**: *fresh*: a new ``calq calibrate`` process (embedded mode) on a
  compile cache filled by an earlier process, timed from outside; *warm*:
  a second job (another seed) in a process that already ran one — what a
  long-running worker sees. Remedy attempts, if any, count in its time.

Both report min bulk-ESS over the same parameters (α and β of archetypes
and tracks, σ included) and min-ESS per second: for *fresh*, per wall
second of the whole process; for *warm*, per sampling second (calq: its
``sample_s``; plain: the second run's wall time, which is all sampling).
Every ratio is calq ÷ plain: for ESS/s higher is better, for seconds lower.

Usage: ``python bench/versus.py [--sizes small medium large] [--json bench/results/versus.json]``.
The machine may be shared: other processes' load slows both sides; the
table records the load average at the start and end.
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
PARAMETERS = ("alpha_arch", "beta_arch", "sigma_alpha", "sigma_log_beta", "alpha_track", "beta_track")
#: name → (archetype, seasons, events): about 1.5k, 6k and 24k rows.
SIZES: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "small": ("intermediate", 1, ("top_5", "top_10")),
    "medium": ("all", 2, ("top_5", "top_10")),
    "large": ("all", 6, ("top_1", "top_5", "top_10")),
}


# ----------------------------------------------------------------- plain NumPyro


def plain_child(dataset: str, archetype: str, events: list[str]) -> dict:
    """Fit with MCMC(NUTS) as the model's documentation reads; report the first and a second run."""
    import arviz as az
    import jax
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS

    from shared.contract.domain import archetypes_of
    from shared.data.dataset import event_rows, open_dataset, select_archetypes

    ds = open_dataset(dataset)
    wanted = archetypes_of(archetype)
    ds = select_archetypes(ds, wanted)
    present = [a for a in wanted if a in set(ds["archetype"].values.astype(str))]
    rows = event_rows(ds, events=events, archetypes=present)
    E, A, K = len(events), len(present), len(rows.tracks)
    x = jnp.asarray(np.log(rows.p) - np.log1p(-rows.p), jnp.float32)
    y, ev, tr = jnp.asarray(rows.y, jnp.int32), jnp.asarray(rows.event), jnp.asarray(rows.track)
    ta = jnp.asarray(rows.track_archetype)

    def model(x, y):
        with numpyro.plate("event", E, dim=-2), numpyro.plate("archetype", A, dim=-1):
            alpha_arch = numpyro.sample("alpha_arch", dist.Normal(0.0, 1.0))
            log_beta_arch = numpyro.sample("log_beta_arch", dist.Normal(0.0, 0.5))
            sigma_alpha = numpyro.sample("sigma_alpha", dist.HalfNormal(0.25))
            sigma_log_beta = numpyro.sample("sigma_log_beta", dist.HalfNormal(0.15))
        numpyro.deterministic("beta_arch", jnp.exp(log_beta_arch))
        with numpyro.plate("event_t", E, dim=-2), numpyro.plate("track", K, dim=-1):
            z_a = numpyro.sample("alpha_track_z", dist.Normal(0.0, 1.0))
            z_b = numpyro.sample("log_beta_track_z", dist.Normal(0.0, 1.0))
        alpha_track = numpyro.deterministic("alpha_track", alpha_arch[:, ta] + sigma_alpha[:, ta] * z_a)
        beta_track = numpyro.deterministic("beta_track", jnp.exp(log_beta_arch[:, ta] + sigma_log_beta[:, ta] * z_b))
        with numpyro.plate("row", x.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=alpha_track[ev, tr] + beta_track[ev, tr] * x), obs=y)

    mcmc = MCMC(NUTS(model), num_warmup=500, num_samples=1000, num_chains=4, chain_method="parallel",
                progress_bar=False, jit_model_args=True)
    runs = []
    for seed in (0, 1):
        t = time.perf_counter()
        mcmc.run(jax.random.PRNGKey(seed), x, y, extra_fields=("diverging", "num_steps"))
        samples = mcmc.get_samples(group_by_chain=True)
        jax.block_until_ready(samples)
        fit_s = time.perf_counter() - t
        idata = az.from_dict(posterior={k: np.asarray(samples[k]) for k in PARAMETERS})
        ess = az.ess(idata, method="bulk")
        extra = mcmc.get_extra_fields(group_by_chain=True)
        runs.append({
            "fit_s": fit_s,
            "min_ess_bulk": min(float(ess[k].min()) for k in PARAMETERS),
            "divergences": int(np.asarray(extra["diverging"]).sum()),
            "leapfrog": float(np.asarray(extra["num_steps"]).mean()),
        })
    return {"rows": rows.n_rows, "runs": runs}


# ------------------------------------------------------------------------- calq


def calq_warm_child(dataset: str, archetype: str, events: list[str], cache: str) -> dict:
    """Two calq jobs in one process (seeds 0 and 1): the second is what a warm worker sees."""
    from shared.contract.job import CalibrationJob
    from shared.data.dataset import open_dataset
    from shared.fit.calibrate import calibrate
    from shared.fit.sampler import COMPILES, enable_compile_cache

    enable_compile_cache(cache)
    ds = open_dataset(dataset)
    runs = []
    for seed in (0, 1):
        job = CalibrationJob(archetype=archetype, dataset_uri=f"file://{dataset}", dataset_sha256="0" * 64,
                             events=events, sampler={"seed": seed})
        compiles = COMPILES.count
        t = time.perf_counter()
        summary = calibrate(ds, job)[1].summary()
        wall = time.perf_counter() - t
        d = summary.diagnostics
        runs.append({
            "wall_s": wall, "sample_s": summary.timings.sample_s, "compile_s": summary.timings.compile_s,
            "min_ess_bulk": d.min_ess_bulk, "divergences": d.divergences, "leapfrog": d.mean_leapfrog_steps,
            "attempts": len(summary.attempts), "converged": summary.converged,
            "compiles": COMPILES.count - compiles,
        })
    return {"rows": summary.n_rows, "runs": runs}


def calq_cli(dataset: str, archetype: str, events: list[str], cache: str, store: str, env: dict) -> dict:
    """One fresh ``calq calibrate`` process, timed from outside."""
    env = dict(env, CALQ_STORAGE_URL=store, CALQ_COMPILE_CACHE_DIR=cache)
    env.pop("XLA_FLAGS", None)  # the CLI chooses its host devices itself, as a user's shell would
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "producer.cli", "calibrate", dataset, "--archetype", archetype,
         "--events", ",".join(events), "--json"],
        env=env, cwd=ROOT, capture_output=True, text=True, check=True,
    )
    wall = time.perf_counter() - t
    summary = json.loads(out.stdout)
    return {"wall_s": wall, "min_ess_bulk": summary["diagnostics"]["min_ess_bulk"],
            "attempts": len(summary.get("attempts", [])), "converged": summary["converged"]}


# ----------------------------------------------------------------------- driver


def child_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("XLA_FLAGS", None)
    use_host_devices(environ=env)
    return {k: v for k, v in env.items() if not k.startswith("CALQ_")}


def run_child(kind: str, env: dict, *args: str) -> tuple[dict, float]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", kind, *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t


def measure(size: str, work: Path, env: dict) -> dict:
    from shared.data.dataset import save_dataset
    from shared.data.synth import synthesize

    archetype, seasons, events = SIZES[size]
    dataset = str(work / f"{size}.nc")
    save_dataset(synthesize(seasons=seasons, scenarios=300, seed=11, first_season=2018), dataset)  # dated in the past
    ev = ",".join(events)
    plain, plain_wall = run_child("plain", env, dataset, archetype, ev)
    cache = str(work / f"cache-{size}")
    warm, _ = run_child("calq-warm", env, dataset, archetype, ev, cache)
    store = str(work / f"store-{size}")
    calq_cli(dataset, archetype, list(events), cache, store, env)  # fills the cache for the CLI's own compile
    fresh = calq_cli(dataset, archetype, list(events), cache, store + "-2", env)
    p1, p2 = plain["runs"]
    w = warm["runs"][1]
    row = {
        "size": size, "rows": plain["rows"], "archetype": archetype, "seasons": seasons, "events": list(events),
        "plain_fresh_s": plain_wall, "plain_fresh_min_ess": p1["min_ess_bulk"],
        "plain_fresh_ess_per_s": p1["min_ess_bulk"] / plain_wall,
        "plain_warm_s": p2["fit_s"], "plain_warm_min_ess": p2["min_ess_bulk"],
        "plain_warm_ess_per_s": p2["min_ess_bulk"] / p2["fit_s"], "plain_leapfrog": p2["leapfrog"],
        "plain_divergences": [p1["divergences"], p2["divergences"]],
        "calq_fresh_s": fresh["wall_s"], "calq_fresh_min_ess": fresh["min_ess_bulk"],
        "calq_fresh_ess_per_s": fresh["min_ess_bulk"] / fresh["wall_s"], "calq_fresh_attempts": fresh["attempts"],
        "calq_warm_s": w["wall_s"], "calq_warm_sample_s": w["sample_s"], "calq_warm_min_ess": w["min_ess_bulk"],
        "calq_warm_ess_per_s": w["min_ess_bulk"] / w["sample_s"], "calq_leapfrog": w["leapfrog"],
        "calq_warm_attempts": w["attempts"], "calq_warm_compiles": w["compiles"], "calq_converged": w["converged"],
    }
    row["ratio_warm_ess_per_s"] = row["calq_warm_ess_per_s"] / row["plain_warm_ess_per_s"]
    row["ratio_fresh_s"] = row["calq_fresh_s"] / row["plain_fresh_s"]
    row["ratio_warm_job_s_vs_plain_fresh_s"] = row["calq_warm_s"] / row["plain_fresh_s"]
    row["ratio_fresh_ess_per_s"] = row["calq_fresh_ess_per_s"] / row["plain_fresh_ess_per_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "versus.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "plain":
        dataset, archetype, events = args.args
        print(json.dumps(plain_child(dataset, archetype, events.split(","))))
        return
    if args.child == "calq-warm":
        dataset, archetype, events, cache = args.args
        print(json.dumps(calq_warm_child(dataset, archetype, events.split(","), cache)))
        return

    env = child_env()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="calq-versus-") as work:
        for size in args.sizes:
            rows.append(measure(size, Path(work), env))
            print(f"{size}: done", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    header = ("rows", "plain fresh s", "calq fresh s", "fresh s calq÷plain", "plain warm ESS/s", "calq warm ESS/s",
              "warm ESS/s calq÷plain", "calq warm job s", "warm job s ÷ plain fresh s", "leapfrog plain/calq",
              "calq attempts")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join([
            f"{r['rows']:,}", f"{r['plain_fresh_s']:.1f}", f"{r['calq_fresh_s']:.1f}", f"{r['ratio_fresh_s']:.2f}",
            f"{r['plain_warm_ess_per_s']:.0f}", f"{r['calq_warm_ess_per_s']:.0f}", f"{r['ratio_warm_ess_per_s']:.2f}",
            f"{r['calq_warm_s']:.1f}", f"{r['ratio_warm_job_s_vs_plain_fresh_s']:.2f}",
            f"{r['plain_leapfrog']:.0f}/{r['calq_leapfrog']:.0f}", str(r["calq_warm_attempts"]),
        ]) + " |")
    print(f"\nload average (1 min) before/after: {load_before[0]:.1f}/{load_after[0]:.1f} on {os.cpu_count()} cores")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "machine": os.uname().machine, "cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after,
        "ratios": "calq ÷ plain: ESS/s higher is better, seconds lower is better", "rows": rows,
    }, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

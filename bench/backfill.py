"""Benchmark backfills keyed by data window, and the out-of-sample table of ``calq evaluate``.

Embedded mode (jobs run in this process, on a temporary local store), on a
synthetic dataset of ``--seasons`` seasons:

1. **Throughput.** Superspeedway and intermediate as of every race date of
   the last ``--backfill-seasons`` seasons (the issue measured one), three times in one process, each on its own store:
   keyed by data window with warm starts (each job starts from the nearest
   stored fit of its archetype: :mod:`shared.fit.warm`); keyed by data
   window, every job cold (``warm_start=False``); and per race date, cold
   (one job per archetype and race date of any archetype, the old plan).
   Reported: jobs, jobs that started warm, wall time, sampler and compile
   seconds, jobs per minute, and as-of dates answered per minute (the figure
   that matters: every plan answers "the calibration as of every race date").
   A cold pass over the same windows (its own store) compiles every sampler
   first: warm and cold runs share one compiled sampler per bucket, so the
   measured runs compare a long-running worker's throughput.
   **Batched** (``--batch-cap``, default 32; 0 skips it): the warm plan again,
   as batch deliveries of up to that many jobs in as-of order
   (:func:`shared.jobs.batch.run_batch`, batching forced even on a CPU,
   where :func:`shared.fit.batch.batching_pays` says it does not), on its
   own store after its own compile pass; printed beside the single warm run
   with the speed-up and, for every parameter of every job, |z| of the
   batched answer against the single one (Monte Carlo error units, as below).
2. **Agreement.** The same window job, warm and cold (same races, same
   seed): every parameter's posterior mean, z = Δmean / √(se₁² + se₂²),
   se = sd / √ESS_bulk (Monte Carlo error). And each (archetype, race date)
   answered by a window job and by a per-date job with another seed, α and
   β of the archetype per event. If both sample the same posterior, |z|
   looks like a standard normal: ~5 % above 2 (parameters of one job share
   its Monte Carlo error, so the share varies more than independent draws').
3. **The evaluation table**: ``calq evaluate`` over all the seasons for
   every archetype (the window jobs of step 1 are reused from the store).

Usage::

    python bench/backfill.py [--seasons 3] [--scenarios 400] [--warmup 500] [--samples 1000] [--chains 4]
                             [--min-ess 400] [--json bench/results/backfill.json] [--skip-per-date] [--skip-evaluate]
                             [--skip-cold] [--batch-cap 32]

The defaults are a production job's sampler and convergence criteria
(R-hat ≤ 1.01 as in production unless ``--max-rhat``); shorter chains need
a lower ``--min-ess``: say so next to figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.fit.device import use_host_devices  # noqa: E402  (imports no JAX)

use_host_devices()

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from producer.backfill import Backfill, RaceCalendar  # noqa: E402
from producer.client import CalibrationClient  # noqa: E402
from producer.evaluate import Evaluation, evaluate_table  # noqa: E402
from shared.contract.settings import Settings  # noqa: E402
from shared.contract.summary import ConvergenceCriteria  # noqa: E402
from shared.data.dataset import save_dataset  # noqa: E402
from shared.data.synth import synthesize  # noqa: E402

ARCHETYPES = ["superspeedway", "intermediate"]
EVENTS = "top_5,top_10"


def client_for(store: Path, cache: Path, args, *, warm_start: bool) -> CalibrationClient:
    return CalibrationClient(Settings(
        storage_url=str(store), compile_cache_dir=str(cache), warm_start=warm_start,
        convergence=ConvergenceCriteria(min_ess_bulk=args.min_ess, max_rhat=args.max_rhat, max_divergences=0),
    ))


def timed_backfill(client, dataset, *, label, start, end, sampler, dedup, console) -> dict:
    plan = Backfill(client, dataset, start=start, end=end, archetypes=ARCHETYPES, events=EVENTS,
                    sampler=sampler, dedup=dedup)
    windows = plan.windows()
    began = time.perf_counter()
    outcomes = plan.run(windows=windows, max_in_flight=1, console=console)
    return throughput_row(client, label, windows, outcomes, time.perf_counter() - began)


def batched_backfill(client, dataset, *, label, start, end, sampler, cap, console) -> dict:
    """The same backfill as one batch delivery per ``cap`` jobs (shared.jobs.batch.run_batch, batching forced).

    Jobs go in as-of order, so each batch after the first starts warm from the fits of the one before it.
    """
    from producer.backfill import Outcome
    from shared.jobs.batch import run_batch

    plan = Backfill(client, dataset, start=start, end=end, archetypes=ARCHETYPES, events=EVENTS, sampler=sampler)
    windows = sorted(plan.windows(), key=lambda w: (w.as_of, w.archetype))
    services = client.services
    began = time.perf_counter()
    for job in (w.job for w in windows):
        client.registry.claim(job)
    results = []
    for first in range(0, len(windows), cap):
        wave = [w.job.to_message() for w in windows[first : first + cap]]
        results.extend(run_batch(services, wave, worker="bench", batch=True))
        console.print(f"{label}: {len(results)}/{len(windows)} jobs", highlight=False)
    outcomes = [Outcome(w.archetype, w.as_of, w.job.job_id, client.registry.get(w.job.job_id).state.value)
                for w in windows]
    return throughput_row(client, label, windows, outcomes, time.perf_counter() - began, batched=True)


def throughput_row(client, label, windows, outcomes, wall: float, *, batched: bool = False) -> dict:
    """A backfill's row of the throughput table: its jobs, their summaries' figures, and the wall time."""
    answered = sum(len(w.days) for w in windows)
    summaries = [client.result(o.job_id) for o in outcomes if o.state == "succeeded"]
    return {
        "plan": label,
        "jobs": len(windows),
        "succeeded": sum(o.state == "succeeded" for o in outcomes),
        "converged": sum(s.converged for s in summaries),
        "warm_started": sum(s.warm_start is not None for s in summaries),
        "went_cold": sum(s.warm_start is not None and not s.attempts[-1].warm_start for s in summaries),
        "attempts": sum(len(s.attempts) for s in summaries),
        "by_archetype": {
            a: {
                "jobs": len(mine),
                "attempts": sum(len(s.attempts) for s in mine),
                "sample_s": sum(s.timings.sample_s for s in mine),
                "mean_leapfrog_kept": float(np.mean([s.diagnostics.mean_leapfrog_steps for s in mine])),
                "targets_kept": sorted({s.attempts[-1].target_accept_prob for s in mine}),
                "min_ess_bulk": float(min(s.diagnostics.min_ess_bulk for s in mine)),
            }
            for a in ARCHETYPES if (mine := [s for s in summaries if s.archetype == a])
        },
        "sample_s": sum(s.timings.sample_s for s in summaries),
        "compile_s": sum(s.timings.compile_s for s in summaries),
        "per_job_s": per_job_split(summaries, wall, batched=batched),
        "as_of_dates_answered": answered,
        "wall_s": wall,
        "jobs_per_min": 60 * len(windows) / wall,
        "as_of_dates_per_min": 60 * answered / wall,
        "windows": windows,
    }


#: The per-job split: (column, what it counts), each a mean over the succeeded jobs, in seconds.
SPLIT = (
    ("load", "reading and checking the dataset, finding the warm start (timings.load_s)"),
    ("sampler", "compiling and sampling, every attempt (timings.compile_s + sample_s)"),
    ("diagnostics", "R-hat/ESS, parameter summaries, the InferenceData, in-sample scores (timings.diagnostics_s)"),
    ("scoring", "the raw forecasts' ensemble and joint-event scores (timings.score_s)"),
    ("write", "the posterior's NetCDF and the summary, spooled and stored (timings.write_s)"),
    ("rest", "the rest of the job's own time: R-hat/ESS between attempts, selecting rows (total_s − the above)"),
    ("registry", "outside the job: records, queue, client, the backfill loop (wall ÷ jobs − total_s)"),
    ("overhead", "everything but the sampler (wall ÷ jobs − sampler)"),
)


def per_job_split(summaries, wall: float, *, batched: bool = False) -> dict:
    """Mean seconds per job in each part of :data:`SPLIT` (the summaries' timings, and the wall clock).

    ``batched``: each job's first run was sampled in its batch's program,
    before the job's own time began (its ``total_s`` is phase 2's), so its
    share of the batch is added to the job's time.
    """
    if not summaries:
        return {}
    t = [s.timings for s in summaries]
    own = [x.total_s + (s.attempts[0].sample_s + s.attempts[0].compile_s if batched else 0.0)
           for s, x in zip(summaries, t)]

    def mean(values) -> float:
        return float(np.mean(list(values)))

    split = {
        "load": mean(x.load_s for x in t),
        "sampler": mean(x.compile_s + x.sample_s for x in t),
        "diagnostics": mean(x.diagnostics_s for x in t),
        "scoring": mean(x.score_s for x in t),
        "write": mean(x.write_s for x in t),
    }
    split["rest"] = mean(own) - sum(split.values())
    split["registry"] = wall / len(summaries) - mean(own)
    split["overhead"] = wall / len(summaries) - split["sampler"]
    return split


def split_table(rows: list[dict]) -> Table:
    """The per-job split of each plan (:data:`SPLIT`), with the load average it was measured under."""
    table = Table(title=f"per job, seconds (mean over succeeded jobs; load average {_loadavg()})")
    table.add_column("plan")
    for column, _ in SPLIT:
        table.add_column(column, justify="right")
    for r in rows:
        split = r["per_job_s"]
        table.add_row(r["plan"], *(f"{split.get(column, float('nan')):.3f}" for column, _ in SPLIT))
    return table


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def z_summary(z: list[float]) -> dict:
    z = np.abs(np.asarray(z))
    return {"comparisons": int(z.size), "max_abs_z": float(z.max()), "share_abs_z_over_2": float((z > 2).mean()),
            "median_abs_z": float(np.median(z))}


def warm_cold_agreement(warm_client, warm_windows, cold_client, cold_windows, *, warm_only: bool = True) -> dict:
    """The same window job warm and cold: z of every parameter's posterior mean (both runs' Monte Carlo error).

    The jobs are matched by archetype and as-of date (their ids differ: each store holds its own copy of the dataset).
    ``warm_only=False`` compares every job (the batched run against the single one).
    """
    cold_job = {(w.archetype, w.as_of): w.job.job_id for w in cold_windows}
    z = []
    for w in warm_windows:
        warm, cold = warm_client.result(w.job.job_id), cold_client.result(cold_job[(w.archetype, w.as_of)])
        if warm_only and warm.warm_start is None:
            continue  # the first job of an archetype ran cold in both
        by_name = {p.name: p for p in cold.parameters}
        for p in warm.parameters:
            q = by_name[p.name]
            z.append((p.mean - q.mean) / np.hypot(p.sd / np.sqrt(p.ess_bulk), q.sd / np.sqrt(q.ess_bulk)))
    return z_summary(z)


def agreement(client_a, windows_a, client_b, windows_b) -> dict:
    """Per (archetype, race date): window job (a) against per-date job (b); z of α and β per event."""
    by_day_b = {(w.archetype, d): w for w in windows_b for d in w.days}
    cache: dict[str, object] = {}

    def summary(client, job_id):
        if job_id not in cache:
            cache[job_id] = client.result(job_id)
        return cache[job_id]

    z = []
    for w in windows_a:
        sa = summary(client_a, w.job.job_id)
        for day in w.days:
            other = by_day_b[(w.archetype, day)]
            assert other.races == w.races, (w.archetype, day)
            sb = summary(client_b, other.job.job_id)
            for event in sa.events:
                for name in ("alpha_arch", "beta_arch"):
                    pa = sa.parameter(name, event, archetype=w.archetype)
                    pb = sb.parameter(name, event, archetype=w.archetype)
                    se = np.hypot(pa.sd / np.sqrt(pa.ess_bulk), pb.sd / np.sqrt(pb.ess_bulk))
                    z.append((pa.mean - pb.mean) / se)
    return z_summary(z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seasons", type=int, default=3)
    parser.add_argument("--scenarios", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--min-ess", type=float, default=400)
    parser.add_argument("--max-rhat", type=float, default=1.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backfill-seasons", type=int, default=2, help="as-of dates over the last N seasons")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "backfill.json")
    parser.add_argument("--skip-per-date", action="store_true", help="no per-date run (the old plan)")
    parser.add_argument("--skip-evaluate", action="store_true")
    parser.add_argument("--skip-cold", action="store_true", help="no cold by-window run")
    parser.add_argument("--batch-cap", type=int, default=32,
                        help="jobs per batch delivery of the batched run (0: no batched run)")
    args = parser.parse_args()
    console = Console(stderr=True)
    sampler = {"warmup": args.warmup, "samples": args.samples, "chains": args.chains, "seed": 0}
    results: dict = {"machine": platform.platform(), "python": platform.python_version(),
                     "settings": {**vars(args), "json": str(args.json)}, "sampler": sampler}

    with tempfile.TemporaryDirectory(prefix="calq-bench-backfill-") as tmp:
        tmp = Path(tmp)
        first = 2024
        ds = synthesize(seasons=args.seasons, scenarios=args.scenarios, seed=args.seed, first_season=first)
        dataset = save_dataset(ds, tmp / "seasons.nc")
        calendar = RaceCalendar.of(ds)
        last = first + args.seasons - 1
        start, end = date(last - args.backfill_seasons + 1, 1, 1), date(last, 12, 31)
        cache = tmp / "jax-cache"
        # Imports and every compile outside the measured range: a cold pass over the same windows on a store of
        # its own (its fits must seed nothing). Warm and cold runs share one compiled sampler per bucket, so the
        # measured runs compile nothing: they compare a long-running worker's throughput.
        began = time.perf_counter()
        Backfill(client_for(tmp / "store-first", cache, args, warm_start=False), dataset, start=start, end=end,
                 archetypes=ARCHETYPES, events=EVENTS, sampler=sampler).run(max_in_flight=1, console=console)
        if args.batch_cap:  # the batched programs (one per bucket, warm or cold, and ladder size) compiled too
            batched_backfill(client_for(tmp / "store-first-batched", cache, args, warm_start=True), dataset,
                             label="compile pass, batched", start=start, end=end, sampler=sampler,
                             cap=args.batch_cap, console=console)
        results["compile_pass_s"] = time.perf_counter() - began

        runs = [("by data window, warm starts", "store-window", True, True, sampler)]
        if not args.skip_cold:
            runs.append(("by data window, cold", "store-cold", False, True, sampler))
        if not args.skip_per_date:
            runs.append(("by race date, cold (old plan)", "store-date", False, False, {**sampler, "seed": 1}))
        clients, rows = [], []
        for label, folder, warm, dedup, settings in runs:
            clients.append(client_for(tmp / folder, cache, args, warm_start=warm))
            rows.append(timed_backfill(clients[-1], dataset, label=label, start=start, end=end, sampler=settings,
                                       dedup=dedup, console=console))
        by_window = clients[0]
        if args.batch_cap:
            label = f"by data window, warm starts, batched (≤ {args.batch_cap} jobs a batch)"
            batched = client_for(tmp / "store-batched", cache, args, warm_start=True)
            rows.append(batched_backfill(batched, dataset, label=label, start=start, end=end, sampler=sampler,
                                         cap=args.batch_cap, console=console))
            results["agreement_batched_single"] = warm_cold_agreement(batched, rows[-1]["windows"], clients[0],
                                                                      rows[0]["windows"], warm_only=False)
            results["batched_speedup"] = rows[-1]["jobs_per_min"] / rows[0]["jobs_per_min"]
        if not args.skip_cold:
            results["agreement_warm_cold"] = warm_cold_agreement(clients[0], rows[0]["windows"], clients[1],
                                                                 rows[1]["windows"])
        if not (args.skip_per_date or args.skip_cold):
            results["agreement"] = agreement(clients[1], rows[1]["windows"], clients[2], rows[2]["windows"])
        dates = len(calendar.race_days(start, end))
        table = Table(title=f"backfill {', '.join(ARCHETYPES)} over {start.year}–{last} ({dates} race dates), "
                            f"embedded, {args.chains}×({args.warmup}+{args.samples}) draws")
        columns = ("plan", "jobs", "converged", "warm-started", "went cold", "attempts", "as-of dates",
                   "wall s", "sample s", "compile s", "jobs/min", "as-of dates/min")
        for column in columns:
            table.add_column(column, justify="left" if column == "plan" else "right")
        for r in rows:
            table.add_row(r["plan"], str(r["jobs"]), str(r["converged"]), str(r["warm_started"]), str(r["went_cold"]),
                          str(r["attempts"]), str(r["as_of_dates_answered"]), f"{r['wall_s']:.0f}", f"{r['sample_s']:.0f}",
                          f"{r['compile_s']:.0f}", f"{r['jobs_per_min']:.1f}", f"{r['as_of_dates_per_min']:.1f}")
        Console(width=200).print(table)
        per = Table(title="per archetype")
        for column in ("plan", "archetype", "jobs", "attempts", "sample s", "mean leapfrog (kept run)",
                       "target accept (kept runs)", "min bulk ESS"):
            per.add_column(column, justify="left" if column in ("plan", "archetype") else "right")
        for r in rows:
            for archetype, a in r["by_archetype"].items():
                per.add_row(r["plan"], archetype, str(a["jobs"]), str(a["attempts"]), f"{a['sample_s']:.1f}",
                            f"{a['mean_leapfrog_kept']:.1f}", ", ".join(map(str, a["targets_kept"])), f"{a['min_ess_bulk']:.0f}")
        Console(width=200).print(per)
        Console(width=200).print(split_table(rows))
        results["split_columns"] = dict(SPLIT)
        results["load_average"] = _loadavg()
        results["throughput"] = [{k: v for k, v in r.items() if k != "windows"} for r in rows]
        if "agreement_batched_single" in results:
            a = results["agreement_batched_single"]
            Console(width=200).print(f"batched against single ({results['batched_speedup']:.2f}× the jobs/min; the same "
                                     f"window job, every parameter): {a['comparisons']} comparisons, median |z| "
                                     f"{a['median_abs_z']:.2f}, max |z| {a['max_abs_z']:.2f}, share |z| > 2: "
                                     f"{a['share_abs_z_over_2']:.1%}; load average {_loadavg()}")
        if "agreement_warm_cold" in results:
            a = results["agreement_warm_cold"]
            Console(width=200).print(f"agreement (the same window job warm and cold, every parameter): {a['comparisons']} "
                                     f"comparisons, median |z| {a['median_abs_z']:.2f}, max |z| {a['max_abs_z']:.2f}, "
                                     f"share |z| > 2: {a['share_abs_z_over_2']:.1%}")
        if "agreement" in results:
            a = results["agreement"]
            Console(width=200).print(f"agreement (window job vs per-date job, seed 0 vs 1, α and β per event): "
                                     f"{a['comparisons']} comparisons, median |z| {a['median_abs_z']:.2f}, "
                                     f"max |z| {a['max_abs_z']:.2f}, share |z| > 2: {a['share_abs_z_over_2']:.1%}")

        if not args.skip_evaluate:
            began = time.perf_counter()
            evaluation = Evaluation(by_window, dataset, start=date(first, 1, 1), end=date(last, 12, 31),
                                    events=EVENTS, sampler=sampler)
            result = evaluation.run(console=console)
            results["evaluate"] = {"wall_s": time.perf_counter() - began, "jobs": len(result.outcomes),
                                   "records": [{k: v for k, v in r.items() if k not in ("per_race", "tracks")}
                                               for r in result.to_json()]}
            Console(width=200).print(evaluate_table(result.records))

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Benchmark backfills keyed by data window, and the out-of-sample table of ``calq evaluate``.

Embedded mode (jobs run in this process, on a temporary local store), on a
synthetic dataset of ``--seasons`` seasons:

1. **Throughput.** Superspeedway and intermediate over the last season, as
   the issue measured it: once keyed by data window (one job per archetype
   per distinct window) and once per race date (one job per archetype and
   race date of any archetype, the old plan). Reported: jobs, wall time,
   jobs per minute, and as-of dates answered per minute (the figure that
   matters: both plans answer "the calibration as of every race date").
2. **Agreement.** Each (archetype, race date) is answered by a window job
   and by a per-date job with another seed; per event, the posterior means
   of α and β of the archetype are compared: z = Δmean / √(se₁² + se₂²),
   se = sd / √ESS_bulk (Monte Carlo error). Both fit the same races, so
   |z| should look like a standard normal: ~5 % above 2.
3. **The evaluation table**: ``calq evaluate`` over all the seasons for
   every archetype (the window jobs of step 1 are reused from the store).

Usage::

    python bench/backfill.py [--seasons 3] [--scenarios 400] [--warmup 300] [--samples 300] [--chains 2]
                             [--json bench/results/backfill.json] [--skip-agreement] [--skip-evaluate]

The convergence criteria are relaxed to ESS ≥ ``--min-ess`` (default 100)
so that short benchmark chains count as converged; say so next to figures.
"""

from __future__ import annotations

import argparse
import json
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


def client_for(store: Path, cache: Path, min_ess: float) -> CalibrationClient:
    return CalibrationClient(Settings(
        storage_url=str(store), compile_cache_dir=str(cache),
        convergence=ConvergenceCriteria(min_ess_bulk=min_ess, max_rhat=1.05, max_divergences=0),
    ))


def timed_backfill(client, dataset, *, start, end, sampler, dedup, console) -> dict:
    plan = Backfill(client, dataset, start=start, end=end, archetypes=ARCHETYPES, events=EVENTS,
                    sampler=sampler, dedup=dedup)
    windows = plan.windows()
    began = time.perf_counter()
    outcomes = plan.run(windows=windows, max_in_flight=1, console=console)
    wall = time.perf_counter() - began
    answered = sum(len(w.days) for w in windows)
    return {
        "plan": "by data window" if dedup else "by race date",
        "jobs": len(windows),
        "succeeded": sum(o.state == "succeeded" for o in outcomes),
        "as_of_dates_answered": answered,
        "wall_s": wall,
        "jobs_per_min": 60 * len(windows) / wall,
        "as_of_dates_per_min": 60 * answered / wall,
        "windows": windows,
    }


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
    z = np.abs(np.asarray(z))
    return {"comparisons": int(z.size), "max_abs_z": float(z.max()), "share_abs_z_over_2": float((z > 2).mean()),
            "median_abs_z": float(np.median(z))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seasons", type=int, default=3)
    parser.add_argument("--scenarios", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--min-ess", type=float, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "backfill.json")
    parser.add_argument("--skip-agreement", action="store_true", help="no per-date run: throughput by window only")
    parser.add_argument("--skip-evaluate", action="store_true")
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
        start, end = date(last, 1, 1), date(last, 12, 31)
        cache = tmp / "jax-cache"
        by_window = client_for(tmp / "store-window", cache, args.min_ess)
        # warm up (imports, first compilation) outside the measured range; the per-date run comes second
        # and finds every sampler compiled: the comparison favours it, if anything
        day = calendar.race_days(date(first, 3, 1), date(first, 12, 31))[0]
        Backfill(by_window, dataset, start=day, end=day, archetypes=ARCHETYPES[:1], events=EVENTS, sampler=sampler).run()

        rows = [timed_backfill(by_window, dataset, start=start, end=end, sampler=sampler, dedup=True, console=console)]
        if not args.skip_agreement:
            by_date = client_for(tmp / "store-date", cache, args.min_ess)
            rows.append(timed_backfill(by_date, dataset, start=start, end=end, sampler={**sampler, "seed": 1},
                                       dedup=False, console=console))
            results["agreement"] = agreement(by_window, rows[0]["windows"], by_date, rows[1]["windows"])
        table = Table(title=f"backfill {', '.join(ARCHETYPES)} over {last} ({len(calendar.race_days(start, end))} race dates), "
                            f"embedded, {args.chains}×({args.warmup}+{args.samples}) draws")
        for column in ("plan", "jobs", "succeeded", "as-of dates", "wall s", "jobs/min", "as-of dates/min"):
            table.add_column(column, justify="left" if column == "plan" else "right")
        for r in rows:
            table.add_row(r["plan"], str(r["jobs"]), str(r["succeeded"]), str(r["as_of_dates_answered"]),
                          f"{r['wall_s']:.0f}", f"{r['jobs_per_min']:.1f}", f"{r['as_of_dates_per_min']:.1f}")
        Console(width=160).print(table)
        results["throughput"] = [{k: v for k, v in r.items() if k != "windows"} for r in rows]
        if "agreement" in results:
            a = results["agreement"]
            Console(width=160).print(f"agreement (window job vs per-date job, seed 0 vs 1, α and β per event): "
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

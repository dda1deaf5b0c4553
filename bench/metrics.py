"""Time the ensemble metrics on race-sized inputs.

    python bench/metrics.py [--json OUT] [--repeats N] [--members M]

Shapes: one race (38 drivers × M members) and a season (36 races × 38
drivers × M members), M = 10,000 by default, members on the last axis, 5 % of
drivers absent (NaN), as in a real dataset. Reports the median and the
fastest of ``--repeats`` runs after one warm-up, as a plain-text table, and
writes JSON (default ``bench/results/metrics.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.stats.metrics import coverage, crps_ensemble, log_score

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "metrics.json"
TARGET_S = {("crps_ensemble", "38x10000"): 1.0}


def make_case(shape: tuple[int, ...], members: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fantasy-points-like observations and ensembles, with some drivers absent."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(5.0, 50.0, shape)
    forecasts = rng.normal(mean[..., None], 12.0, (*shape, members))
    observations = rng.normal(mean, 12.0)
    absent = rng.random(shape) < 0.05
    forecasts[absent] = np.nan
    observations[absent] = np.nan
    return observations, forecasts


def time_call(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run(members: int, repeats: int) -> list[dict[str, object]]:
    functions: dict[str, Callable[[np.ndarray, np.ndarray], object]] = {
        "crps_ensemble": crps_ensemble,
        "log_score": log_score,
        "coverage": coverage,
    }
    rows = []
    for shape in [(38,), (36, 38)]:
        observations, forecasts = make_case(shape, members)
        label = "x".join(str(n) for n in (*shape, members))
        for name, fn in functions.items():
            times = time_call(lambda fn=fn, obs=observations, ens=forecasts: fn(obs, ens), repeats)
            median = statistics.median(times)
            target = TARGET_S.get((name, label))
            rows.append(
                {
                    "function": name,
                    "shape": label,
                    "values": int(forecasts.size),
                    "repeats": repeats,
                    "median_s": median,
                    "min_s": min(times),
                    "mvalues_per_s": forecasts.size / median / 1e6,
                    "target_s": target,
                    "meets_target": None if target is None else median < target,
                }
            )
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    header = f"{'function':<15} {'shape':<14} {'median ms':>10} {'min ms':>10} {'Mvalues/s':>10}  target"
    lines = [header, "-" * len(header)]
    for r in rows:
        target = ""
        if r["target_s"] is not None:
            target = f"< {r['target_s']:g} s: {'ok' if r['meets_target'] else 'MISSED'}"
        lines.append(
            f"{r['function']:<15} {r['shape']:<14} {1e3 * r['median_s']:>10.1f} {1e3 * r['min_s']:>10.1f} "
            f"{r['mvalues_per_s']:>10.1f}  {target}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT})")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (default 7)")
    parser.add_argument("--members", type=int, default=10_000, help="ensemble members (default 10000)")
    args = parser.parse_args(argv)

    rows = run(args.members, args.repeats)
    print(format_table(rows))
    report = {
        "benchmark": "metrics",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.json}")
    return 0 if all(r["meets_target"] is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

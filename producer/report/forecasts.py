"""``calq report``: how well calibrated a dataset's raw forecasts are.

No sampling: it scores the forecast probabilities and ensembles as they
come, which is the "before" picture that calibration improves on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from shared.contract.domain import ARCHETYPES, DEFAULT_EVENTS
from shared.data.dataset import event_rows, open_dataset
from shared.stats import metrics
from shared.stats.evaluation import ensemble_scores, joint_events


def forecast_report(dataset: Path, *, events: str | None = None) -> dict[str, Any]:
    """Scores of the raw forecasts per archetype: events, finish-position PIT, points ensemble, joint events."""
    ds = open_dataset(dataset)
    event_list = tuple(e.strip() for e in events.split(",")) if events else DEFAULT_EVENTS
    present = [a for a in ARCHETYPES if a in set(ds["archetype"].values.astype(str))]
    rows = event_rows(ds, events=event_list, archetypes=present)
    row_archetype = np.asarray(rows.track_archetype)[rows.track]
    event_scores = []
    for a, archetype in enumerate(rows.archetypes):
        for e, event in enumerate(rows.events):
            sel = (row_archetype == a) & (rows.event == e)
            p, y = rows.p[sel], rows.y[sel].astype(float)
            event_scores.append(
                {
                    "archetype": archetype,
                    "event": event,
                    "n": int(sel.sum()),
                    "mean_forecast": float(p.mean()),
                    "base_rate": float(y.mean()),
                    "brier": metrics.brier_score(p, y),
                    "log_loss": metrics.log_loss(p, y),
                    "ece": metrics.expected_calibration_error(p, y),
                }
            )
    return {
        "dataset": str(dataset),
        "races": int(ds.sizes["race"]),
        "scenarios": int(ds.sizes["scenario"]),
        "events": event_scores,
        "finish_pit": _finish_pit(ds, present),
        "ensemble": [s.model_dump(mode="json") for s in ensemble_scores(ds, present)],
        "joint_events": joint_events(ds, event_list),
    }


def _finish_pit(ds, archetypes: list[str]) -> list[dict[str, Any]]:
    """Randomised PIT of finishing positions within the simulated positions, per archetype."""
    out = []
    for archetype in archetypes:
        sub = ds.sel(race=ds["archetype"].values == archetype)
        members = sub["sim_position"].transpose("race", "driver", "scenario").values
        observed = sub["finish_position"].transpose("race", "driver").values
        u = metrics.pit_values(observed, members, rng=np.random.default_rng(0))
        u = u[np.isfinite(u)]
        out.append(
            {
                "archetype": archetype,
                "n": int(u.size),
                "histogram": metrics.pit_histogram(u).tolist(),
                "uniformity_pvalue": metrics.pit_uniformity_pvalue(u),
            }
        )
    return out


def report_tables(report: dict[str, Any]) -> list[Table]:
    events = Table(title=f"raw forecasts: {report['races']} races × {report['scenarios']} scenarios")
    for column in ("archetype", "event", "n", "mean p", "base rate", "Brier", "log loss", "ECE"):
        events.add_column(column, justify="left" if column in ("archetype", "event") else "right")
    for r in report["events"]:
        events.add_row(
            r["archetype"], r["event"], str(r["n"]), f"{r['mean_forecast']:.3f}", f"{r['base_rate']:.3f}",
            f"{r['brier']:.4f}", f"{r['log_loss']:.4f}", f"{r['ece']:.4f}",
        )
    pit = Table(title="finishing-position PIT (uniform when calibrated)")
    for column in ("archetype", "n", "histogram (10 bins)", "uniformity p"):
        pit.add_column(column)
    for r in report["finish_pit"]:
        pit.add_row(r["archetype"], str(r["n"]), " ".join(str(c) for c in r["histogram"]), f"{r['uniformity_pvalue']:.2g}")
    tables = [events, pit]
    if report["ensemble"]:
        ens = Table(title="fantasy-points ensemble")
        for column in ("archetype", "n", "CRPS", "log score", "coverage 50/80/95"):
            ens.add_column(column, justify="right")
        for r in report["ensemble"]:
            cov = " / ".join(f"{v:.2f}" for v in r["coverage"].values())
            ens.add_row(r["archetype"], str(r["n"]), f"{r['crps']:.2f}", f"{r['log_score']:.3f}", cov)
        tables.append(ens)
    joint = Table(title="joint events: both drivers of a pair hit")
    for column in ("archetype", "event", "pairs", "forecast", "observed", "ECE"):
        joint.add_column(column, justify="right")
    for r in report["joint_events"]:
        joint.add_row(
            r["group"], r["event"], str(r["n_pairs"]), _fmt(r["mean_forecast"]), _fmt(r["observed_frequency"]),
            _fmt(r["expected_calibration_error"]),
        )
    tables.append(joint)
    return tables


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"

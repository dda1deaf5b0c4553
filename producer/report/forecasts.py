"""``calq report DATASET``: how well calibrated a dataset's raw forecasts are.

No sampling: it scores the forecast probabilities and ensembles as they
come, which is the "before" picture that calibration improves on.
:func:`forecast_report` computes the numbers (JSON-ready),
:func:`report_tables` shows them in the terminal and :func:`forecast_sections`
lays them out as page sections with plots.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from producer.report.page import Page, Section
from producer.sanitize import for_markup
from shared.contract.domain import ARCHETYPES, DEFAULT_EVENTS
from shared.data.dataset import event_rows, open_dataset
from shared.stats import metrics
from shared.stats.evaluation import ensemble_scores, joint_events


def forecast_report(
    dataset: Path, *, events: str | None = None, on_progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Scores of the raw forecasts per archetype: events, finish-position PIT, points ensemble, joint events.

    ``on_progress`` hears a label before each stage (for a progress display).
    """
    step = on_progress or (lambda _label: None)
    step("reading the dataset")
    ds = open_dataset(dataset)
    event_list = tuple(e.strip() for e in events.split(",")) if events else DEFAULT_EVENTS
    present = [a for a in ARCHETYPES if a in set(ds["archetype"].values.astype(str))]
    rows = event_rows(ds, events=event_list, archetypes=present)
    row_archetype = np.asarray(rows.track_archetype)[rows.track]
    step("scoring event probabilities")
    event_scores = []
    for a, archetype in enumerate(rows.archetypes):
        for e, event in enumerate(rows.events):
            sel = (row_archetype == a) & (rows.event == e)
            p, y = rows.p[sel], rows.y[sel].astype(float)
            curve = metrics.reliability_curve(p, y)
            event_scores.append(
                {
                    "archetype": archetype,
                    "event": event,
                    "n": int(sel.sum()),
                    "mean_forecast": float(p.mean()),
                    "base_rate": float(y.mean()),
                    "brier": metrics.brier_score(p, y),
                    "log_loss": metrics.log_loss(p, y),
                    "ece": curve.expected_calibration_error,
                    "reliability": curve.to_dict(),
                }
            )
    step("finishing-position PIT")
    finish_pit = _finish_pit(ds, present)
    step("points ensemble")
    ensemble = [s.model_dump(mode="json") for s in ensemble_scores(ds, present)]
    step("joint events")
    joint = joint_events(ds, event_list)
    return {
        "dataset": str(dataset),
        "races": int(ds.sizes["race"]),
        "scenarios": int(ds.sizes["scenario"]),
        "events": event_scores,
        "finish_pit": finish_pit,
        "ensemble": ensemble,
        "joint_events": joint,
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
            for_markup(r["archetype"]), for_markup(r["event"]), str(r["n"]), f"{r['mean_forecast']:.3f}", f"{r['base_rate']:.3f}",
            f"{r['brier']:.4f}", f"{r['log_loss']:.4f}", f"{r['ece']:.4f}",
        )
    pit = Table(title="finishing-position PIT (uniform when calibrated)")
    for column in ("archetype", "n", "histogram (10 bins)", "uniformity p"):
        pit.add_column(column)
    for r in report["finish_pit"]:
        pit.add_row(for_markup(r["archetype"]), str(r["n"]), " ".join(str(c) for c in r["histogram"]), f"{r['uniformity_pvalue']:.2g}")
    tables = [events, pit]
    if report["ensemble"]:
        ens = Table(title="fantasy-points ensemble")
        for column in ("archetype", "n", "CRPS", "log score", "coverage 50/80/95"):
            ens.add_column(column, justify="right")
        for r in report["ensemble"]:
            cov = " / ".join(f"{v:.2f}" for v in r["coverage"].values())
            ens.add_row(for_markup(r["archetype"]), str(r["n"]), f"{r['crps']:.2f}", f"{r['log_score']:.3f}", cov)
        tables.append(ens)
    joint = Table(title="joint events: both drivers of a pair hit")
    for column in ("archetype", "event", "pairs", "forecast", "observed", "ECE"):
        joint.add_column(column, justify="right")
    for r in report["joint_events"]:
        joint.add_row(
            for_markup(r["group"]), for_markup(r["event"]), str(r["n_pairs"]), _fmt(r["mean_forecast"]),
            _fmt(r["observed_frequency"]), _fmt(r["expected_calibration_error"]),
        )
    tables.append(joint)
    return tables


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# -- the page ----------------------------------------------------------------------


def forecast_sections(report: dict[str, Any], *, sha256: str | None = None) -> list[Section]:
    """The raw-forecast report as page sections: scores, reliability, PIT, ensemble, joint events."""
    from producer.report import plots

    page = Page("")  # a scratch page: it numbers the section anchors
    archetypes = list(dict.fromkeys(r["archetype"] for r in report["events"]))
    events = list(dict.fromkeys(r["event"] for r in report["events"]))

    overview = page.section("Overview", intro="The forecasts as they come, before any calibration.")
    overview.facts(
        [
            ("dataset", report["dataset"]),
            *([("dataset sha256", sha256)] if sha256 else []),
            ("races", report["races"]),
            ("scenarios per race", report["scenarios"]),
            ("archetypes", ", ".join(archetypes)),
            ("events", ", ".join(events)),
        ]
    )
    overview.table(
        ["archetype", "event", "n", "mean p", "base rate", "Brier", "log loss", "ECE"],
        [
            [r["archetype"], r["event"], r["n"], r["mean_forecast"], r["base_rate"], r["brier"], r["log_loss"], r["ece"]]
            for r in report["events"]
        ],
        caption="Event probabilities per archetype (Brier, log loss, ECE: lower is better)",
    )

    reliability = page.section(
        "Reliability of event probabilities",
        intro="Per archetype and event: the observed frequency in each forecast bin against its mean forecast. "
        "On the dotted diagonal the forecasts are calibrated; below it they are too high. "
        "The bars give the driver-races per bin.",
    )
    for archetype in archetypes:
        panels = {
            r["event"]: {"raw forecast": r["reliability"]} for r in report["events"] if r["archetype"] == archetype
        }
        reliability.figure(
            plots.plot_reliability(panels, title=f"{archetype}: reliability of the raw forecasts"),
            caption=f"Reliability diagram, {archetype}: {', '.join(panels)}",
        )

    pit = page.section(
        "Finishing positions: PIT",
        intro="Randomised PIT of each finishing position within its simulated positions. Flat means calibrated; "
        "a U shape means the simulations are too narrow (over-confident), a hump too wide.",
    )
    if report["finish_pit"]:
        pit.figure(
            plots.plot_pit_histogram(
                {r["archetype"]: r["histogram"] for r in report["finish_pit"]}, title="PIT of finishing positions"
            ),
            caption="PIT histograms of finishing positions per archetype",
        )
        pit.table(
            ["archetype", "n", "uniformity p-value"],
            [[r["archetype"], r["n"], r["uniformity_pvalue"]] for r in report["finish_pit"]],
            caption="Chi-square test of a flat PIT (small p: miscalibrated; with many values small departures count)",
            digits=2,
        )

    ensemble = page.section(
        "Fantasy-points ensemble",
        intro="sim_points against points: CRPS (lower is better), log score (higher is better) and the share of "
        "outcomes inside the ensemble's central 50/80/95 % intervals (calibrated: equal to the level).",
    )
    if report["ensemble"]:
        ensemble.figure(
            plots.plot_coverage(
                {r["archetype"]: {float(k): v for k, v in r["coverage"].items()} for r in report["ensemble"]},
                title="Coverage of the points ensemble",
            ),
            caption="Coverage of central intervals at 50/80/95 % per archetype",
        )
        levels = list(report["ensemble"][0]["coverage"])
        ensemble.table(
            ["archetype", "n", "CRPS", "log score", *[f"coverage {float(k):.0%}" for k in levels]],
            [
                [r["archetype"], r["n"], r["crps"], r["log_score"], *[r["coverage"].get(k) for k in levels]]
                for r in report["ensemble"]
            ],
            caption="CRPS, log score and coverage of the points ensemble",
        )
    else:
        ensemble.text("The dataset carries no sim_points/points: nothing to score.", tone="note")

    joint_sections(page, report["joint_events"], archetypes=archetypes)
    return page.sections


def joint_sections(page: Page, joint: list[dict[str, Any]], *, archetypes: list[str] | None = None) -> Section:
    """The joint-event (co-hit) section: reliability per archetype and event, and its table."""
    from producer.report import plots

    section = page.section(
        "Joint events: co-hits",
        intro="For pairs of drivers in a race: the forecast probability that both finish top-t (share of scenarios) "
        "against how often both did. The optimizer stacks correlated drivers, so this calibration matters too.",
    )
    present = set(r["group"] for r in joint)
    groups = [g for g in (archetypes or ARCHETYPES) if g in present]
    if any(r["threshold"] == 1 for r in joint):
        section.text("top_1 has no co-hit panel: two drivers cannot both win a race.", tone="note")
    for group in groups:
        panels = {
            r["event"]: {"co-hit forecast": r["reliability"]}
            for r in joint
            if r["group"] == group and r["n_pairs"] and r["threshold"] > 1
        }
        if panels:
            section.figure(
                plots.plot_reliability(panels, title=f"{group}: reliability of co-hit forecasts"),
                caption=f"Joint-event reliability, {group}: {', '.join(panels)}",
            )
    section.table(
        ["archetype", "event", "pairs", "mean forecast", "observed", "Brier", "ECE"],
        [
            [r["group"], r["event"], r["n_pairs"], r["mean_forecast"], r["observed_frequency"], r.get("brier_score"),
             r["expected_calibration_error"]]
            for group in groups
            for r in joint
            if r["group"] == group
        ],
        caption="Joint events: both drivers of a pair hit",
    )
    return section

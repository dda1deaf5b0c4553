"""The evaluation page of ``calq evaluate --html``: does calibration help on races the fit had not seen?

Built from the JSON records of :mod:`producer.evaluate` (nothing is
recomputed here) with the report's page builder and plots:

- the summary, in two tables that each fit a 1280 px screen: per archetype
  × event, races and rows scored with the raw and calibrated out-of-sample
  log loss, Brier and ECE; then the improvements in log loss and Brier, each
  with its 90 % interval over races. Every score and difference is written
  by one rule (:func:`~producer.report.page.format_cell`: 4 significant
  digits, fixed notation), so ``0.00004830`` stands beside ``0.001205``;
- per archetype: the out-of-sample reliability diagram, raw against
  calibrated, per event; the improvement over time (the cumulative
  per-row log-loss improvement race by race); the per-track table; and the
  races that could not be scored, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

import numpy as np

from producer.report import plots
from producer.report.page import Page, Section


def evaluation_page(records: Sequence[Mapping[str, Any]], *, subtitle: str | None = None) -> Page:
    """The whole page for the records of one evaluation."""
    page = Page("calq evaluate: out-of-sample calibration", subtitle=subtitle)
    page.add(evaluation_sections(records))
    return page


def evaluation_sections(records: Sequence[Mapping[str, Any]]) -> list[Section]:
    """The summary section, then one section per archetype (usable inside another page)."""
    page = Page("scratch")  # anchors are made unique by the page the sections join
    summary = page.section(
        "Out-of-sample summary",
        intro="Each race scored with the newest converged fit of its archetype on races strictly before it. "
              "Lower is better for every score. Every score and difference is shown to 4 significant digits "
              "in fixed notation.",
    )
    summary.table(
        ["archetype", "event", "races", "rows", "unscored", "log loss raw", "log loss cal", "Brier raw", "Brier cal",
         "ECE raw", "ECE cal"],
        [_score_row(r) for r in records],
        caption="Scores, raw and calibrated",
    )
    summary.table(
        ["archetype", "event", "Δ log loss", "Δ log loss low", "Δ log loss high", "Δ Brier", "Δ Brier low",
         "Δ Brier high"],
        [_improvement_row(r) for r in records],
        caption="Improvement = raw − calibrated per row (positive: calibration helped), with its 90 % interval "
                "(the 5th–95th percentile of a bootstrap over races)",
    )
    for archetype in dict.fromkeys(r["archetype"] for r in records):
        mine = [r for r in records if r["archetype"] == archetype]
        _archetype_section(page.section(archetype), mine)
    return page.sections


def _score_row(r: Mapping[str, Any]) -> list[Any]:
    raw, cal = r["raw"], r["calibrated"]
    return [r["archetype"], r["event"], r["races"], r["rows"], r["unscored_races"], raw["log_loss"], cal["log_loss"],
            raw["brier"], cal["brier"], raw["ece"], cal["ece"]]


def _improvement_row(r: Mapping[str, Any]) -> list[Any]:
    ll, br = r["log_loss_improvement"], r["brier_improvement"]
    return [r["archetype"], r["event"], ll["mean"], ll["low"], ll["high"], br["mean"], br["low"], br["high"]]


def _archetype_section(section: Section, records: Sequence[Mapping[str, Any]]) -> None:
    scored = [r for r in records if r["rows"]]
    if scored:
        panels = {r["event"]: {"raw": r["raw"]["reliability"], "calibrated": r["calibrated"]["reliability"]}
                  for r in scored}
        section.figure(
            plots.plot_reliability(panels, title=f"{records[0]['archetype']}: out-of-sample reliability"),
            caption="Observed frequency against forecast probability on held-out races, raw and calibrated.",
            alt="out-of-sample reliability diagrams, raw and calibrated",
        )
        section.figure(
            plot_improvement_over_time(scored, title=f"{records[0]['archetype']}: improvement over time"),
            caption="Cumulative log-loss improvement per row (raw − calibrated), race by race; above 0 calibration helped.",
            alt="cumulative log-loss improvement by race date",
        )
        rows = []
        for r in scored:
            for track, t in r["tracks"].items():
                rows.append([r["event"], track, t["races"], t["rows"], t["raw"]["log_loss"], t["calibrated"]["log_loss"],
                             t["log_loss_improvement"]["mean"], t["log_loss_improvement"]["low"],
                             t["log_loss_improvement"]["high"], t["brier_improvement"]["mean"]])
        section.table(["event", "track", "races", "rows", "log loss raw", "log loss cal", "Δ log loss", "Δ low",
                       "Δ high", "Δ Brier"], rows, caption="per track")
    else:
        section.text("No race of this archetype could be scored.", tone="warning")
    unscored = records[0]["unscored"]
    if unscored:
        section.table(["race", "date", "track", "reason"],
                      [[u["race"], u["date"], u["track"], u["reason"]] for u in unscored],
                      caption=f"{len(unscored)} race(s) not scored")


def plot_improvement_over_time(records: Sequence[Mapping[str, Any]], *, title: str):
    """Cumulative per-row log-loss improvement by race date, one line per event."""
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3}):
        fig, ax = plt.subplots(figsize=(7.5, 3.2), layout="constrained")
        ax.axhline(0.0, color=plots.REFERENCE, linestyle=":", linewidth=1, label="no change")
        for k, r in enumerate(records):
            races = r["per_race"]
            days = [date.fromisoformat(p["date"]) for p in races]
            gain = np.cumsum([p["raw_log_loss"] - p["cal_log_loss"] for p in races])
            rows = np.cumsum([p["rows"] for p in races])
            ax.plot(days, gain / rows, marker=plots.MARKERS[k % len(plots.MARKERS)], markersize=3,
                    color=plots.PALETTE[k % len(plots.PALETTE)], label=plots.mpl_text(r["event"]))
        ax.set(xlabel="race date", ylabel="cumulative Δ log loss per row (nats)")
        ax.legend(loc="best", frameon=False)
        fig.autofmt_xdate()
        fig.suptitle(plots.mpl_text(title), fontweight="bold")
    return fig

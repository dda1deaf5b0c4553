"""The report of a calibration: did it work, and can its sampler be trusted?

Built from a job's :class:`~shared.contract.summary.CalibrationSummary` and
its posterior (an ArviZ InferenceData). :func:`calibration_page` lays out one
calibration (``calq report --posterior URI`` or ``--job JOB_ID``);
:func:`latest_page` the newest converged calibration of every archetype and
event, which may come from different jobs (``calq report --latest``).

Per archetype (and the events shown):

- reliability, raw against calibrated (in-sample), with counts per bin;
- the calibrated curve q(p) with its 94 % band per track, over the diagonal,
  and the archetype's curve for a new track — the same numbers ``calq apply``
  gives (:func:`shared.fit.apply.calibrate_probabilities`);
- an α / β forest per track with 94 % HDIs, beside the archetype level and
  its population;
- rank plots and traces of the hierarchical scales (ArviZ);
- the joint-event (co-hit) table.

Per job: the run's metadata (dataset sha256, job, versions, timings), the
convergence table (every sampler attempt, when the summary records them),
divergences, energy and BFMI.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from producer.report import plots
from producer.report.page import Page, Section
from shared.contract.domain import ARCHETYPES, event_threshold
from shared.contract.summary import CalibrationSummary

#: Forecast probabilities at which the calibrated curves are drawn.
CURVE_GRID = np.linspace(0.005, 0.995, 61)
#: z of a central 94 % normal interval: the archetype population band of the forest plots.
Z94 = 1.880794
#: The hierarchical scales shown in rank plots and traces.
SCALES = ("sigma_alpha", "sigma_log_beta")

Progress = Callable[[str], None]

#: The attempts table's columns in order (fields of shared.contract.summary.Attempt): what a reader compares
#: first, the long text and the seed last, so the table fits a page; fields not listed follow by name.
ATTEMPT_ORDER = (
    "number", "warm_start", "target_accept_prob", "warmup", "samples", "divergences", "max_rhat", "min_ess_bulk",
    "mean_leapfrog_steps", "sample_s", "compile_s", "issues", "remedy", "seed",
)
#: Column titles of the attempts table (fields of shared.contract.summary.Attempt); other fields show by name.
ATTEMPT_LABELS = {
    "number": "#", "target_accept_prob": "target accept", "samples": "draws", "max_rhat": "max R-hat",
    "min_ess_bulk": "min bulk ESS", "mean_leapfrog_steps": "mean leapfrog", "compile_s": "compile s",
    "sample_s": "sample s", "issues": "did not converge because", "remedy": "remedy", "warm_start": "warm start",
}


@dataclass(frozen=True)
class Calibration:
    """One job's results: its summary and its posterior."""

    summary: CalibrationSummary
    idata: Any  # arviz.InferenceData

    @property
    def job_label(self) -> str:
        s = self.summary
        kind = "an all-archetype job" if s.archetype == "all" else f"a {s.archetype} job"
        return f"job {s.job_id} ({kind}, data through {s.data_through})"


def calibration_page(calibration: Calibration, *, on_progress: Progress | None = None) -> Page:
    """The page of one calibration: its run, its sampler, then each archetype it fitted."""
    step = on_progress or (lambda _label: None)
    s = calibration.summary
    page = Page(
        f"calq report: calibration {s.job_id}",
        subtitle=f"{s.archetype} · events {', '.join(s.events)} · data through {s.data_through}",
    )
    step("run and sampler")
    run_section(page.section("Run"), s)
    sampler_section(page.section("Sampler and convergence"), calibration)
    for archetype in s.archetypes:
        step(archetype)
        archetype_sections(page.section(archetype), calibration, archetype, s.events, on_progress=step)
    return page


def latest_page(
    slots: dict[tuple[str, str], Calibration], *, on_progress: Progress | None = None
) -> Page:
    """The newest converged calibration of every (archetype, event) in ``slots``, per archetype.

    Each archetype's section says which job each of its events comes from;
    when two jobs share an archetype's events, the archetype gets a part per
    job. The jobs' runs and samplers follow once each, in a section of their own.
    """
    step = on_progress or (lambda _label: None)
    page = Page(
        "calq report: the latest calibrations",
        subtitle="what the optimizer uses now: the newest converged fit per archetype and event",
    )
    overview = page.section("Overview", intro="Per archetype and event, the calibration the latest pointer names.")
    overview.table(
        ["archetype", "event", "job", "fitted", "data through", "created", "converged"],
        [
            [a, e, c.summary.job_id, c.summary.archetype, str(c.summary.data_through),
             c.summary.created_at.strftime("%Y-%m-%d %H:%M"), c.summary.converged]
            for (a, e), c in sorted(slots.items(), key=lambda kv: (_order(kv[0][0]), event_threshold(kv[0][1])))
        ],
        caption="Latest pointers",
    )
    jobs: dict[str, Calibration] = {}
    for archetype in sorted({a for a, _ in slots}, key=_order):
        by_job: dict[str, tuple[Calibration, list[str]]] = {}
        for (a, event), c in slots.items():
            if a == archetype:
                by_job.setdefault(c.summary.job_id, (c, []))[1].append(event)
        section = page.section(archetype)
        parts = sorted(by_job.values(), key=lambda part: min(event_threshold(e) for e in part[1]))
        for calibration, events in parts:
            jobs[calibration.summary.job_id] = calibration
            events = [e for e in calibration.summary.events if e in events]
            step(f"{archetype}: {calibration.summary.job_id}")
            part = section if len(by_job) == 1 else section.section(f"{', '.join(events)} from job {calibration.summary.job_id}")
            part.text(f"{', '.join(events)}: from {calibration.job_label}; its run and sampler are under Jobs.", tone="note")
            archetype_sections(part, calibration, archetype, events, on_progress=step)
    runs = page.section("Jobs", intro="The run and the sampler of each job the latest pointers name.")
    for job_id, calibration in jobs.items():
        step(f"job {job_id}")
        part = runs.section(f"job {job_id}")
        run_section(part.section("Run"), calibration.summary)
        sampler_section(part.section("Sampler and convergence"), calibration)
    return page


# -- per job -------------------------------------------------------------------------


def run_section(section: Section, s: CalibrationSummary) -> Section:
    """The run's metadata: dataset, job, sampler settings, versions, timings, verdict."""
    t = s.timings
    section.facts(
        [
            ("job", s.job_id),
            ("archetype", s.archetype),
            ("events", ", ".join(s.events)),
            ("converged", "yes" if s.converged else "no: " + "; ".join(s.convergence_issues)),
            ("dataset", s.dataset_uri),
            ("dataset sha256", s.dataset_sha256),
            ("data window", _window(s)),
            ("rows / races", f"{s.n_rows} rows from {s.n_races} races"),
            ("tracks", "; ".join(f"{a}: {', '.join(ts)}" for a, ts in s.tracks.items())),
            ("sampler", f"{s.sampler.chains} chains × ({s.sampler.warmup} warmup + {s.sampler.samples} draws), seed {s.sampler.seed}"),
            ("model", f"version {s.model_version}, {'centred' if s.centered else 'non-centred'} track level"),
            ("warm start", _warm_start(s)),
            ("versions", f"calq {s.calq_version} (fit); report: {_versions()}"),
            ("timings (s)", f"load {t.load_s:.1f}, compile {t.compile_s:.1f}, sample {t.sample_s:.1f}, "
                            f"diagnostics {t.diagnostics_s:.1f}, write {t.write_s:.1f}, total {t.total_s:.1f}"),
            ("created", s.created_at.strftime("%Y-%m-%d %H:%M:%S %Z").strip()),
            ("posterior", s.posterior_uri),
            ("summary", s.summary_uri),
        ]
    )
    if not s.converged:
        section.text("This calibration did not converge: the latest pointer never names it. " + "; ".join(s.convergence_issues),
                     tone="warning")
    return section


def _warm_start(s: CalibrationSummary) -> str:
    w = getattr(s, "warm_start", None)
    if w is None:
        return "none: a cold start"
    return (f"from job {w.job_id} (data through {w.data_through}): its posterior gave the starting positions, "
            f"mass matrix and step size; warmup {w.warmup}, target acceptance {w.target_accept_prob:g}")


def sampler_section(section: Section, calibration: Calibration) -> Section:
    """Convergence table (with every attempt when recorded), divergences, energy and BFMI."""
    s, d = calibration.summary, calibration.summary.diagnostics
    section.intro = ("Rank-normalised split R-hat below 1.01, bulk ESS of at least 400 and no divergences count as "
                     "converged. BFMI below 0.3 flags poor exploration of the energy distribution.")
    section.table(
        ["chains", "draws", "max R-hat", "min bulk ESS", "min tail ESS", "divergences", "min BFMI",
         "tree-depth hits", "mean leapfrog steps", "bulk ESS / s"],
        [[d.chains, d.draws, d.max_rhat, d.min_ess_bulk, d.min_ess_tail, d.divergences, d.min_bfmi,
          d.tree_depth_hits, d.mean_leapfrog_steps, d.ess_bulk_per_second]],
        caption="Sampler diagnostics of the run that was kept",
    )
    attempts = _records(getattr(s, "attempts", None))
    if attempts:
        present = list(dict.fromkeys(k for r in attempts for k in r))
        keys = [k for k in ATTEMPT_ORDER if k in present] + [k for k in present if k not in ATTEMPT_ORDER]
        section.table([ATTEMPT_LABELS.get(k, k) for k in keys], [[_attempt_cell(k, r.get(k)) for k in keys] for r in attempts],
                      caption="Every sampler attempt, in order (the last is the run that was kept)")
    if d.divergences:
        section.text(f"{d.divergences} divergent transitions: the posterior may be biased where the sampler could not follow it.",
                     tone="warning")
    section.table(
        ["chain", "BFMI"], [[i, b] for i, b in enumerate(d.bfmi)], caption="Energy BFMI per chain", digits=3
    )
    section.figure(
        plots.plot_energy(calibration.idata, title=f"Energy of job {s.job_id}"),
        caption="Energy: marginal energy against energy transitions (overlapping: good exploration)",
    )
    section.table(
        ["parameter", "archetype", "event", "worst R-hat", "min bulk ESS", "min tail ESS"],
        _worst_by_parameter(s),
        caption="Convergence per parameter group (the worst of its tracks for track parameters)",
    )
    return section


def _worst_by_parameter(s: CalibrationSummary) -> list[list[Any]]:
    arch_of = {t: a for a, ts in s.tracks.items() for t in ts}
    groups: dict[tuple[str, str, str], list] = {}
    for p in s.parameters:
        archetype = p.archetype or arch_of.get(p.track or "", "")
        groups.setdefault((p.parameter, archetype, p.event), []).append(p)
    return [
        [name, archetype, event, max(p.r_hat for p in ps), min(p.ess_bulk for p in ps), min(p.ess_tail for p in ps)]
        for (name, archetype, event), ps in sorted(groups.items(), key=lambda kv: (_order(kv[0][1]), kv[0][2], kv[0][0]))
    ]


# -- per archetype -------------------------------------------------------------------


def archetype_sections(
    parent: Page | Section,
    calibration: Calibration,
    archetype: str,
    events: Sequence[str],
    *,
    on_progress: Progress | None = None,
) -> None:
    """Reliability, calibrated curves, α/β forests, hierarchical scales and joint events of one archetype."""
    step = on_progress or (lambda _label: None)
    s, idata = calibration.summary, calibration.idata
    tracks = s.tracks.get(archetype, [])

    reliability = parent.section(
        "Reliability: raw against calibrated",
        intro="Observed frequency per forecast bin, before and after calibration (in-sample: the data the fit saw). "
        "On the dotted diagonal a forecast is calibrated. Bars: driver-races per bin.",
    )
    scored = {c.event: c for c in s.calibration if c.archetype == archetype}
    panels = {
        e: {"raw": scored[e].raw.reliability, "calibrated": scored[e].calibrated.reliability} for e in events if e in scored
    }
    if panels:
        reliability.figure(
            plots.plot_reliability(panels, title=f"{archetype}: reliability, raw and calibrated"),
            caption=f"Reliability diagram, raw against calibrated, {archetype}: {', '.join(panels)}",
        )
    reliability.table(
        ["event", "n", "base rate", "Brier raw", "Brier calibrated", "log loss raw", "log loss calibrated",
         "ECE raw", "ECE calibrated"],
        [
            [e, c.n, c.base_rate, c.raw.brier, c.calibrated.brier, c.raw.log_loss, c.calibrated.log_loss, c.raw.ece, c.calibrated.ece]
            for e in events
            if (c := scored.get(e)) is not None
        ],
        caption="Scores before and after calibration (lower is better)",
    )

    step(f"{archetype}: calibrated curves")
    curves = parent.section(
        "Calibrated curves",
        intro="q(p): the posterior mean of the calibrated probability at each forecast p, with its 94 % band, "
        "per track over the diagonal q = p. Dashed: the archetype's curve for a track it has not seen.",
    )
    for event in events:
        curves.figure(
            plots.plot_calibration_curve(
                CURVE_GRID,
                {t: _band(idata, event=event, track=t) for t in tracks},
                population=_band(idata, event=event, archetype=archetype),
                title=f"{archetype}, {event}: calibrated probability per track",
            ),
            caption=f"Calibrated curve q(p) with 94 % band per track, {archetype}, {event}",
        )

    step(f"{archetype}: parameters")
    forest = parent.section(
        "Bias α and steepness β per track",
        intro="Posterior means with 94 % HDIs. The diamond is the archetype level; the shaded range is where 94 % of "
        "the archetype's tracks are expected (at the posterior means of the population scales). β < 1: the raw "
        "forecasts were over-confident; α < 0: too high.",
    )
    for event in events:
        forest.figure(_forest(s, archetype, event, tracks), caption=f"α and β forest per track, {archetype}, {event}")

    step(f"{archetype}: hierarchical scales")
    scales = parent.section(
        "Hierarchical scales",
        intro="The track spreads σ_α and σ_log β: rank plots (uniform across chains when the chains agree) and traces.",
    )
    coords = {"archetype": [archetype], "event": list(events)}
    scales.figure(
        plots.plot_rank(idata, var_names=SCALES, coords=coords, title=f"{archetype}: rank plots of the track scales"),
        caption=f"Rank plots of sigma_alpha and sigma_log_beta, {archetype}",
    )
    scales.figure(
        plots.plot_trace(idata, var_names=SCALES, coords=coords, title=f"{archetype}: traces of the track scales"),
        caption=f"Traces of sigma_alpha and sigma_log_beta, {archetype}",
    )

    joint = [r for r in s.joint_events if r.get("group") == archetype and r.get("event") in events]
    if joint:
        parent.section(
            "Joint events: co-hits",
            intro="Pairs of drivers in a race: forecast probability that both hit the event against how often both did.",
        ).table(
            ["event", "pairs", "mean forecast", "observed", "Brier", "ECE"],
            [[r["event"], r["n_pairs"], r["mean_forecast"], r["observed_frequency"], r.get("brier_score"),
              r["expected_calibration_error"]] for r in joint],
            caption="Joint events (raw forecasts)",
        )


def _band(idata, *, event: str, track: str | None = None, archetype: str | None = None) -> plots.Band:
    from shared.fit.apply import calibrate_probabilities  # the one calibrated-probability rule

    results = calibrate_probabilities(idata, CURVE_GRID, event=event, track=track, archetype=archetype)
    return plots.Band(
        mean=np.array([r.mean for r in results]),
        low=np.array([r.low for r in results]),
        high=np.array([r.high for r in results]),
    )


def _forest(s: CalibrationSummary, archetype: str, event: str, tracks: Sequence[str]):
    def interval(name: str, label: str, **where) -> plots.Interval:
        p = s.parameter(name, event, **where)
        return plots.Interval(label, p.mean, p.hdi_low, p.hdi_high)

    alpha_arch = s.parameter("alpha_arch", event, archetype=archetype)
    beta_arch = s.parameter("beta_arch", event, archetype=archetype)
    sigma_alpha = s.parameter("sigma_alpha", event, archetype=archetype).mean
    sigma_log_beta = s.parameter("sigma_log_beta", event, archetype=archetype).mean
    log_beta = math.log(beta_arch.mean)
    panels = {
        "α (bias, logit scale)": (
            [interval("alpha_track", t, track=t) for t in tracks],
            interval("alpha_arch", f"{archetype} (archetype)", archetype=archetype),
            (alpha_arch.mean - Z94 * sigma_alpha, alpha_arch.mean + Z94 * sigma_alpha),
        ),
        "β (steepness)": (
            [interval("beta_track", t, track=t) for t in tracks],
            interval("beta_arch", f"{archetype} (archetype)", archetype=archetype),
            (math.exp(log_beta - Z94 * sigma_log_beta), math.exp(log_beta + Z94 * sigma_log_beta)),
        ),
    }
    return plots.plot_forest(
        panels,
        title=f"{archetype}, {event}: α and β per track",
        reference={"α (bias, logit scale)": 0.0, "β (steepness)": 1.0},
    )


# -- helpers -------------------------------------------------------------------------


def _order(archetype: str) -> int:
    return ARCHETYPES.index(archetype) if archetype in ARCHETYPES else len(ARCHETYPES)


def _window(s: CalibrationSummary) -> str:
    if s.as_of is None:
        return f"every race, through {s.data_through}"
    days = f"{s.window_days} days " if s.window_days else ""
    return f"races {days}before {s.as_of} (through {s.data_through})"


def _versions() -> str:
    names = ("arviz", "numpyro", "jax", "matplotlib")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _records(items) -> list[dict[str, Any]]:
    """Records (pydantic models or dicts) as dicts; empty for None."""
    out = []
    for item in items or []:
        if hasattr(item, "model_dump"):
            item = item.model_dump(mode="json")
        elif not isinstance(item, dict):
            item = {"attempt": str(item)}
        out.append(dict(item))
    return out


def _attempt_cell(key: str, value: Any) -> Any:
    if key.endswith("_s") and isinstance(value, float):
        return round(value, 2)  # seconds: hundredths, not 2.4e-05
    return _cell(value)


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "; ".join(value) if value else "–"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "), default=str)
    return value


__all__ = ["Calibration", "archetype_sections", "calibration_page", "latest_page", "run_section", "sampler_section"]

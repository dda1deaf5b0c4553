"""Rich renderings of summaries, statuses and reports for the CLI."""

from __future__ import annotations

from collections.abc import Iterable

from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from producer.sanitize import for_markup, visible
from shared.contract.job import JobState, JobStatus
from shared.contract.summary import CalibrationSummary
from shared.jobs.registry.values import Corrupt


def _interval(low: float, high: float) -> str:
    return f"[{low:.2f}, {high:.2f}]"


def summary_table(summaries: Iterable[CalibrationSummary]) -> Table:
    """Per archetype and event: α and β with 94 % HDIs, worst R-hat and ESS, Brier raw → calibrated."""
    table = Table(title="calibration", show_lines=False)
    for column in ("archetype", "event", "α (bias)", "β (steepness)", "R-hat", "ESS bulk", "Brier raw → cal", "converged"):
        table.add_column(column, justify="left" if column in ("archetype", "event") else "right")
    for summary in summaries:
        scores = {(c.archetype, c.event): c for c in summary.calibration}
        for archetype in summary.archetypes:
            for event in summary.events:
                alpha = summary.parameter("alpha_arch", event, archetype=archetype)
                beta = summary.parameter("beta_arch", event, archetype=archetype)
                params = [p for p in summary.parameters if p.event == event and p.archetype in (archetype, None)]
                cal = scores.get((archetype, event))
                table.add_row(
                    for_markup(archetype),
                    for_markup(event),
                    f"{alpha.mean:+.2f} {_interval(alpha.hdi_low, alpha.hdi_high)}",
                    f"{beta.mean:.2f} {_interval(beta.hdi_low, beta.hdi_high)}",
                    f"{max(p.r_hat for p in params):.3f}",
                    f"{min(p.ess_bulk for p in params):.0f}",
                    f"{cal.raw.brier:.4f} → {cal.calibrated.brier:.4f}" if cal else "-",
                    "yes" if summary.converged else "[red]no[/red]",
                )
    return table


def summary_notes(summary: CalibrationSummary) -> list[str]:
    """One line per thing a reader should know beyond the table."""
    d, t = summary.diagnostics, summary.timings
    lines = [
        f"{summary.job_id} ({summary.archetype}): {summary.n_rows} rows from {summary.n_races} races "
        f"through {summary.data_through}; {d.chains}×{d.draws} draws, {d.divergences} divergences, "
        f"min BFMI {d.min_bfmi:.2f}; {t.total_s or (t.compile_s + t.sample_s):.1f} s "
        f"(compile {t.compile_s:.1f}, sample {t.sample_s:.1f})",
    ]
    if summary.convergence_issues:
        lines.append("  not converged: " + "; ".join(summary.convergence_issues))
    if summary.warm_start:
        w = summary.warm_start
        lines.append(f"  warm start from job {w.job_id} (data through {w.data_through}), warmup {w.warmup}")
    if summary.posterior_uri:
        lines.append(f"  posterior: {summary.posterior_uri}")
    return lines


def status_table(status: JobStatus) -> Table:
    """One job's record, field by field (every value through :func:`~producer.sanitize.for_markup`)."""
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in status.model_dump(mode="json").items():
        if value is not None and value is not False:
            table.add_row(key, for_markup(str(value)))
    return table


def jobs_table(records: Iterable[JobStatus]) -> Table:
    """The job listing: newest first, with state, progress and worker (``calq status ID`` has the rest)."""
    table = Table(title="jobs (newest first)")
    table.add_column("job", no_wrap=True, min_width=27)  # whole: it is what calq cancel / wait take
    table.add_column("archetype", no_wrap=True)
    table.add_column("state", overflow="fold")
    table.add_column("progress", overflow="fold")
    table.add_column("worker", overflow="fold")
    table.add_column("updated", overflow="fold")
    for status in records:
        phase, done = describe(status)
        updated = status.updated_at or status.submitted_at
        table.add_row(
            for_markup(status.job_id),
            for_markup(status.archetype),
            _state_label(status),
            "" if status.state.finished else for_markup(f"{phase} {done:.0%}"),
            for_markup(status.worker or ""),
            updated.strftime("%H:%M:%S") if updated else "",
        )
    return table


def corrupt_table(entries: Iterable[Corrupt]) -> Table:
    """Records and latest pointers that cannot be used (``calq jobs --all``): where each lies, and why."""
    table = Table(title="corrupt records and pointers (skipped; a resubmission or the next job replaces them)")
    table.add_column("key", overflow="fold")
    table.add_column("why", overflow="fold")
    for entry in entries:
        table.add_row(for_markup(entry.key), for_markup(entry.why))
    return table


def _state_label(status: JobStatus) -> str:
    if status.state is JobState.RUNNING and status.cancel_requested:
        return "running (cancelling)"
    return status.state.value


def progress_bar(console) -> Progress:
    return Progress(
        # Descriptions (job ids, archetypes) and phases come from records: never markup.
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[phase]}", markup=False),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def describe(status: JobStatus) -> tuple[str, float]:
    """A phase label (record text shown :func:`~producer.sanitize.visible`) and an overall completion fraction."""
    if status.state.finished:
        return status.state.value, 1.0
    phase, done = _phase(status)
    return visible(f"cancelling ({phase})" if status.cancel_requested else phase), done


def _phase(status: JobStatus) -> tuple[str, float]:
    progress = status.progress
    if progress is None:
        return status.state.value, 0.0
    if progress.phase == "warmup":
        return "warmup", 0.05 + 0.3 * progress.fraction
    if progress.phase == "sampling":
        return f"sampling {progress.draws_done}/{progress.draws_total}", 0.35 + 0.6 * progress.fraction
    order = {"load": 0.0, "compile": 0.02, "diagnostics": 0.95, "write": 0.98}
    return progress.phase, order.get(progress.phase, 0.0)

"""Rich renderings of summaries, statuses and reports for the CLI."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence

from rich.console import Group
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from producer.sanitize import for_markup, visible
from shared.contract.job import JobState, JobStatus
from shared.contract.summary import CalibrationSummary
from shared.jobs.registry.values import Corrupt


def _interval(low: float, high: float) -> str:
    return f"[{low:.2f}, {high:.2f}]"


def fitted_tables(
    title: str, keys: Sequence[str], columns: Sequence[str], rows: Sequence[Sequence[str]], *, width: int | None
) -> list[Table]:
    """``rows`` as one table if it fits ``width`` terminal columns, else as several that each do.

    Every row is one line and no cell is ever cut or wrapped: names stay
    whole. When the whole table is wider than ``width``, the value
    ``columns`` are packed, in order, into as few tables as fit, each led by
    the ``keys`` columns (archetype, event) so a row is still read by name.
    A row's cells are ``keys`` then ``columns``, in rich markup. ``width``
    None: one table, however wide.
    """
    headers = [*keys, *columns]
    cell = [max(Text.from_markup(h).cell_len, *(Text.from_markup(r[i]).cell_len for r in rows)) if rows else len(h)
            for i, h in enumerate(headers)]

    def need(indices: list[int]) -> int:
        return boxed_width(*([cell[i]] for i in indices))

    key_idx = list(range(len(keys)))
    groups: list[list[int]] = [[]]
    for i in range(len(keys), len(headers)):
        if width is not None and groups[-1] and need(key_idx + groups[-1] + [i]) > width:
            groups.append([])
        groups[-1].append(i)
    tables = []
    for n, group in enumerate(groups, start=1):
        suffix = f" ({n} of {len(groups)})" if len(groups) > 1 else ""
        table = Table(title=f"{title}{suffix}")
        for i in key_idx + group:
            table.add_column(headers[i], justify="left" if i < len(keys) else "right", no_wrap=True)
        for row in rows:
            table.add_row(*(row[i] for i in key_idx + group))
        tables.append(table)
    return tables


def boxed_width(*columns: Iterable[int]) -> int:
    """The terminal columns a rich table takes whose columns hold cells of these widths (``max`` of each).

    Rich's default heavy-head box: a border, and one space of padding each side, per column, and the closing border.
    """
    widths = [max(column) for column in columns]
    return sum(widths) + 3 * len(widths) + 1


def summary_tables(summaries: Iterable[CalibrationSummary], *, width: int | None = None) -> list[Table]:
    """Per archetype and event: α and β with 94 % HDIs, worst R-hat and ESS, Brier raw → calibrated.

    One table where it fits ``width``, else split (see :func:`fitted_tables`);
    the posterior URIs are not in the table but in :func:`posterior_lines`.
    """
    rows = []
    for summary in summaries:
        scores = {(c.archetype, c.event): c for c in summary.calibration}
        for archetype in summary.archetypes:
            for event in summary.events:
                alpha = summary.parameter("alpha_arch", event, archetype=archetype)
                beta = summary.parameter("beta_arch", event, archetype=archetype)
                params = [p for p in summary.parameters if p.event == event and p.archetype in (archetype, None)]
                cal = scores.get((archetype, event))
                rows.append([
                    for_markup(archetype),
                    for_markup(event),
                    f"{alpha.mean:+.2f} {_interval(alpha.hdi_low, alpha.hdi_high)}",
                    f"{beta.mean:.2f} {_interval(beta.hdi_low, beta.hdi_high)}",
                    f"{max(p.r_hat for p in params):.3f}",
                    f"{min(p.ess_bulk for p in params):.0f}",
                    f"{cal.raw.brier:.4f} → {cal.calibrated.brier:.4f}" if cal else "-",
                    "yes" if summary.converged else "[red]no[/red]",
                ])
    columns = ["α (bias)", "β (steepness)", "R-hat", "ESS bulk", "Brier raw → cal", "converged"]
    return fitted_tables("calibration", ["archetype", "event"], columns, rows, width=width)


def summary_notes(summary: CalibrationSummary) -> list[str]:
    """One line per thing a reader should know beyond the table (the posterior is in :func:`posterior_lines`)."""
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
    return lines


def wrapped(lines: Iterable[str], *, width: int) -> list[str]:
    """``lines`` wrapped at spaces to ``width``, keeping each line's indent (continuations indented two more).

    A word longer than the width (a URI, a path) is never broken: it stays
    whole on a line of its own, and the terminal shows it as it can.
    """
    out: list[str] = []
    for line in lines:
        indent = line[: len(line) - len(line.lstrip(" "))]
        out += textwrap.wrap(line, width=max(width, 20), subsequent_indent=indent + "  ",
                             break_long_words=False, break_on_hyphens=False) or [""]
    return out


def posterior_lines(summaries: Iterable[CalibrationSummary]) -> list[str]:
    """A heading, then each posterior URI alone on its line: whole, and copyable for ``calq apply``."""
    uris = [s.posterior_uri for s in summaries if s.posterior_uri]
    if not uris:
        return []
    return [f"posterior{'s' if len(uris) > 1 else ''} (for calq apply, calq report --posterior):", *uris]


def status_table(status: JobStatus) -> Table:
    """One job's record, field by field (every value through :func:`~producer.sanitize.for_markup`)."""
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in status.model_dump(mode="json").items():
        if value is not None and value is not False:
            table.add_row(key, for_markup(str(value)))
    return table


def jobs_table(records: Iterable[JobStatus], *, width: int | None = None) -> Group:
    """The job listing: newest first, with state, progress, when it changed and worker (``calq status ID`` has the rest).

    One line per job, its id whole (it is what ``calq cancel`` and ``wait``
    take) and no name cut: where the columns are wider than ``width`` they
    are split into tables that each fit, every one led by the job id
    (:func:`fitted_tables`). A worker name too long to stand beside the id
    in ``width`` is moved below the tables, whole, under its job's id.
    """
    records = list(records)
    rows = [[for_markup(s.job_id), for_markup(s.archetype), _state_label(s), _progress_cell(s), _updated_cell(s)]
            for s in records]
    columns = ["archetype", "state", "progress", "updated"]
    workers = [visible(s.worker or "") for s in records]
    below: list[Text] = []
    if width is None or boxed_width([len("job"), *(len(s.job_id) for s in records)],
                                    [len("worker"), *map(len, workers)]) <= width:
        columns.append("worker")
        rows = [[*row, for_markup(worker)] for row, worker in zip(rows, workers)]
    else:
        below = [line for s, worker in zip(records, workers) if worker
                 for line in (Text(f"{visible(s.job_id)} on"), Text("  " + worker))]
    tables = fitted_tables("jobs (newest first)", ["job"], columns, rows, width=width)
    for table in tables:  # names and states read from the left, as words do
        for column in table.columns:
            column.justify = "left"
    return Group(*tables, *below)


def _progress_cell(status: JobStatus) -> str:
    if status.state.finished:
        return ""
    phase, done = describe(status)
    return for_markup(f"{phase} {done:.0%}")


def _updated_cell(status: JobStatus) -> str:
    updated = status.updated_at or status.submitted_at
    return updated.strftime("%H:%M:%S") if updated else ""


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

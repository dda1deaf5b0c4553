"""``calq report``: the terminal tables of a dataset, or a page (HTML / markdown) of forecasts or calibrations.

Four kinds, one command::

    calq report DATASET                          terminal tables (or --json) of the raw forecasts
    calq report DATASET --html OUT.html          the same as a page with plots
    calq report --posterior URI --html OUT.html  one calibration, from its posterior (and the summary beside it)
    calq report --job JOB_ID --md OUT.md         one calibration, by job id
    calq report --latest [--archetype A] --html OUT.html
                                                 the newest converged calibration of every archetype

``--posterior``, ``--job`` and ``--latest`` need ``--html`` or ``--md`` (or both).
The loaders here turn a missing job, posterior or summary into
:class:`~shared.contract.errors.NotFound` and a file that is not a posterior
into :class:`UnreadablePosterior`, both with the URI in the message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from producer.sanitize import for_markup
from shared.contract.errors import CalqError, NotFound

Html = Annotated[Optional[Path], typer.Option("--html", metavar="OUT.html", help="Write a self-contained HTML page here.")]
Markdown = Annotated[Optional[Path], typer.Option("--md", metavar="OUT.md", help="Write markdown with base64-embedded PNGs here.")]


class UnreadablePosterior(CalqError):
    """The file at a posterior URI exists but is not a calq posterior (NetCDF InferenceData)."""


class ReportNotWritten(CalqError):
    """The page could not be written where it was asked for (a missing permission, a full disk)."""


def report(
    dataset: Annotated[Optional[Path], typer.Argument(help="A calibration dataset (NetCDF): report its raw forecasts.")] = None,
    posterior: Annotated[Optional[str], typer.Option(metavar="URI", help="One calibration, from its posterior (URI or path).")] = None,
    job: Annotated[Optional[str], typer.Option(metavar="JOB_ID", help="Report one calibration by its job id.")] = None,
    latest: Annotated[bool, typer.Option("--latest", help="Report the newest converged calibration of every archetype.")] = False,
    archetype: Annotated[Optional[str], typer.Option(help="With --latest: only these archetypes (comma-separated).")] = None,
    events: Annotated[Optional[str], typer.Option(help="DATASET: comma-separated events (default top_1,top_5,top_10).")] = None,
    html: Html = None,
    md: Markdown = None,
    as_json: Annotated[bool, typer.Option("--json", help="DATASET without --html/--md: print JSON instead of tables.")] = False,
) -> None:
    """Report raw forecasts (DATASET) or calibrations (--posterior, --job, --latest) as tables, HTML or markdown."""
    from producer.console import err, out, print_json, say

    kinds = (("DATASET", dataset), ("--posterior", posterior), ("--job", job), ("--latest", latest))
    chosen = [name for name, given in kinds if given]
    if len(chosen) != 1:
        raise typer.BadParameter("give exactly one of DATASET, --posterior URI, --job JOB_ID or --latest"
                                 + (f" (got {', '.join(chosen)})" if chosen else ""))
    if archetype and not latest:
        raise typer.BadParameter("--archetype goes with --latest")
    pages = html is not None or md is not None
    if dataset is None and not pages:
        raise typer.BadParameter(f"{chosen[0]} writes a page: add --html OUT.html or --md OUT.md (or both)")
    if as_json and pages:
        raise typer.BadParameter("--json prints the dataset's scores; it does not go with --html/--md")

    if dataset is not None and not pages:
        from producer.report.forecasts import forecast_report, report_tables

        result = forecast_report(dataset, events=events)
        if as_json:
            print_json(result)
        else:
            for table in report_tables(result):
                out.print(table)
        return

    for path in (html, md):
        if path is not None:
            _check_writable(path)  # before minutes of plotting, not after
    with _progress(err) as step:
        if dataset is not None:
            page = dataset_page(dataset, events=events, on_progress=step)
        elif latest:
            page = latest_report(_archetypes(archetype), on_progress=step)
        else:
            page = calibration_report(posterior=posterior, job_id=job, on_progress=step)
        step("writing")
        try:
            written = [path for path in (html and page.write_html(html), md and page.write_markdown(md)) if path]
        except OSError as exc:
            raise ReportNotWritten(f"cannot write the report: {exc}") from exc
    for path in written:
        say(err, f"wrote {path}")


# -- the three kinds of page ---------------------------------------------------------


def dataset_page(dataset: Path, *, events: str | None = None, on_progress: Callable[[str], None] | None = None):
    """The raw forecasts of a dataset as a page."""
    from producer.report.forecasts import forecast_report, forecast_sections
    from producer.report.page import Page
    from shared.storage.store import sha256_file

    report = forecast_report(dataset, events=events, on_progress=on_progress)
    if on_progress:
        on_progress("plotting")
    page = Page("calq report: raw forecasts", subtitle=f"{dataset.name}: {report['races']} races × {report['scenarios']} scenarios")
    return page.add(forecast_sections(report, sha256=sha256_file(dataset)))


def calibration_report(
    *, posterior: str | None = None, job_id: str | None = None, client=None, on_progress: Callable[[str], None] | None = None
):
    """The page of one calibration, by posterior URI (or path) or by job id."""
    from producer.report.calibration import calibration_page

    client = client or _client()
    if on_progress:
        on_progress("reading the posterior")
    calibration = load_posterior(client, posterior) if posterior is not None else load_job(client, job_id)
    return calibration_page(calibration, on_progress=on_progress)


def latest_report(archetypes: list[str] | None = None, *, client=None, on_progress: Callable[[str], None] | None = None):
    """The page of the newest converged calibration of every (archetype, event), optionally only some archetypes."""
    from producer.report.calibration import latest_page

    client = client or _client()
    if on_progress:
        on_progress("reading the latest calibrations")
    return latest_page(load_latest(client, archetypes), on_progress=on_progress)


# -- loading -------------------------------------------------------------------------


def load_posterior(client, uri: str):
    """A posterior (URI, or a local path) and the summary stored beside it."""
    from producer.report.calibration import Calibration

    if "://" not in uri:
        path = Path(uri).expanduser().resolve()
        if not path.is_file():
            raise NotFound(f"no posterior file at {uri}")
        uri = "file://" + str(path)
    if not uri.endswith(".nc"):
        raise UnreadablePosterior(f"{uri} is not a posterior: calq posteriors are NetCDF files named JOB_ID.nc")
    idata = _read_idata(client, uri)
    summary_uri = uri[: -len(".nc")] + ".json"
    try:
        summary = client.catalog.read(summary_uri)
    except NotFound:
        raise NotFound(f"no summary beside the posterior {uri} (expected {summary_uri})") from None
    except (ValueError, TypeError) as exc:
        raise UnreadablePosterior(f"the summary at {summary_uri} is not a calq summary: {exc}") from exc
    return Calibration(summary=summary, idata=idata)


def load_job(client, job_id: str):
    """The summary and posterior of a succeeded job (NotFound when there is none)."""
    from producer.report.calibration import Calibration

    summary = client.result(job_id)
    if not summary.posterior_uri:
        raise NotFound(f"job {job_id} has no posterior")
    return Calibration(summary=summary, idata=_read_idata(client, summary.posterior_uri))


def load_latest(client, archetypes: list[str] | None = None):
    """``{(archetype, event): Calibration}`` for every latest pointer (of ``archetypes``, if given)."""
    from producer.report.calibration import Calibration

    pointers = client.latest_pointers(archetypes or None)
    if not pointers:
        what = ", ".join(archetypes) if archetypes else "any archetype"
        raise NotFound(f"no converged calibration of {what} yet")
    by_job: dict[str, Calibration] = {}
    slots = {}
    for slot, pointer in pointers.items():
        if pointer.job_id not in by_job:
            summary = client.catalog.read(pointer.summary_uri) if pointer.summary_uri else client.catalog.summary(pointer.job_id)
            by_job[pointer.job_id] = Calibration(summary=summary, idata=_read_idata(client, summary.posterior_uri))
        slots[slot] = by_job[pointer.job_id]
    return slots


def _read_idata(client, uri: str):
    try:
        idata = client.posterior_at(uri)  # over the API: fetched by the job id the file is named after
    except CalqError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UnreadablePosterior(f"cannot read the posterior at {uri}: {type(exc).__name__}: {exc}") from exc
    if not hasattr(idata, "posterior") or "alpha_track" not in idata.posterior:
        raise UnreadablePosterior(f"{uri} holds no calq posterior (no posterior group with alpha_track)")
    return idata


# -- helpers -------------------------------------------------------------------------


def _check_writable(path: Path) -> None:
    """Create ``path``'s folder and make sure a file can be written there (ReportNotWritten if not)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportNotWritten(f"cannot write the report to {path}: {exc}") from exc
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise ReportNotWritten(f"cannot write the report to {path}: " + ("it is a folder" if path.is_dir() else "no permission"))


def _client():
    from producer.client import CalibrationClient

    return CalibrationClient()


def _archetypes(value: str | None) -> list[str] | None:
    if not value:
        return None
    from shared.contract.domain import ARCHETYPES

    names = [a.strip() for a in value.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARCHETYPES]
    if unknown:
        raise typer.BadParameter(f"unknown archetype(s) {', '.join(map(json.dumps, unknown))}; expected {', '.join(ARCHETYPES)}")
    return names


@contextmanager
def _progress(console: Console):
    """A status line on stderr while the report is built: ``step(label)`` names the stage under way."""
    if not console.is_terminal:
        yield lambda label: None
        return
    done = 0
    with console.status("report: starting") as status:

        def step(label: str) -> None:
            nonlocal done
            done += 1
            status.update(f"report, step {done}: {for_markup(label)}")

        yield step


__all__ = [
    "ReportNotWritten",
    "UnreadablePosterior",
    "calibration_report",
    "dataset_page",
    "latest_report",
    "load_job",
    "load_latest",
    "load_posterior",
    "report",
]

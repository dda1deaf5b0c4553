"""The ``calq`` command line.

Every command works with nothing running: without ``CALQ_BROKER_URL`` jobs
run in this process on the local store. With a broker configured, jobs go to
the Celery fleet. Output is a rich table, or JSON with ``--json``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from producer import api_commands, exit_codes, fleet_command, helptext, job_commands, usage
from producer.console import client as _client
from producer.console import err, out, say
from producer.console import print_json as _print_json
from producer.report.command import report
from producer.sanitize import VisibleFormatter, for_markup, visible
from shared.contract.errors import CalqError, NotFound
from shared.contract.settings import MIN_SCENARIOS

app = typer.Typer(
    name="calq",
    help="calq: calibrated probabilities from race-simulation forecasts, as a job queue.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    cls=helptext.CalqGroup,
)
log = logging.getLogger("calq")
#: ``calq --debug``: errors show their traceback (set by the root callback, read by :func:`main`).
_debug = False


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            out.print(f"calq {version('calq')}", highlight=False)
        except PackageNotFoundError:
            out.print("calq (not installed: run pip install -e .)", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")] = False,
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="Print calq's version and exit.")
    ] = False,
) -> None:
    """calq: calibrated probabilities from race-simulation forecasts, as a job queue."""
    global _debug
    _debug = debug


#: A dataset the command reads: a missing file or a folder is a usage mistake (exit 2), before any work.
DatasetFile = Annotated[
    Path, typer.Argument(metavar="DATASET", exists=True, dir_okay=False, help="A calibration dataset (NetCDF).")
]
JobId = Annotated[str, typer.Argument(help="A job id (cj-…), as submit, jobs or a summary show it.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Events = Annotated[Optional[str], typer.Option(help="Comma-separated events, e.g. top_5,top_10 (default top_1,top_5,top_10).")]
# Help in braces is filled in from the settings in force when help is drawn (producer.helptext).
Warmup = Annotated[
    Optional[int], typer.Option(min=1, help="Warmup steps per chain (default: CALQ_SAMPLER__WARMUP, now {sampler.warmup}).")
]
Samples = Annotated[
    Optional[int], typer.Option(min=1, help="Draws per chain (default: CALQ_SAMPLER__SAMPLES, now {sampler.samples}).")
]
Chains = Annotated[Optional[int], typer.Option(min=1, help="Chains (default: CALQ_SAMPLER__CHAINS, now {sampler.chains}).")]
Seed = Annotated[int, typer.Option(help="Seed of the sampler.")]
AsOf = Annotated[Optional[str], typer.Option(help="Use races before this date (YYYY-MM-DD).")]
MaxInFlight = Annotated[int, typer.Option(
    min=1, help="Jobs queued or running at once (on the fleet, up to CALQ_BATCH__MAX_JOBS of them go as one batch message).",
)]
WindowDays = Annotated[Optional[int], typer.Option(min=1, help="Only races in the last N days before --as-of.")]



def _archetypes_in(dataset: Path, wanted: str | None) -> list[str]:
    """The jobs to run: the archetypes named, or each archetype the dataset holds."""
    from shared.contract.domain import ARCHETYPES
    from shared.data.dataset import open_dataset

    if wanted:
        return usage.archetypes(wanted)
    ds = open_dataset(dataset)
    present = set(ds["archetype"].values.astype(str))
    return [a for a in ARCHETYPES if a in present]


# -- data ------------------------------------------------------------------------


@app.command()
def synth(
    out_path: Annotated[Path, typer.Argument(metavar="OUT.nc", help="Where to write the dataset.")],
    seasons: Annotated[int, typer.Option(min=1, help="Seasons of ~36 races.")] = 1,
    scenarios: Annotated[int, typer.Option(min=MIN_SCENARIOS, help="Simulated scenarios per race.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same dataset.")] = 0,
    first_season: Annotated[int, typer.Option(help="Year of the first season.")] = 2024,
    regime: Annotated[
        Optional[str], typer.Option(help="A harder world; it sets the schedule and --seasons. One of: {regimes}.")
    ] = None,
) -> None:
    """Write a synthetic calibration dataset whose miscalibration is known."""
    from shared.data.dataset import save_dataset
    from shared.data.regimes import synthesize_regime
    from shared.data.synth import synthesize

    with err.status(f"simulating {regime or f'{seasons} season(s)'} × {scenarios} scenarios"):
        if regime is None:
            ds = synthesize(seasons=seasons, scenarios=scenarios, seed=seed, first_season=first_season)
        else:
            try:
                ds = synthesize_regime(regime, seed=seed, scenarios=scenarios, first_season=first_season)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--regime") from None
        save_dataset(ds, out_path)
    say(err, f"wrote {out_path}: {ds.sizes['race']} races, {ds.sizes['driver']} drivers, {ds.sizes['scenario']} scenarios")


app.command()(report)  # calq report: tables, or HTML / markdown pages (producer.report.command)


# -- the main job ----------------------------------------------------------------


@app.command()
def calibrate(
    dataset: DatasetFile,
    archetype: Annotated[
        Optional[str],
        typer.Option(help="An archetype, a comma-separated list, or 'all' for one joint fit (default: each archetype in the data)."),
    ] = None,
    events: Events = None,
    warmup: Warmup = None,
    samples: Samples = None,
    chains: Chains = None,
    seed: Seed = 0,
    as_of: AsOf = None,
    window_days: WindowDays = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the fleet.")] = 3600,
    as_json: JsonFlag = False,
) -> None:
    """Calibrate a dataset: one job per archetype, here (embedded) or on the fleet.

    Embedded, Ctrl-C cancels the running job at its next check (it ends
    ``cancelled`` and writes nothing) and the jobs after it; exit code 4.
    """
    from producer.client import JobDidNotSucceed

    usage.archetypes(archetype)  # every usage mistake before any work: nothing is uploaded for a typo
    usage.events(events)
    as_of_date = _date(as_of)
    client = _client()
    summaries, failures = [], []
    started = datetime.now(UTC)
    ref = client.upload(dataset)
    with _ctrl_c_cancels(client):
        for name in _archetypes_in(dataset, archetype):
            if client.interrupted:
                break
            job = client.make_job(
                dataset, name, events=events, warmup=warmup, samples=samples, chains=chains, seed=seed,
                as_of=as_of_date, window_days=window_days, dataset_ref=ref,
            )
            try:
                summaries.append(_run_with_progress(client, job, timeout=timeout, quiet=as_json))
            except JobDidNotSucceed as exc:
                failures.append(exc.status)
                say(err, f"{name}: {exc}", style="red")
    if summaries or not failures:
        _show(summaries if len(summaries) != 1 else summaries[0], as_json)
    reused = [s for s in summaries if _as_utc(s.created_at) < started]
    if reused and not as_json:
        say(err, f"reused {len(reused)} of {len(summaries)} job(s) already in the store: not fitted again, "
                 "their timings are from when they ran")
    code = exit_codes.worst(exit_codes.for_state(s.state) for s in failures)
    if client.interrupted:
        code = exit_codes.ExitCode.CANCELLED
    if code:
        raise typer.Exit(code)


@contextlib.contextmanager
def _ctrl_c_cancels(client, *, fleet: bool = False):
    """The first Ctrl-C cancels what the command started; a second one quits at once (exit 4 either way).

    Embedded, the first Ctrl-C cancels the job running here at its next check
    (:meth:`~producer.client.CalibrationClient.interrupt`: it ends
    ``cancelled`` and writes nothing) and every later one. A second Ctrl-C
    stops the job at once, and its record still ends ``cancelled`` (the client
    settles it on the way out; Ctrl-C is ignored while it does). With
    ``fleet``, for a command that follows the fleet jobs it sent (backfill),
    the first Ctrl-C marks the client interrupted and the command's loop
    cancels its jobs through the client; without it, Ctrl-C on the fleet only
    stops the waiting (exit 4) and the jobs run on.
    """
    if (not client.embedded and not fleet) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame) -> None:
        if client.interrupted:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the record is settled; restored below
            Interrupted.seen = True
            raise Interrupted
        client.interrupt("interrupted (Ctrl-C)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_with_progress(client, job, *, timeout: float, quiet: bool):
    """Submit (embedded: run) a job and wait for it, with a progress bar unless ``quiet``."""
    from producer.render import describe, progress_bar

    if quiet:
        client.submit_job(job)
        return client.wait(job.job_id, timeout=timeout)
    with progress_bar(err) as bar:
        task = bar.add_task(job.archetype, total=1.0, phase="queued")

        def update(status) -> None:
            phase, done = describe(status)
            bar.update(task, completed=done, phase=phase)

        client.submit_job(job, on_update=update)
        return client.wait(job.job_id, timeout=timeout, on_update=update)


@app.command()
def demo(
    seasons: Annotated[int, typer.Option(min=1, help="Seasons of ~36 races to simulate.")] = 1,
    scenarios: Annotated[int, typer.Option(min=MIN_SCENARIOS, help="Simulated scenarios per race.")] = 1000,
    warmup: Warmup = None,
    samples: Samples = None,
    chains: Chains = None,
    seed: Seed = 0,
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the synthetic dataset.")] = Path("calq-demo.nc"),
    as_json: JsonFlag = False,
) -> None:
    """Make a synthetic dataset and calibrate every archetype (the whole job, end to end)."""
    synth(out_path, seasons=seasons, scenarios=scenarios, seed=seed)
    calibrate(out_path, archetype=None, events=None, warmup=warmup, samples=samples, chains=chains, seed=seed,
              as_of=None, window_days=None, timeout=3600, as_json=as_json)


@app.command()
def apply(
    posterior_uri: Annotated[str, typer.Argument(help="URI (or path) of a posterior NetCDF.")],
    event: Annotated[str, typer.Option(help="The event, e.g. top_5.")],
    p: Annotated[str, typer.Option(help="Comma-separated forecast probabilities.")],
    track: Annotated[Optional[str], typer.Option(help="The track; an unseen track borrows its archetype.")] = None,
    archetype: Annotated[Optional[str], typer.Option(help="The archetype to fall back on.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Calibrate new forecast probabilities with a stored posterior."""
    from rich.table import Table

    from shared.fit.apply import calibrate_probabilities, fitted_tracks

    usage.event(event)
    if archetype is not None:
        usage.archetype(archetype, allow_all=False)
    probabilities = _floats(p)
    if "://" not in posterior_uri and not Path(posterior_uri).is_file():
        raise typer.BadParameter(f"no posterior file at {visible(posterior_uri)}", param_hint="POSTERIOR_URI")
    # through the client: over the API (a token only) the posterior is fetched by its job id
    idata = _client().posterior_at(posterior_uri if "://" in posterior_uri else "file://" + str(Path(posterior_uri).resolve()))
    try:
        results = calibrate_probabilities(idata, probabilities, event=event, track=track, archetype=archetype)
    except (KeyError, ValueError) as exc:
        raise typer.BadParameter(str(exc).strip("'\"")) from None
    if as_json:
        _print_json([r.to_dict() for r in results])
        return
    table = Table(title=for_markup(f"{event} at {track or archetype}"))
    for column in ("p", "calibrated", "94% band"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(f"{r.p:.3f}", f"{r.mean:.3f}", f"[{r.low:.3f}, {r.high:.3f}]")
    out.print(table)
    if results and results[0].track_seen is False:  # normal for a new track; a typo looks the same, so say it
        near = usage.did_you_mean(track, fitted_tracks(idata))
        say(out, f"{track} is not a track of this posterior: it borrows its archetype's population (a wider band)"
                 + (f"; did you mean {near}?" if near else ""))


# -- the fleet -------------------------------------------------------------------


@app.command()
def submit(
    dataset: DatasetFile,
    archetype: Annotated[str, typer.Option(help="An archetype, or 'all'.")],
    events: Events = None,
    warmup: Warmup = None,
    samples: Samples = None,
    chains: Chains = None,
    seed: Seed = 0,
    as_of: AsOf = None,
    window_days: WindowDays = None,
    queue: Annotated[Optional[str], typer.Option(help="gpu or cpu (default: CALQ_DEFAULT_QUEUE, now {default_queue}).")] = None,
    lane: Annotated[str, typer.Option(
        help="interactive: workers take it first; batch: it waits its turn among every owner's batch jobs."
    )] = "interactive",
    as_json: JsonFlag = False,
) -> None:
    """Submit a job and print its id (embedded mode: run it now; Ctrl-C cancels it cleanly, exit 4)."""
    usage.archetype(archetype)
    usage.lane(lane)
    usage.events(events)
    as_of_date = _date(as_of)
    client = _client()
    with _ctrl_c_cancels(client):
        job_id = client.submit(
            dataset, archetype, events=events, warmup=warmup, samples=samples, chains=chains, seed=seed,
            as_of=as_of_date, window_days=window_days, queue=queue, lane=lane,
        )
    if as_json:
        _print_json({"job_id": job_id})
    else:
        out.print(job_id)
    if client.interrupted:
        raise typer.Exit(exit_codes.ExitCode.CANCELLED)


@app.command()
def status(job_id: JobId, as_json: JsonFlag = False) -> None:
    """Show a job's record: state, progress, reason."""
    from producer.render import status_table

    record = _client().status(job_id)
    if as_json:
        _print_json(record.model_dump(mode="json"))
    else:
        out.print(status_table(record))


@app.command()
def wait(
    job_id: JobId,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600,
    as_json: JsonFlag = False,
) -> None:
    """Wait for a job and print its summary.

    Exit 0 if it succeeded, 1 if it failed or was rejected, 3 if it had not
    ended within --timeout, 4 if it was cancelled, 5 if the fleet could not
    be reached (Redis or the store) when time ran out; outages shorter than
    the timeout are ridden through, with a message.
    """
    from producer.client import JobDidNotSucceed
    from producer.render import describe, progress_bar

    client = _client()

    def outage(exc: Exception, left: float) -> None:
        say(err, f"cannot reach the fleet ({exc}); still waiting, {left:.0f} s left", style="yellow")

    try:
        with progress_bar(err) as bar:
            task = bar.add_task(visible(job_id), total=1.0, phase="waiting")

            def update(record) -> None:
                phase, done = describe(record)
                bar.update(task, completed=done, phase=phase)

            summary = client.wait(job_id, timeout=timeout, on_update=None if as_json else update, on_outage=outage)
    except JobDidNotSucceed as exc:
        if as_json:
            _print_json(exc.status.model_dump(mode="json"))
        say(err, exc, style="red")
        raise typer.Exit(exit_codes.for_state(exc.status.state)) from None
    except TimeoutError as exc:
        say(err, exc, style="red")
        raise typer.Exit(exit_codes.ExitCode.TIMED_OUT) from None
    _show(summary, as_json)


@app.command()
def result(job_id: JobId, as_json: JsonFlag = False) -> None:
    """Print a finished job's summary."""
    summary = _client().result(job_id)
    _show(summary, as_json)


@app.command()
def latest(
    archetype: Annotated[str, typer.Argument(help="superspeedway, intermediate, short_track or road_course.")],
    event: Annotated[Optional[str], typer.Option(help="Only this event's pointer.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Print the newest converged summary for an archetype."""
    usage.archetype(archetype, hint="ARCHETYPE")
    if event is not None:
        usage.event(event)
    summary = _client().latest(archetype, event)
    _show(summary, as_json)


@app.command()
def reindex(as_json: JsonFlag = False) -> None:
    """Rebuild the latest pointers from the store, repair job records it proves finished, queue again jobs Redis lost."""
    from shared.jobs.submissions import reindex as rebuild

    client = _client()
    done = rebuild(registry=client.registry, store=client.store, publish=client.send, leases=client.services.leases)
    if as_json:
        _print_json(done)
    else:
        say(out, f"rebuilt {done['pointers']} latest pointer(s), repaired {done['repaired']} job record(s), queued "
                 f"{done['requeued']} lost job(s) again from {client.store.url} and sent {done['resent']} queued "
                 "job(s) whose message was lost")


@app.command()
def worker(
    gpus: Annotated[str, typer.Option(help="auto, none (CPU workers), or a list like 0,1.")] = "auto",
    queues: Annotated[Optional[str], typer.Option(help="Comma-separated queues (default by worker kind).")] = None,
    cpu_workers: Annotated[int, typer.Option(min=1, help="CPU worker processes with --gpus none.")] = 1,
) -> None:
    """Start the workers: one pinned process per GPU, supervised (runs ``python -m worker``)."""
    settings = _settings()
    if settings.embedded:
        err.print("[red]no broker configured: set CALQ_BROKER_URL (e.g. redis://localhost:6379/0)[/red]")
        raise typer.Exit(2)
    argv = [sys.executable, "-m", "worker", "--gpus", gpus, "--cpu-workers", str(cpu_workers)]
    if queues:
        argv += ["--queues", queues]
    sys.stdout.flush()
    sys.stderr.flush()
    # The worker is its own program: exec it, so signals reach its supervisor directly
    # and the producer never imports the worker package.
    os.execv(sys.executable, argv)


@app.command()
def backfill(
    dataset: DatasetFile,
    date_from: Annotated[str, typer.Option("--from", help="First race date (YYYY-MM-DD).")],
    date_to: Annotated[str, typer.Option("--to", help="Last race date (YYYY-MM-DD).")],
    archetypes: Annotated[Optional[str], typer.Option(help="Comma-separated archetypes (default: all four).")] = None,
    window_days: Annotated[int, typer.Option(help="Rolling window of data before each date.")] = 3 * 365,
    max_in_flight: MaxInFlight = 4,
    events: Events = None,
    warmup: Warmup = None,
    samples: Samples = None,
    chains: Chains = None,
    seed: Seed = 0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each job.")] = 3600,
    as_json: JsonFlag = False,
) -> None:
    """Recompute calibration as of every race date in a range; resumable.

    Ctrl-C cancels the jobs in flight (here, or on the fleet), submits no
    more, prints the table of done, reused, failed, cancelled and not-run
    jobs and exits 4; a second Ctrl-C quits at once.
    """
    from producer.backfill import Backfill, outcome_table

    chosen = usage.archetypes(archetypes, allow_all=False, hint="--archetypes")
    usage.events(events)
    start, end = _date(date_from), _date(date_to)
    client = _client()
    plan = Backfill(
        client, dataset,
        start=start, end=end,
        archetypes=chosen,
        window_days=window_days, events=events,
        sampler={"warmup": warmup, "samples": samples, "chains": chains, "seed": seed},
    )
    with _ctrl_c_cancels(client, fleet=True):
        outcomes = plan.run(max_in_flight=max_in_flight, timeout=timeout, console=None if as_json else err)
    if as_json:
        _print_json([o.to_dict() for o in outcomes])
    else:
        out.print(outcome_table(outcomes))
    if client.interrupted:
        raise typer.Exit(exit_codes.ExitCode.CANCELLED)
    if any(o.state != "succeeded" for o in outcomes):
        raise typer.Exit(1)


@app.command()
def evaluate(
    dataset: DatasetFile,
    date_from: Annotated[str, typer.Option("--from", help="First race date to score (YYYY-MM-DD).")],
    date_to: Annotated[str, typer.Option("--to", help="Last race date to score (YYYY-MM-DD).")],
    archetypes: Annotated[Optional[str], typer.Option(help="Comma-separated archetypes (default: all four).")] = None,
    events: Events = None,
    window_days: Annotated[int, typer.Option(help="Rolling window of data before each race (as in backfill).")] = 3 * 365,
    fleet: Annotated[bool, typer.Option("--fleet", help="Run the fits on the fleet (needs CALQ_BROKER_URL) and wait.")] = False,
    max_in_flight: MaxInFlight = 4,
    warmup: Warmup = None,
    samples: Samples = None,
    chains: Chains = None,
    seed: Seed = 0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each job.")] = 3600,
    html: Annotated[Optional[Path], typer.Option(metavar="OUT.html", help="Also write the evaluation page here.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Out of sample: score each race with the newest converged fit on earlier races; raw against calibrated."""
    from producer.evaluate import evaluate_command, evaluate_tables, write_page

    usage.archetypes(archetypes, allow_all=False, hint="--archetypes")
    usage.events(events)
    try:
        result = evaluate_command(
            _client(), dataset, start=_date(date_from), end=_date(date_to), archetypes=archetypes, events=events,
            window_days=window_days, fleet=fleet, max_in_flight=max_in_flight, timeout=timeout,
            sampler={"warmup": warmup, "samples": samples, "chains": chains, "seed": seed},
            console=None if as_json else err,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if as_json:
        _print_json(result.to_json())
    else:
        for table in evaluate_tables(result.records, width=out.width):
            out.print(table)
    if html is not None:
        say(err, f"wrote the evaluation page to {write_page(result, html)}")


@app.command()
def schema(
    name: Annotated[str, typer.Argument(help="summary, job, evaluation, calibration, or all.")],
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the field reference (docs/json-outputs.md).")] = False,
) -> None:
    """Print the JSON Schema of a --json output, generated from its pydantic model."""
    from producer import schemas

    names = [*schemas.OUTPUTS, "all"]
    if name not in names:
        raise typer.BadParameter(usage.unknown("output", name, names), param_hint="NAME")
    if markdown:
        if name != "all":
            raise typer.BadParameter("--markdown writes the whole reference: use calq schema all --markdown")
        print(schemas.markdown(), end="")
        return
    _print_json({n: schemas.json_schema(n) for n in schemas.OUTPUTS} if name == "all" else schemas.json_schema(name))


@app.command()
def config() -> None:
    """Show the settings in effect (passwords masked)."""
    _print_json(_settings().public())


# -- helpers ---------------------------------------------------------------------


def _show(summaries, as_json: bool) -> None:
    """A summary (or several) as JSON, or as the calibration table and its notes."""
    from producer.render import posterior_lines, summary_notes, summary_tables, wrapped

    many = isinstance(summaries, list)
    items = summaries if many else [summaries]
    if as_json:
        dumped = [s.model_dump(mode="json") for s in items]
        _print_json(dumped if many else dumped[0])
        return
    for table in summary_tables(items, width=out.width):
        out.print(table)
    for line in wrapped([line for s in items for line in summary_notes(s)], width=out.width) + posterior_lines(items):
        say(out, line)  # data-derived text; wrapped at words only, and a URI alone on its line, whole


def _settings():
    from shared.contract.settings import get_settings

    return get_settings()


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _date(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"'{visible(value)}' is not a date like 2025-06-01") from None


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


job_commands.register(app)  # calq cancel, calq jobs
fleet_command.register(app)  # calq fleet
api_commands.register(app)  # calq serve, calq token
helptext.install(app)  # after every command is registered: help from the settings in force, plain names


class Interrupted(BaseException):
    """Ctrl-C. Not a KeyboardInterrupt, which Click turns into its own exit code on the way out.

    Raised from a signal handler, it can surface as another exception: raised
    while a C extension initialises, it is an ``ImportError: initialization
    failed``. ``seen`` says a Ctrl-C raised it, so :func:`_run` reports what
    comes out after that as the interruption it is.
    """

    seen = False


def _on_sigint(signum, frame) -> None:
    Interrupted.seen = True
    raise Interrupted


def _quit_cancelled(signum, frame) -> None:
    """Ctrl-C while calq is already ending: end now, with the code of a cancellation (never Python's 130)."""
    os._exit(exit_codes.ExitCode.CANCELLED)


def _ignore_ctrl_c_while_finalising() -> None:
    """The last exit handler: a Ctrl-C from here on is ignored, so calq ends with the code it chose.

    After the exit handlers, Python puts SIGINT back to the system's default
    before it tears its modules down (JAX's take a moment), and a Ctrl-C then
    killed calq by the signal (exit -2), not with its code. A handler set to
    ``SIG_IGN`` is one Python leaves in place.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _logging(level: str) -> None:
    if "CALQ_LOG_LEVEL" not in os.environ and sys.argv[1:2] != ["worker"]:
        level = "WARNING"  # interactive commands show progress bars and tables, not log lines
        # An embedded job's outcome is the command's own output (its reason in red, once):
        # the handler's log line of the same outcome would say it twice.
        logging.getLogger("shared.jobs.handle").setLevel(logging.ERROR)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(VisibleFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    for noisy in ("jax", "absl", "botocore", "s3fs", "aiobotocore", "celery", "kombu"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run() -> int:
    """Run the command; every error it ends with becomes one line and an exit code (see exit_codes)."""
    import pydantic

    try:
        code = app(args=sys.argv[1:] or ["--help"], prog_name="calq", standalone_mode=False) or 0
    except typer.Abort:  # Click's own Ctrl-C (at a prompt)
        say(err, "interrupted", style="red")
        return exit_codes.ExitCode.CANCELLED
    except typer.TyperException as exc:  # usage: a bad option, argument, archetype, event or file
        say(err, usage.one_line(exc), style="red")
        return exit_codes.ExitCode.USAGE
    except NotFound as exc:
        say(err, f"not found: {exc}", style="red")
        return exit_codes.ExitCode.FAILED
    except CalqError as exc:
        status = getattr(exc, "status", None)  # JobDidNotSucceed: the job's own outcome
        say(err, f"{type(exc).__name__}: {exc}", style="red")
        return exit_codes.for_state(status.state) if status is not None else exit_codes.for_error(exc)
    except pydantic.ValidationError as exc:  # a job built from options that break its schema
        say(err, f"invalid input: {usage.problems(exc)}", style="red")
        return exit_codes.ExitCode.USAGE
    except (Interrupted, KeyboardInterrupt):
        say(err, "interrupted", style="red")
        return exit_codes.ExitCode.CANCELLED
    except Exception as exc:
        if Interrupted.seen:  # the Ctrl-C, wrapped by the code it interrupted
            say(err, "interrupted", style="red")
            return exit_codes.ExitCode.CANCELLED
        if _debug:
            raise
        say(err, f"calq: unexpected {type(exc).__name__}: {exc} (run 'calq --debug ...' for the traceback)", style="red")
        return exit_codes.ExitCode.FAILED
    # typer answers a KeyboardInterrupt with 130; calq's Ctrl-C is a cancellation, and says so
    return exit_codes.ExitCode.CANCELLED if code == 130 else code


def main() -> None:
    """Entry point: choose the device, configure logging once, run the command, report calq errors.

    Nothing reaches a user as a traceback unless ``calq --debug`` is given:
    usage mistakes and invalid settings are one line and exit 2, every other
    error one line and its code in :mod:`producer.exit_codes`.
    """
    from pydantic import ValidationError

    from shared.contract.settings import get_settings
    from shared.fit.device import use_host_devices

    use_host_devices()  # before anything imports JAX: chains in parallel on the CPU
    signal.signal(signal.SIGINT, _on_sigint)
    atexit.register(_ignore_ctrl_c_while_finalising)  # before JAX's and the others': it runs after them
    try:
        level = get_settings().log_level
    except ValidationError as exc:  # invalid settings: which variables, never their values
        say(err, f"calq: invalid settings: {usage.settings_problems(exc)}", style="red")
        sys.exit(exit_codes.ExitCode.USAGE)
    _logging(level)
    try:
        code = _run()
    except (Interrupted, KeyboardInterrupt):  # a second Ctrl-C while the first was being reported
        code = exit_codes.ExitCode.CANCELLED
    signal.signal(signal.SIGINT, _quit_cancelled)  # from here on, Ctrl-C only hurries the exit
    sys.exit(code)


if __name__ == "__main__":
    main()

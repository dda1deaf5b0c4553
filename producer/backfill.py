"""Backfills: calibration as of every past race date, one job per data window, resumable.

A fit is determined by the races it sees, not by the calendar: for an
archetype, the races of that archetype strictly before ``as_of`` and on or
after ``as_of - window_days`` (see :func:`shared.data.dataset.select_window`).
That *data window* changes only when one of the archetype's races enters it
(the day after the race) or leaves it (``window_days`` later), so many race
dates share a window: a superspeedway fit as of every intermediate race date
is the same fit again. A backfill therefore plans one job per archetype per
distinct window among the race dates in the range, and gives each job the
window's *first* day as its ``as_of`` (the canonical date of that window), so
the job's content, and with it its id, is the same whichever race date asked
for it.

Job ids come from job content, so a rerun finds the jobs already done and
skips them: an interrupted backfill picks up where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from producer.sanitize import visible
from shared.contract.domain import ARCHETYPES
from shared.contract.errors import NotFound
from shared.contract.job import CalibrationJob, JobState
from shared.data.dataset import in_window, open_dataset
from shared.jobs.celery_app import BATCH

log = logging.getLogger(__name__)

POLL_S = 0.5
#: After a Ctrl-C, how long a backfill waits for the fleet jobs it cancelled to stop.
CANCEL_GRACE_S = 30.0
#: The outcome of a job a backfill planned but never submitted (it was interrupted first).
NOT_RUN = "not run"
#: The default rolling window of ``calq backfill`` and ``calq evaluate``: three years.
DEFAULT_WINDOW_DAYS = 3 * 365


@dataclass(frozen=True)
class Outcome:
    archetype: str
    as_of: date
    job_id: str
    state: str
    reason: str | None = None
    races: int = 0
    #: Its summary was already in the store: not fitted again (``state`` is ``succeeded``).
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "as_of": self.as_of.isoformat()}


@dataclass(frozen=True)
class Window:
    """One archetype's data window: the races a fit as of any of ``days`` sees.

    ``as_of`` is the first day on which the window holds exactly ``races``
    (the canonical as-of date of its job); ``days`` are the requested dates
    it serves, each on or after ``as_of``.
    """

    archetype: str
    as_of: date
    races: tuple[str, ...]
    days: tuple[date, ...] = ()
    job: CalibrationJob | None = field(default=None, compare=False)


class RaceCalendar:
    """The races of a dataset as plain arrays: id, day and archetype; answers window questions."""

    def __init__(
        self, race_ids: Sequence[str], days: np.ndarray, archetypes: Sequence[str], tracks: Sequence[str] | None = None
    ) -> None:
        self.race_ids = np.asarray(race_ids).astype(str)
        self.days = np.asarray(days).astype("datetime64[D]")
        self.archetypes = np.asarray(archetypes).astype(str)
        self.tracks = np.asarray(tracks if tracks is not None else [""] * len(self.race_ids)).astype(str)

    @classmethod
    def of(cls, ds) -> RaceCalendar:
        return cls(ds["race"].values, ds["race_date"].values, ds["archetype"].values, ds["track"].values)

    def race_days(self, start: date, end: date, archetypes: Sequence[str] | None = None) -> list[date]:
        """Distinct race dates in [start, end] (of ``archetypes``, default any), ascending."""
        keep = (self.days >= np.datetime64(start)) & (self.days <= np.datetime64(end))
        if archetypes is not None:
            keep &= np.isin(self.archetypes, list(archetypes))
        return sorted({d.astype(object) for d in self.days[keep]})

    def seen(self, archetype: str, as_of: date, window_days: int | None) -> np.ndarray:
        """Mask of the races a fit of ``archetype`` as of ``as_of`` sees (``select_window``'s rule)."""
        return (self.archetypes == archetype) & in_window(self.days, as_of=as_of, window_days=window_days)

    def window_start(self, archetype: str, as_of: date, window_days: int | None) -> date:
        """The first day whose window equals ``as_of``'s: the latest entry or exit on or before ``as_of``.

        Race day r enters a window on r + 1 and leaves it on r + window_days + 1.
        """
        mine = self.days[self.archetypes == archetype]
        changes = mine + np.timedelta64(1, "D")
        if window_days is not None:
            changes = np.concatenate([changes, mine + np.timedelta64(window_days + 1, "D")])
        changes = changes[changes <= np.datetime64(as_of, "D")]
        return changes.max().astype(object) if changes.size else as_of

    def windows(
        self, archetype: str, days: Sequence[date], *, window_days: int | None
    ) -> list[Window]:
        """The distinct non-empty windows of ``archetype`` over ``days``, by their first day."""
        found: dict[date, Window] = {}
        for day in sorted(days):
            seen = self.seen(archetype, day, window_days)
            if not seen.any():
                log.info("skipping %s as of %s: no earlier races in the window", archetype, day)
                continue
            first = self.window_start(archetype, day, window_days)
            races = tuple(self.race_ids[seen].tolist())
            if first in found:
                found[first] = Window(archetype, first, races, (*found[first].days, day))
                continue
            if not np.array_equal(self.seen(archetype, first, window_days), seen):
                raise AssertionError(f"window of {archetype} as of {first} differs from as of {day}")
            found[first] = Window(archetype, first, races, (day,))
        return list(found.values())


class Backfill:
    """The jobs of one backfill, and the loop that runs them with at most N in flight."""

    def __init__(
        self,
        client,
        dataset: Path,
        *,
        start: date,
        end: date,
        archetypes: list[str] | None = None,
        window_days: int | None = DEFAULT_WINDOW_DAYS,
        events: str | None = None,
        sampler: dict[str, Any] | None = None,
        dedup: bool = True,
    ) -> None:
        if end < start:
            raise ValueError(f"--to {end} is before --from {start}")
        self.client = client
        self.dataset = Path(dataset)
        self.start, self.end = start, end
        self.archetypes = archetypes or list(ARCHETYPES)
        self.window_days = window_days
        self.events = events
        self.sampler = {k: v for k, v in (sampler or {}).items() if v is not None}
        self.dedup = dedup

    def windows(self, calendar: RaceCalendar | None = None) -> list[Window]:
        """One window, with its job, per archetype and distinct data window of the race dates in range.

        With ``dedup=False`` (for comparison only) every race date gets its own
        job as of that date, as backfills did before windows were keys.
        """
        calendar = calendar or RaceCalendar.of(open_dataset(self.dataset))
        ref = self.client.upload(self.dataset)
        days = calendar.race_days(self.start, self.end)
        planned = []
        for archetype in self.archetypes:
            windows = calendar.windows(archetype, days, window_days=self.window_days)
            if not self.dedup:
                windows = [Window(archetype, d, w.races, (d,)) for w in windows for d in w.days]
            for w in windows:
                job = self.client.make_job(
                    self.dataset, archetype, events=self.events, as_of=w.as_of,
                    window_days=self.window_days, dataset_ref=ref, **self.sampler,
                )
                planned.append(Window(w.archetype, w.as_of, w.races, w.days, job))
        return planned

    def plan(self) -> list[CalibrationJob]:
        """The jobs of :meth:`windows`: one per archetype per distinct data window."""
        return [w.job for w in self.windows()]

    def run(
        self,
        *,
        max_in_flight: int = 4,
        timeout: float = 3600,
        console=None,
        windows: list[Window] | None = None,
    ) -> list[Outcome]:
        """Submit every planned job, at most ``max_in_flight`` unfinished at once; wait for all.

        On the fleet, jobs are sent as batch messages of up to the client's
        ``batch_jobs`` (``settings.batch.max_jobs``) and never more than
        ``max_in_flight`` leaves room for: the cap holds whatever the batch
        size, so a batch of 32 needs ``max_in_flight`` of 32. A backfill's
        jobs share the dataset, events, sampler and model, so any of them may
        share a batch.

        Embedded, a submission runs its job here and now, so each job is
        counted (and the bar advanced) as soon as it ends, before the next
        starts. A job the store already holds a summary for is ``reused``: not
        fitted again. Once the client is interrupted (Ctrl-C:
        :meth:`~producer.client.CalibrationClient.interrupt`) nothing more is
        submitted, the jobs in flight are cancelled through the client
        (embedded, the running one has already ended ``cancelled`` at its next
        check), and every job never submitted is reported ``not run``.
        """
        windows = windows if windows is not None else self.windows()
        races = {w.job.job_id: len(w.races) for w in windows}
        jobs = [w.job for w in windows]
        outcomes: dict[str, Outcome] = {}
        pending = list(jobs)
        in_flight: dict[str, tuple[CalibrationJob, float]] = {}
        reused: set[str] = set()
        limit = 1 if self.client.embedded else max_in_flight  # embedded, a submission is the whole run
        with counting_bar(console) as bar:
            task = bar.add_task("backfill", total=len(jobs))

            def settle(job: CalibrationJob, state: str, reason: str | None) -> None:
                outcomes[job.job_id] = Outcome(job.archetype, job.as_of, job.job_id, state, reason,
                                               races[job.job_id], reused=job.job_id in reused)
                del in_flight[job.job_id]
                bar.advance(task)

            while (pending or in_flight) and not self.client.interrupted:
                while pending and len(in_flight) < limit and not self.client.interrupted:
                    # backfills never hold up interactive jobs; on the fleet, up to batch_jobs go as one message
                    room = min(self.client.batch_jobs, limit - len(in_flight))
                    group, pending = pending[:room], pending[room:]
                    admitted = (self.client.admit_batch(group, lane=BATCH) if len(group) > 1
                                else [self.client.admit(group[0], lane=BATCH)])
                    for job, (record, sent) in zip(group, admitted):
                        if not sent and record.state is JobState.SUCCEEDED:
                            reused.add(job.job_id)
                        in_flight[job.job_id] = (job, time.monotonic())
                for job_id, (job, since) in list(in_flight.items()):
                    record = self.client.registry.find(job_id)
                    if record is not None and record.state.finished:
                        settle(job, record.state.value, record.reason)
                    elif time.monotonic() - since > timeout:
                        settle(job, JobState.FAILED.value, f"no result within {timeout:.0f} s")
                if in_flight and not self.client.embedded and not self.client.interrupted:
                    time.sleep(POLL_S)
            if in_flight:
                for job, state, reason in self._cancel([job for job, _ in in_flight.values()]):
                    settle(job, state, reason)
        for job in pending:
            outcomes[job.job_id] = Outcome(job.archetype, job.as_of, job.job_id, NOT_RUN,
                                           "not submitted: the backfill was interrupted first", races[job.job_id])
        return [outcomes[j.job_id] for j in jobs]

    def _cancel(self, jobs: list[CalibrationJob]) -> list[tuple[CalibrationJob, str, str | None]]:
        """Cancel the fleet jobs this backfill has in flight; each job's state once its cancel took.

        A queued job is cancelled at once; a running one is flagged, and its
        worker stops it at its next check: it is waited for up to
        :data:`CANCEL_GRACE_S`, then reported as it stands.
        """
        for job in jobs:
            with contextlib.suppress(NotFound):  # its record expired: nothing left to cancel
                self.client.cancel(job.job_id, "backfill interrupted (Ctrl-C)")
        deadline = time.monotonic() + CANCEL_GRACE_S
        while True:
            records = {job.job_id: self.client.registry.find(job.job_id) for job in jobs}
            if all(r is None or r.state.finished for r in records.values()) or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        settled = []
        for job in jobs:
            record = records[job.job_id]
            if record is None:
                settled.append((job, JobState.CANCELLED.value, "its record expired"))
            elif record.state.finished:
                settled.append((job, record.state.value, record.reason))
            else:
                settled.append((job, record.state.value, "cancel requested: its worker stops it at its next check"))
        return settled


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, *args, **kwargs):
        pass


def counting_bar(console):
    """A progress bar counting done items on ``console``; a silent stand-in when it is None."""
    if console is None:
        return _NoBar()
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


#: The columns of a backfill's report: each job in exactly one.
COLUMNS = ("done", "reused", JobState.FAILED.value, JobState.REJECTED.value, JobState.CANCELLED.value, NOT_RUN)


def column(outcome: Outcome) -> str:
    """The report column of ``outcome``: a succeeded job is ``done``, or ``reused`` if it was not fitted again."""
    if outcome.state == JobState.SUCCEEDED.value:
        return "reused" if outcome.reused else "done"
    return outcome.state


def counts_table(outcomes: list[Outcome]) -> Table:
    """Jobs per archetype and column (done, reused, failed, rejected, cancelled, not run, then any other state)."""
    columns = [*COLUMNS, *sorted({column(o) for o in outcomes} - set(COLUMNS))]
    totals = {c: sum(column(o) == c for o in outcomes) for c in columns}
    said = ", ".join(f"{totals[c]} {c}" for c in columns if totals[c])  # the nonzero ones: the title fits 80 columns
    table = Table(title=f"backfill: {len(outcomes)} jobs" + (f" — {said}" if said else ""))
    table.add_column("archetype", no_wrap=True)
    for name in columns:
        table.add_column(name, justify="right", no_wrap=True)
    for archetype in sorted({o.archetype for o in outcomes}):
        mine = [o for o in outcomes if o.archetype == archetype]
        table.add_row(archetype, *(str(sum(column(o) == c for o in mine)) for c in columns))
    return table


def outcome_table(outcomes: list[Outcome]) -> Group:
    """The counts (:func:`counts_table`), then every job that ran and did not succeed, on a line of its own.

    Each job's line is ``<archetype> as of <date>  <state>  <job id>``, its
    id whole (it fits 80 columns), and its reason indented below it, wrapped
    at words: one line per job however narrow the terminal. Jobs never
    submitted (``not run``) are counted on one line, not listed.
    """
    lines: list[Text] = []
    for o in outcomes:
        if o.state in (JobState.SUCCEEDED.value, NOT_RUN):
            continue
        # Plain Text with control characters shown, never markup: reasons quote the data (race ids, track names).
        lines.append(Text(visible(f"{o.archetype} as of {o.as_of}  {o.state}  {o.job_id}"), no_wrap=True,
                          overflow="ignore"))
        if o.reason:
            lines.append(Text("    " + visible(o.reason[:200])))
    not_run = sum(o.state == NOT_RUN for o in outcomes)
    if not_run:
        lines.append(Text(f"{not_run} job(s) not run: the backfill was interrupted before it submitted them; "
                          "run it again to pick up where it stopped"))
    return Group(counts_table(outcomes), *lines)

"""Backfills: calibration as of every past race date, resumable.

For each archetype and each race date in the range, one job fits the data
known before that date (a rolling window of ``window_days``). Job ids come
from job content, so a rerun finds the jobs already done and skips them:
an interrupted backfill picks up where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.contract.domain import ARCHETYPES
from shared.contract.job import CalibrationJob, JobState
from shared.data.dataset import open_dataset

log = logging.getLogger(__name__)

POLL_S = 0.5


@dataclass(frozen=True)
class Outcome:
    archetype: str
    as_of: date
    job_id: str
    state: str
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "as_of": self.as_of.isoformat()}


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
        window_days: int | None = 3 * 365,
        events: str | None = None,
        sampler: dict[str, Any] | None = None,
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

    def plan(self) -> list[CalibrationJob]:
        """One job per archetype per race date in range that has earlier data to fit."""
        ds = open_dataset(self.dataset)
        dates = ds["race_date"].values.astype("datetime64[D]")
        kinds = ds["archetype"].values.astype(str)
        ref = self.client.upload(self.dataset)
        race_days = sorted({d.astype(object) for d in dates if self.start <= d.astype(object) <= self.end})
        jobs = []
        for day in race_days:
            for archetype in self.archetypes:
                earliest = day - timedelta(days=self.window_days) if self.window_days else date.min
                has_data = np.any(
                    (kinds == archetype) & (dates < np.datetime64(day)) & (dates >= np.datetime64(earliest))
                )
                if not has_data:
                    log.info("skipping %s as of %s: no earlier races in the window", archetype, day)
                    continue
                jobs.append(
                    self.client.make_job(
                        self.dataset, archetype, events=self.events, as_of=day,
                        window_days=self.window_days, dataset_ref=ref, **self.sampler,
                    )
                )
        return jobs

    def run(self, *, max_in_flight: int = 4, timeout: float = 3600, console=None) -> list[Outcome]:
        """Submit every planned job, at most ``max_in_flight`` unfinished at once; wait for all."""
        jobs = self.plan()
        outcomes: dict[str, Outcome] = {}
        pending = list(jobs)
        in_flight: dict[str, tuple[CalibrationJob, float]] = {}
        with _bar(console) as bar:
            task = bar.add_task("backfill", total=len(jobs))
            while pending or in_flight:
                while pending and len(in_flight) < max_in_flight:
                    job = pending.pop(0)
                    self.client.submit_job(job)
                    in_flight[job.job_id] = (job, time.monotonic())
                for job_id, (job, since) in list(in_flight.items()):
                    record = self.client.registry.find(job_id)
                    expired = time.monotonic() - since > timeout
                    if record is not None and (record.state.finished or expired):
                        state = record.state.value if record.state.finished else "failed"
                        reason = record.reason if record.state.finished else f"no result within {timeout:.0f} s"
                        outcomes[job_id] = Outcome(job.archetype, job.as_of, job_id, state, reason)
                        del in_flight[job_id]
                        bar.advance(task)
                if in_flight and not self.client.embedded:
                    time.sleep(POLL_S)
        return [outcomes[j.job_id] for j in jobs]


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, *args, **kwargs):
        pass


def _bar(console):
    if console is None:
        return _NoBar()
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


def outcome_table(outcomes: list[Outcome]) -> Table:
    """Jobs per archetype and final state, then every job that did not succeed, with its reason."""
    states = [JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.REJECTED.value]
    totals = {state: sum(o.state == state for o in outcomes) for state in states}
    table = Table(title=f"backfill: {len(outcomes)} jobs — " + ", ".join(f"{totals[s]} {s}" for s in states))
    table.add_column("archetype")
    for state in states:
        table.add_column(state, justify="right")
    for archetype in sorted({o.archetype for o in outcomes}):
        mine = [o for o in outcomes if o.archetype == archetype]
        table.add_row(archetype, *(str(sum(o.state == s for o in mine)) for s in states))
    failures = [o for o in outcomes if o.state != JobState.SUCCEEDED.value]
    if failures:
        table.add_section()
        for o in failures:
            table.add_row(f"{o.archetype} as of {o.as_of}", o.state, o.job_id, (o.reason or "")[:200])
    return table

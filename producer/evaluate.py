"""``calq evaluate``: does calibration help on races the fit had not seen?

A rolling-origin evaluation over the races of a date range. It plans the
jobs a :class:`~producer.backfill.Backfill` over the same range plans (one
per archetype and data window), runs those not already in the store (here,
or on the fleet), then scores every race of the range with the newest
*converged* fit of its archetype on races strictly before it:

- each (race, driver, event) row gets the raw forecast p, the outcome y, and
  the calibrated probability q — the posterior mean of
  ``expit(α + β·logit(p))`` over the fit's draws for the race's track (a
  track the fit has not seen borrows its archetype), with its 94 % band,
  both as ``calq apply`` gives them (:func:`shared.fit.apply.parameter_draws`
  and :func:`~shared.fit.apply.calibrate_with_draws`);
- a race with no such fit (no earlier race of its archetype in the window,
  or no earlier fit that converged) is counted and reported, never scored.

Scores per archetype × event, with the improvement's interval from a
bootstrap over races, come from :mod:`shared.stats.oos`. The JSON record of
an archetype × event holds ``archetype``, ``event``, ``races``, ``rows``,
``raw`` and ``calibrated`` (``brier``, ``log_loss``, ``ece``,
``reliability``), ``log_loss_improvement`` and ``brier_improvement``
(``mean``, ``low``, ``high``: raw minus calibrated per row), ``tracks`` (the
same per track), and beside them ``unscored_races``, ``unscored`` (race,
date, reason), ``band`` (mean width of the calibrated band) and ``per_race``
(each scored race's rows and score sums, and the fit that scored it).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from producer.backfill import Backfill, Outcome, RaceCalendar, Window, counting_bar
from producer.render import fitted_tables
from producer.sanitize import for_markup
from shared.contract.domain import ARCHETYPES, DEFAULT_EVENTS
from shared.contract.errors import CalqError
from shared.contract.job import JobState
from shared.contract.summary import CalibrationSummary
from shared.data.dataset import event_rows, open_dataset
from shared.fit import apply
from shared.stats import oos

log = logging.getLogger(__name__)

#: Credible level of the calibrated band reported beside the posterior mean: calq apply's.
BAND = apply.BAND


class FleetUnavailable(CalqError):
    """``--fleet`` was asked for, but no broker is configured."""


@dataclass(frozen=True)
class Fit:
    """A planned job, how it ended, and its summary when it succeeded."""

    window: Window
    outcome: Outcome
    summary: CalibrationSummary | None

    @property
    def converged(self) -> bool:
        return self.summary is not None and self.summary.converged


@dataclass(frozen=True)
class Unscored:
    archetype: str
    race: str
    date: date
    track: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"race": self.race, "date": self.date.isoformat(), "track": self.track, "reason": self.reason}


@dataclass
class EvaluationResult:
    records: list[dict[str, Any]]
    outcomes: list[Outcome]
    unscored: list[Unscored]

    def to_json(self) -> list[dict[str, Any]]:
        """The records, with NaN (a score over nothing) as null so the output is valid JSON."""
        return _no_nan(self.records)


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


class Evaluation:
    """The rolling-origin evaluation of one dataset over a date range (see the module docstring)."""

    def __init__(self, client, dataset: Path, *, n_boot: int = oos.N_BOOT, seed: int = 0, **plan: Any) -> None:
        """``plan``: the keyword options of the :class:`~producer.backfill.Backfill` whose jobs it scores
        (``start``, ``end``, ``archetypes``, ``events``, ``window_days``, ``sampler``)."""
        self.client = client
        self.dataset = Path(dataset)
        self.backfill = Backfill(client, self.dataset, **plan)
        self.n_boot, self.seed = n_boot, seed
        self._idata: dict[str, Any] = {}

    def run(self, *, max_in_flight: int = 4, timeout: float = 3600, console=None) -> EvaluationResult:
        """Run (or find) the backfill's jobs, then score every race in range."""
        ds = open_dataset(self.dataset)
        calendar = RaceCalendar.of(ds)
        windows = self.backfill.windows(calendar)
        outcomes = self.backfill.run(windows=windows, max_in_flight=max_in_flight, timeout=timeout, console=console)
        fits = [Fit(w, o, self._summary(o)) for w, o in zip(windows, outcomes)]
        events = windows[0].job.events if windows else self._default_events()
        records, unscored = [], []
        with counting_bar(console) as bar:
            todo = [a for a in self.backfill.archetypes if a in set(calendar.archetypes)]
            races = {a: self._races(calendar, a) for a in todo}
            task = bar.add_task("scoring", total=sum(len(r) for r in races.values()))
            for archetype in todo:
                mine = [f for f in fits if f.window.archetype == archetype]
                scored, missing = assign_fits(calendar, archetype, races[archetype], mine)
                unscored += missing
                rows = self._score(ds, archetype, events, scored, on_race=lambda: bar.advance(task))
                bar.advance(task, len(missing))
                for event in events:
                    records.append(self._record(archetype, event, rows.get(event), missing))
        return EvaluationResult(records, outcomes, unscored)

    # -- which fit scores which race -----------------------------------------------

    def _summary(self, outcome: Outcome) -> CalibrationSummary | None:
        if outcome.state != JobState.SUCCEEDED.value:
            return None
        return self.client.result(outcome.job_id)

    def _default_events(self) -> tuple[str, ...]:
        if self.backfill.events:
            return tuple(e.strip() for e in self.backfill.events.split(",") if e.strip())
        return DEFAULT_EVENTS

    def _races(self, calendar: RaceCalendar, archetype: str) -> list[int]:
        """Indices of ``archetype``'s races in range, by date."""
        b = self.backfill
        keep = (
            (calendar.archetypes == archetype)
            & (calendar.days >= np.datetime64(b.start))
            & (calendar.days <= np.datetime64(b.end))
        )
        index = np.flatnonzero(keep)
        return index[np.argsort(calendar.days[index], kind="stable")].tolist()

    # -- scoring -------------------------------------------------------------------

    def _posterior(self, summary: CalibrationSummary):
        if summary.job_id not in self._idata:
            self._idata[summary.job_id] = self.client.catalog.posterior(summary)
        return self._idata[summary.job_id]

    def _score(self, ds, archetype: str, events: Sequence[str], scored: dict[int, Fit], *, on_race) -> dict[str, dict]:
        """Rows of the scored races, per event: race, date, track, fit, p, q (mean, low, high), y."""
        from shared.fit.apply import calibrate_with_draws, parameter_draws

        if not scored:
            return {}
        index = sorted(scored)
        rows = event_rows(ds.isel(race=index), events=events, archetypes=[archetype])
        out: dict[str, dict[str, list]] = {e: defaultdict(list) for e in events}
        draws_cache: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}
        race_dates = ds["race_date"].values.astype("datetime64[D]")
        for r, i in enumerate(index):
            fit = scored[i].summary
            idata = self._posterior(fit)
            for e, event in enumerate(events):
                sel = (rows.race == r) & (rows.event == e)
                if not sel.any():
                    continue
                track = rows.tracks[rows.track[sel][0]]
                key = (fit.job_id, event, track)
                if key not in draws_cache:
                    alpha, beta, _ = parameter_draws(idata, event=event, track=track, archetype=archetype)
                    draws_cache[key] = (alpha, beta)
                alpha, beta = draws_cache[key]
                p = rows.p[sel]
                q, low, high = calibrate_with_draws(alpha, beta, p, band=BAND)
                block = out[event]
                n = int(sel.sum())
                block["race"] += [rows.races[r]] * n
                block["date"] += [race_dates[i].astype(object)] * n
                block["track"] += [track] * n
                block["job"] += [fit.job_id] * n
                block["p"].append(p)
                block["q"].append(q)
                block["low"].append(low)
                block["high"].append(high)
                block["y"].append(rows.y[sel].astype(np.float64))
            on_race()
        return {
            event: {k: (np.concatenate(v) if k in ("p", "q", "low", "high", "y") else np.asarray(v, dtype=object))
                    for k, v in block.items()}
            for event, block in out.items() if block
        }

    def _record(self, archetype: str, event: str, rows: dict | None, missing: list[Unscored]) -> dict[str, Any]:
        """The JSON record of one archetype × event (format: the module docstring)."""
        unscored = {"unscored_races": len(missing), "unscored": [m.to_dict() for m in missing]}
        if rows is None:
            empty = oos.compare([], [], [], [], n_boot=1)
            return {"archetype": archetype, "event": event, **empty, "tracks": {}, **unscored,
                    "band": {"level": BAND, "mean_width": None}, "per_race": []}
        race = rows["race"].astype(str)
        record = {
            "archetype": archetype,
            "event": event,
            **oos.compare(rows["p"], rows["q"], rows["y"], race, n_boot=self.n_boot, seed=self.seed),
        }
        tracks = {}
        for track in sorted(set(rows["track"])):
            sel = rows["track"] == track
            tracks[str(track)] = oos.compare(
                rows["p"][sel], rows["q"][sel], rows["y"][sel], race[sel], n_boot=self.n_boot, seed=self.seed
            )
        record["tracks"] = tracks
        record.update(unscored)
        record["band"] = {"level": BAND, "mean_width": float(np.mean(rows["high"] - rows["low"]))}
        record["per_race"] = _per_race(rows)
        return record


def assign_fits(
    calendar: RaceCalendar, archetype: str, races: list[int], fits: list[Fit]
) -> tuple[dict[int, Fit], list[Unscored]]:
    """Each race → the newest converged fit on races strictly before it; the rest, with reasons."""
    scored: dict[int, Fit] = {}
    missing = []
    for i in races:
        day = calendar.days[i].astype(object)
        # Newest = the latest window on or before the race day (then the latest race seen). Not the
        # ``latest`` pointer's created_at tie-break: a backfill creates its fits in any order, and when a
        # race has left the window two fits can share their latest race.
        best = max((f for f in fits if f.window.as_of <= day and f.converged),
                   key=lambda f: (f.window.as_of, f.summary.data_through), default=None)
        if best is not None:
            scored[i] = best
            continue
        current = next((f for f in fits if day in f.window.days), None)
        if current is None:
            reason = "no earlier race of its archetype in the window"
        elif current.summary is None:
            reason = f"its fit {current.outcome.job_id} {current.outcome.state}: {current.outcome.reason or ''}".strip(": ")
        else:
            reason = f"its fit {current.outcome.job_id} did not converge, nor did an earlier one"
        missing.append(Unscored(archetype, str(calendar.race_ids[i]), day, str(calendar.tracks[i]), reason))
    return scored, missing


def _per_race(rows: dict) -> list[dict[str, Any]]:
    """Each scored race, in date order: rows, raw and calibrated score sums, and its fit."""
    sums = oos.per_race_sums(rows["p"], rows["q"], rows["y"], rows["race"].astype(str))
    first = {r: i for i, r in reversed(list(enumerate(rows["race"].astype(str))))}
    out = []
    for k, race in enumerate(sums["race"]):
        i = first[str(race)]
        out.append({
            "race": str(race),
            "date": rows["date"][i].isoformat(),
            "track": str(rows["track"][i]),
            "job_id": str(rows["job"][i]),
            "rows": int(sums["rows"][k]),
            **{name: float(sums[name][k]) for name in ("raw_log_loss", "cal_log_loss", "raw_brier", "cal_brier")},
        })
    return sorted(out, key=lambda r: (r["date"], r["race"]))


# -- the command -------------------------------------------------------------------


def evaluate_tables(records: list[dict[str, Any]], *, width: int | None = None) -> list[Table]:
    """Per archetype × event: races and rows scored, raw → calibrated scores, improvements with 90 % intervals.

    One table where it fits ``width`` terminal columns, else split with the
    archetype and event leading each part (:func:`producer.render.fitted_tables`).
    """
    rows = []
    for r in records:
        if not r["rows"]:
            rows.append([for_markup(r["archetype"]), for_markup(r["event"]), "0", "0", str(r["unscored_races"]),
                         *["-"] * 5])
            continue
        raw, cal = r["raw"], r["calibrated"]
        rows.append([
            for_markup(r["archetype"]), for_markup(r["event"]), str(r["races"]), str(r["rows"]), str(r["unscored_races"]),
            f"{raw['log_loss']:.4f} → {cal['log_loss']:.4f}", _improvement(r["log_loss_improvement"]),
            f"{raw['brier']:.4f} → {cal['brier']:.4f}", _improvement(r["brier_improvement"]),
            f"{raw['ece']:.3f} → {cal['ece']:.3f}",
        ])
    return fitted_tables(
        "out-of-sample: raw → calibrated (improvement = raw − calibrated, 90 % interval over races)",
        ["archetype", "event"],
        ["races", "rows", "unscored", "log loss", "Δ log loss", "Brier", "Δ Brier", "ECE"],
        rows,
        width=width,
    )


def evaluate_table(records: list[dict[str, Any]]) -> Table:
    """:func:`evaluate_tables` as one table, however wide (for a console of known width)."""
    return evaluate_tables(records)[0]


def _improvement(i: dict[str, float]) -> str:
    colour = "green" if i["low"] > 0 else "red" if i["high"] < 0 else "default"
    return f"[{colour}]{i['mean']:+.4f}[/{colour}] [{i['low']:+.4f}, {i['high']:+.4f}]"


def evaluate_command(
    client,
    dataset: Path,
    *,
    start: date,
    end: date,
    archetypes: str | None,
    events: str | None,
    window_days: int | None,
    fleet: bool,
    sampler: dict[str, Any],
    max_in_flight: int,
    timeout: float,
    console,
) -> EvaluationResult:
    """What ``calq evaluate`` does, minus printing: check the mode, run the evaluation."""
    if fleet and client.embedded:
        raise FleetUnavailable("--fleet needs a broker: set CALQ_BROKER_URL (e.g. redis://localhost:6379/0)")
    wanted = [a.strip() for a in archetypes.split(",") if a.strip()] if archetypes else None
    unknown = [a for a in wanted or [] if a not in ARCHETYPES]
    if unknown:
        raise ValueError(f"unknown archetype(s) {', '.join(unknown)}; expected {', '.join(ARCHETYPES)}")
    evaluation = Evaluation(
        client, dataset, start=start, end=end, archetypes=wanted, events=events,
        window_days=window_days, sampler=sampler,
    )
    return evaluation.run(max_in_flight=max_in_flight, timeout=timeout, console=console)


def write_page(result: EvaluationResult, path: Path) -> Path:
    """The evaluation page (:mod:`producer.report.evaluation`) as one self-contained HTML file."""
    from producer.report.evaluation import evaluation_page

    n_jobs = len(result.outcomes)
    done = sum(o.state == JobState.SUCCEEDED.value for o in result.outcomes)
    return evaluation_page(result.to_json(), subtitle=f"{done} of {n_jobs} fits succeeded").write_html(path)

"""A realistic synthetic calibration dataset whose miscalibration is known.

:func:`synthesize` simulates Cup seasons on the real tracks of
:data:`~shared.contract.domain.TRACKS`:

* a driver pool (ids ``d01``..) with a latent skill that drifts from race to
  race (a random walk) plus a driver × archetype specialism; the strongest
  drivers run full-time, part-timers fill the remaining seats now and then;
* each race's true strengths are ``true_scale[archetype] × (skill + specialism)``
  (superspeedway pack racing is close to a lottery, so its scale is small);
  the outcome is Plackett–Luce on them, drawn with the Gumbel-max trick:
  positions are the ranks, descending, of strength + Gumbel noise;
* a forecaster simulates ``scenarios`` Plackett–Luce scenarios per race on
  its *believed* strengths::

      believed = temperature[archetype, track] × (true + estimation noise)
                 + part_timer_bias[archetype] × is_part_timer

  A temperature above 1 makes favourites too likely (over-confident), below
  1 too unlikely. It is deliberately wrong differently per archetype (see
  :data:`TEMPERATURE`) and each track deviates from its archetype by a
  lognormal factor. (A shift common to every driver would be a no-op under
  Plackett–Luce, so the forecaster's bias falls on part-time entries.)
* DraftKings-like fantasy points for the outcome and for every scenario.

The truth is written into ``attrs["calq_truth"]`` (JSON; read it with
:func:`truth`): per archetype, per track and per event, the pseudo-true
calibration (α, β) — the logistic fit of the true event probability on
logit(p_forecast), see :func:`fit_logistic`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
import xarray as xr
from scipy.special import expit, logit

from shared.contract.domain import ARCHETYPES, TRACKS, event_threshold
from shared.data.dataset import forecast_probability

log = logging.getLogger(__name__)

GENERATOR = "calq.synth"
GENERATOR_VERSION = 1
TRUTH_ATTR = "calq_truth"
#: The events whose pseudo-true calibration is recorded.
TRUTH_EVENTS: tuple[str, ...] = ("top_1", "top_3", "top_5", "top_10", "top_15", "top_20")
#: The true event probabilities are simulated with at least this many scenarios per race.
MIN_TRUTH_SCENARIOS = 2000

#: Forecaster temperature per archetype: > 1 over-confident, < 1 under-confident.
TEMPERATURE: dict[str, float] = {
    "superspeedway": 1.8,
    "intermediate": 1.0,
    "short_track": 0.75,
    "road_course": 1.3,
}
#: Log-sd of a track's temperature factor around its archetype's.
TRACK_TEMPERATURE_SD = 0.1
#: How much skill decides a race, per archetype (pack racing: little).
TRUE_SCALE: dict[str, float] = {
    "superspeedway": 0.35,
    "intermediate": 1.0,
    "short_track": 0.9,
    "road_course": 1.1,
}
#: The forecaster's shift of part-time drivers' strengths, per archetype.
PART_TIMER_BIAS: dict[str, float] = {
    "superspeedway": 0.0,
    "intermediate": -0.2,
    "short_track": 0.1,
    "road_course": 0.4,
}
ESTIMATION_NOISE_SD = 0.2
SKILL_DRIFT_SD = 0.05
SPECIALISM_SD = 0.4
QUALIFYING_NOISE_SD = 1.0
#: Race distance in laps, per archetype (for dominator points).
LAPS: dict[str, int] = {"superspeedway": 190, "intermediate": 267, "short_track": 400, "road_course": 95}
#: Share of laps that count as fastest laps; how steeply laps led favour the leaders.
FAST_LAP_SHARE = 0.8
DOMINANCE = 0.45
DOMINATOR_NOISE_SD = 0.7

#: One season's schedule, in order (36 races: 6 superspeedway, 15 intermediate,
#: 9 short track, 6 road course).
SCHEDULE: tuple[str, ...] = (
    "Daytona", "Atlanta", "Las Vegas", "Phoenix", "Bristol", "COTA", "Richmond",
    "Martinsville", "Texas", "Talladega", "Dover", "Kansas", "Darlington",
    "Charlotte", "Nashville", "Michigan", "Sonoma", "Iowa", "Pocono",
    "Chicago Street", "New Hampshire", "Indianapolis Road Course", "Kentucky",
    "Michigan", "Daytona", "Darlington", "Watkins Glen", "Texas", "Atlanta",
    "Kansas", "Talladega", "Charlotte Roval", "Las Vegas", "Homestead",
    "Martinsville", "Phoenix",
)
#: Tracks swapped in every other season: schedules change, new venues appear.
ALTERNATE_SEASON_SWAPS: dict[str, str] = {
    "Indianapolis Road Course": "Mexico City",
    "Iowa": "North Wilkesboro",
}
#: Off weekends follow these races (0-based index in the season).
OFF_WEEKS_AFTER: tuple[int, ...] = (11, 22)

_ARCHETYPE_OF: dict[str, str] = {t: a for a, tracks in TRACKS.items() for t in tracks}
_TRUTH_THRESHOLDS = np.array([event_threshold(e) for e in TRUTH_EVENTS])


@dataclass(frozen=True)
class _Race:
    id: str
    date: date
    track: str
    archetype: str


@dataclass(frozen=True)
class _Pool:
    ids: tuple[str, ...]
    skill: np.ndarray  # [driver] initial latent skill
    specialism: np.ndarray  # [driver, archetype]
    full_time: np.ndarray  # [driver] bool
    propensity: np.ndarray  # [driver] chance weight of a part-timer taking a seat


@dataclass(frozen=True)
class _RaceDraw:
    """One race, over its entered drivers: outcome, forecast and truth."""

    finish: np.ndarray  # [driver] positions
    points: np.ndarray  # [driver]
    sims: np.ndarray  # [scenario, driver] positions
    sim_points: np.ndarray  # [scenario, driver]
    x: np.ndarray  # [event, driver] logit of the forecast probability
    q: np.ndarray  # [event, driver] true probability


def synthesize(
    *,
    seasons: int = 1,
    scenarios: int = 1000,
    seed: int = 0,
    first_season: int = 2024,
    drivers_per_race: int = 38,
    pool_size: int = 46,
    schedule: Sequence[str] | None = None,
    temperature: dict[str, float] | None = None,
    track_factor: dict[str, float] | None = None,
    true_scale: dict[str, float] | None = None,
) -> xr.Dataset:
    """A valid calibration dataset with known miscalibration; deterministic for ``seed``.

    ``seasons`` seasons of 36 races from ``first_season``, ``scenarios``
    simulated scenarios per race, ``drivers_per_race`` entries drawn from a
    pool of ``pool_size`` drivers. Simulations are float32 and generated race
    by race. The truth is in ``attrs["calq_truth"]`` (see :func:`truth`).

    Harder regimes (:mod:`shared.data.regimes`) change the world: ``schedule``
    replaces one season's tracks (known tracks, in order; no alternate-season
    swaps), ``temperature`` overrides archetypes' forecaster temperatures,
    ``track_factor`` replaces named tracks' random temperature factors, and
    ``true_scale`` overrides how much skill decides a race per archetype.
    """
    _check_arguments(seasons, scenarios, drivers_per_race, pool_size)
    world = _World.of(temperature=temperature, true_scale=true_scale)
    rng = np.random.default_rng(seed)
    races = _schedule(seasons, first_season, schedule)
    temperatures = _track_temperatures(rng, world.temperature)
    for track, factor in (track_factor or {}).items():
        temperatures[track] = world.temperature[_ARCHETYPE_OF[track]] * factor
    pool = _driver_pool(rng, pool_size=pool_size, drivers_per_race=drivers_per_race)
    truth_scenarios = max(scenarios, MIN_TRUTH_SCENARIOS)

    n_races = len(races)
    sim_position = np.full((n_races, scenarios, pool_size), np.nan, dtype=np.float32)
    sim_points = np.full_like(sim_position, np.nan)
    finish = np.full((n_races, pool_size), np.nan)
    points = np.full_like(finish, np.nan)
    draws: list[tuple[_Race, _RaceDraw]] = []
    skill = pool.skill.copy()
    for i, race in enumerate(races):
        skill += rng.normal(0.0, SKILL_DRIFT_SD, pool_size)
        entered = _entries(rng, pool, drivers_per_race)
        draw = _simulate_race(
            rng,
            race,
            form=skill[entered] + pool.specialism[entered, ARCHETYPES.index(race.archetype)],
            part_time=~pool.full_time[entered],
            temperature=temperatures[race.track],
            scenarios=scenarios,
            truth_scenarios=truth_scenarios,
            true_scale=world.true_scale[race.archetype],
        )
        finish[i, entered] = draw.finish
        points[i, entered] = draw.points
        sim_position[i][:, entered] = draw.sims
        sim_points[i][:, entered] = draw.sim_points
        draws.append((race, draw))

    settings = {
        "seed": seed,
        "seasons": seasons,
        "first_season": first_season,
        "scenarios": scenarios,
        "truth_scenarios": truth_scenarios,
        "drivers_per_race": drivers_per_race,
        "pool_size": pool_size,
    }
    attrs = _truth_attrs(draws, temperatures=temperatures, settings=settings, world=world)
    ds = _assemble(races, pool, sim_position, sim_points, finish, points, attrs)
    log.debug("synthesized %d races × %d scenarios × %d drivers", n_races, scenarios, pool_size)
    return ds


def _simulate_race(
    rng: np.random.Generator,
    race: _Race,
    *,
    form: np.ndarray,
    part_time: np.ndarray,
    temperature: float,
    scenarios: int,
    truth_scenarios: int,
    true_scale: float,
) -> _RaceDraw:
    """Qualify, race, forecast and measure the truth for one race's entries.

    ``form`` is each entry's skill plus archetype specialism; the true
    strength is ``TRUE_SCALE[archetype] × form``, the forecaster's belief
    ``temperature × (true + noise) + PART_TIMER_BIAS[archetype] × part_time``.
    The grid is qualifying on ``form`` with Gumbel noise of scale
    ``QUALIFYING_NOISE_SD``; the same grid serves the outcome and every scenario.
    ``true_scale`` is the archetype's (``TRUE_SCALE`` unless a regime overrides it).
    """
    true = true_scale * form
    noisy = true + rng.normal(0.0, ESTIMATION_NOISE_SD, form.size)
    believed = temperature * noisy + PART_TIMER_BIAS[race.archetype] * part_time
    grid = plackett_luce(rng, form, scenarios=None, scale=QUALIFYING_NOISE_SD)
    finish = plackett_luce(rng, true, scenarios=None)
    sims = plackett_luce(rng, believed, scenarios=scenarios)
    laps = LAPS[race.archetype]
    thresholds = _TRUTH_THRESHOLDS
    return _RaceDraw(
        finish=finish,
        points=fantasy_points(rng, finish, grid, laps=laps),
        sims=sims,
        sim_points=fantasy_points(rng, sims, grid, laps=laps),
        x=np.stack([logit(forecast_probability(sims, t)) for t in thresholds]),
        q=_top_probabilities(plackett_luce(rng, true, scenarios=truth_scenarios), thresholds),
    )


def truth(ds: xr.Dataset) -> dict[str, Any]:
    """The truth :func:`synthesize` recorded in ``ds.attrs["calq_truth"]``.

    Layout::

        {"generator", "version", "seed", "seasons", "first_season", "scenarios",
         "truth_scenarios", "drivers_per_race", "pool_size", "events",
         "temperature": {"archetype": {a: T}, "track": {a: {track: T}}},
         "true_scale": {a: s}, "part_timer_bias": {a: b}, "estimation_noise_sd",
         "archetypes": {a: {event: {"alpha", "beta", "n"}}},
         "tracks": {a: {track: {event: {"alpha", "beta", "n"}}}}}

    ``alpha`` and ``beta`` are None for an event certain for every driver
    (a field no larger than its threshold). Raises ValueError for a dataset
    that holds no truth.
    """
    raw = ds.attrs.get(TRUTH_ATTR)
    if raw is None:
        raise ValueError(f"the dataset has no {TRUTH_ATTR} attribute: it was not made by synthesize")
    return json.loads(raw)


# ------------------------------------------------------------------ the model


def plackett_luce(
    rng: np.random.Generator, strength: np.ndarray, *, scenarios: int | None, scale: float = 1.0
) -> np.ndarray:
    """Finishing positions drawn from Plackett–Luce with log-worths ``strength``.

    Gumbel-max trick: positions are the descending ranks of
    ``strength + scale × Gumbel``, so P(i wins) ∝ exp(strength_i / scale).
    Returns int16 positions 1..n, shape [n] (``scenarios=None``) or [scenarios, n].
    """
    shape = strength.shape if scenarios is None else (scenarios, strength.size)
    return descending_ranks(strength + scale * rng.gumbel(size=shape))


def descending_ranks(keys: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, 1 for the largest key (int16)."""
    order = np.argsort(-keys, axis=-1)
    ranks = np.empty(keys.shape, dtype=np.int16)
    np.put_along_axis(ranks, order, np.arange(1, keys.shape[-1] + 1, dtype=np.int16), axis=-1)
    return ranks


def fantasy_points(rng: np.random.Generator, finish: np.ndarray, start: np.ndarray, *, laps: int) -> np.ndarray:
    """DraftKings-like points for finishing positions [..., driver] from grid ``start`` [driver].

    points = finish points (45 for 1st, 42 for 2nd, 41 for 3rd, … down by 1,
    at least 4) + place differential (start − finish) + 0.25 × laps led +
    0.45 × fastest laps, where laps led and fastest laps are shared out
    mostly to the front-runners: share ∝ exp(−DOMINANCE·(finish − 1) + noise).
    Returns float32.
    """
    finish_points = np.where(finish == 1, 45, np.maximum(44 - finish.astype(np.int32), 4))
    led = np.round(laps * _dominator_share(rng, finish))
    fastest = np.round(laps * FAST_LAP_SHARE * _dominator_share(rng, finish))
    total = finish_points + (start.astype(np.int32) - finish) + 0.25 * led + 0.45 * fastest
    return total.astype(np.float32)


def _dominator_share(rng: np.random.Generator, finish: np.ndarray) -> np.ndarray:
    """Shares (summing to 1 along the driver axis) favouring the top finishers."""
    logits = -DOMINANCE * (finish - 1.0) + rng.normal(0.0, DOMINATOR_NOISE_SD, finish.shape)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def _top_probabilities(positions: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """[event, driver] share of scenarios [scenario, driver] finishing ≤ each threshold."""
    return (positions[None, :, :] <= thresholds[:, None, None]).mean(axis=1)


# ---------------------------------------------------------------- the truth fit


def fit_logistic(
    x: np.ndarray,
    q: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[float, float]:
    """The (α, β) maximising the expected log-likelihood of expit(α + β·x).

    Maximises ``Σ w [q log μ + (1 − q) log(1 − μ)]`` with ``μ = expit(α + β x)``
    and targets ``q ∈ [0, 1]`` (probabilities, not only 0/1 outcomes), by
    Newton–Raphson (IRLS): gradient ``Xᵀ w (q − μ)``, Hessian
    ``−Xᵀ diag(w μ (1 − μ)) X`` with ``X = [1, x]``, from (0, 1), halving a step
    that would lower the objective. Stops when a step moves both parameters
    less than ``tol``.
    """
    x, q = np.asarray(x, dtype=np.float64), np.asarray(q, dtype=np.float64)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], axis=1)
    theta = np.array([0.0, 1.0])
    objective = _expected_loglik(theta, design, q, w)
    for _ in range(max_iter):
        mu = expit(design @ theta)
        gradient = design.T @ (w * (q - mu))
        hessian = (design * (w * mu * (1 - mu))[:, None]).T @ design + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        theta, objective = _damped(theta, step, objective, design, q, w)
        if np.max(np.abs(step)) < tol:
            break
    return float(theta[0]), float(theta[1])


def _damped(
    theta: np.ndarray, step: np.ndarray, objective: float, design: np.ndarray, q: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, float]:
    """Take the Newton step, halving it until the objective does not fall."""
    for _ in range(30):
        candidate = theta + step
        value = _expected_loglik(candidate, design, q, w)
        if value >= objective - 1e-12 * abs(objective):
            return candidate, value
        step = step / 2
    return theta, objective


def _expected_loglik(theta: np.ndarray, design: np.ndarray, q: np.ndarray, w: np.ndarray) -> float:
    eta = design @ theta
    # log expit(η) = −log(1 + e^−η); log(1 − expit(η)) = −log(1 + e^η)
    return float(np.sum(w * (-q * np.logaddexp(0.0, -eta) - (1 - q) * np.logaddexp(0.0, eta))))


@dataclass(frozen=True)
class _World:
    """The generator's per-archetype constants, with a regime's overrides."""

    temperature: dict[str, float]
    true_scale: dict[str, float]

    @classmethod
    def of(cls, *, temperature: dict[str, float] | None, true_scale: dict[str, float] | None) -> _World:
        for name, given in (("temperature", temperature), ("true_scale", true_scale)):
            unknown = set(given or {}) - set(ARCHETYPES)
            if unknown:
                raise ValueError(f"{name} names unknown archetype(s): {', '.join(sorted(unknown))}")
        return cls({**TEMPERATURE, **(temperature or {})}, {**TRUE_SCALE, **(true_scale or {})})


def _truth_attrs(
    draws: Sequence[tuple[_Race, _RaceDraw]], *, temperatures: dict[str, float], settings: dict[str, Any], world: _World
) -> dict[str, Any]:
    """The truth record: settings, the generator's parameters and the pseudo-true fits."""
    race_archetype = np.array([race.archetype for race, _ in draws])
    race_track = np.array([race.track for race, _ in draws])
    n_drivers = np.array([draw.x.shape[1] for _, draw in draws])
    x = np.concatenate([draw.x for _, draw in draws], axis=1)
    q = np.concatenate([draw.q for _, draw in draws], axis=1)
    row_archetype = np.repeat(race_archetype, n_drivers)
    row_track = np.repeat(race_track, n_drivers)
    by_archetype: dict[str, Any] = {}
    by_track: dict[str, Any] = {}
    track_temperature: dict[str, Any] = {}
    for a in ARCHETYPES:
        in_archetype = row_archetype == a
        if not in_archetype.any():
            continue
        by_archetype[a] = _event_fits(x[:, in_archetype], q[:, in_archetype])
        tracks = sorted(set(race_track[race_archetype == a].tolist()))
        by_track[a] = {t: _event_fits(x[:, row_track == t], q[:, row_track == t]) for t in tracks}
        track_temperature[a] = {t: temperatures[t] for t in tracks}
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        **settings,
        "events": list(TRUTH_EVENTS),
        "temperature": {"archetype": dict(world.temperature), "track": track_temperature},
        "true_scale": dict(world.true_scale),
        "part_timer_bias": dict(PART_TIMER_BIAS),
        "estimation_noise_sd": ESTIMATION_NOISE_SD,
        "archetypes": by_archetype,
        "tracks": by_track,
    }


def _event_fits(x: np.ndarray, q: np.ndarray) -> dict[str, dict[str, Any]]:
    """{event: {alpha, beta, n}} fitted on [event, row] logits and true probabilities.

    An event that is certain (or impossible) for every row, e.g. top_20 in a
    field of 20, has no finite fit: its alpha and beta are None.
    """
    fits: dict[str, dict[str, Any]] = {}
    for e, event in enumerate(TRUTH_EVENTS):
        degenerate = bool((q[e] == 1).all() or (q[e] == 0).all())
        alpha, beta = (None, None) if degenerate else fit_logistic(x[e], q[e])
        fits[event] = {"alpha": alpha, "beta": beta, "n": int(x.shape[1])}
    return fits


# ----------------------------------------------------------- schedule and pool


def _check_arguments(seasons: int, scenarios: int, drivers_per_race: int, pool_size: int) -> None:
    if seasons < 1:
        raise ValueError(f"seasons must be at least 1, got {seasons}")
    if scenarios < 1:
        raise ValueError(f"scenarios must be at least 1, got {scenarios}")
    if not 2 <= drivers_per_race <= pool_size:
        raise ValueError(f"need 2 <= drivers_per_race <= pool_size, got {drivers_per_race} and {pool_size}")


def _schedule(seasons: int, first_season: int, schedule: Sequence[str] | None = None) -> list[_Race]:
    if schedule is not None:
        unknown = sorted(set(schedule) - set(_ARCHETYPE_OF))
        if unknown or not schedule:
            raise ValueError(f"a schedule needs known tracks, got {', '.join(unknown) or 'none'}")
    races = []
    for s in range(seasons):
        year = first_season + s
        swaps = ALTERNATE_SEASON_SWAPS if s % 2 and schedule is None else {}
        tracks = [swaps.get(t, t) for t in (SCHEDULE if schedule is None else schedule)]
        for i, (track, day) in enumerate(zip(tracks, _race_dates(year, len(tracks)))):
            race_id = f"{year}-{i + 1:02d}-{_slug(track)}"
            races.append(_Race(race_id, day, track, _ARCHETYPE_OF[track]))
    return races


def _race_dates(year: int, n_races: int) -> list[date]:
    """Weekly Sundays from the third Sunday of February, skipping the off weekends."""
    first_of_feb = date(year, 2, 1)
    day = first_of_feb + timedelta(days=(6 - first_of_feb.weekday()) % 7 + 14)
    dates = []
    for i in range(n_races):
        dates.append(day)
        day += timedelta(weeks=2 if i in OFF_WEEKS_AFTER else 1)
    return dates


def _slug(track: str) -> str:
    return track.lower().replace(" ", "-")


def _track_temperatures(rng: np.random.Generator, temperature: dict[str, float]) -> dict[str, float]:
    """Each known track's temperature: its archetype's times a lognormal factor."""
    return {
        track: temperature[a] * float(np.exp(rng.normal(0.0, TRACK_TEMPERATURE_SD)))
        for a in ARCHETYPES
        for track in TRACKS[a]
    }


def _driver_pool(rng: np.random.Generator, *, pool_size: int, drivers_per_race: int) -> _Pool:
    """Drivers ``d01``..: the strongest run every race, part-timers share the other seats."""
    width = max(2, len(str(pool_size)))
    skill = rng.normal(0.0, 1.0, pool_size)
    specialism = rng.normal(0.0, SPECIALISM_SD, (pool_size, len(ARCHETYPES)))
    open_seats = min(pool_size - drivers_per_race, max(1, drivers_per_race // 8))
    full_time = np.zeros(pool_size, dtype=bool)
    full_time[np.argsort(-skill)[: drivers_per_race - open_seats]] = True
    propensity = np.where(full_time, 0.0, rng.uniform(0.2, 1.0, pool_size))
    ids = tuple(f"d{i + 1:0{width}d}" for i in range(pool_size))
    return _Pool(ids, skill, specialism, full_time, propensity)


def _entries(rng: np.random.Generator, pool: _Pool, drivers_per_race: int) -> np.ndarray:
    """Sorted pool indices of one race's entries: every full-timer plus drawn part-timers."""
    full = np.flatnonzero(pool.full_time)
    seats = drivers_per_race - full.size
    if seats == 0:
        return full
    part = np.flatnonzero(~pool.full_time)
    chosen = rng.choice(part, size=seats, replace=False, p=pool.propensity[part] / pool.propensity[part].sum())
    return np.sort(np.concatenate([full, chosen]))


def _assemble(
    races: Sequence[_Race],
    pool: _Pool,
    sim_position: np.ndarray,
    sim_points: np.ndarray,
    finish: np.ndarray,
    points: np.ndarray,
    truth_attrs: dict[str, Any],
) -> xr.Dataset:
    race_dims, sim_dims = ("race", "driver"), ("race", "scenario", "driver")
    return xr.Dataset(
        {
            "sim_position": (sim_dims, sim_position, {"long_name": "simulated finishing position"}),
            "sim_points": (sim_dims, sim_points, {"long_name": "simulated fantasy points"}),
            "finish_position": (race_dims, finish, {"long_name": "finishing position"}),
            "points": (race_dims, points, {"long_name": "fantasy points scored"}),
        },
        coords={
            "race": np.array([r.id for r in races]),
            "scenario": np.arange(sim_position.shape[1]),
            "driver": np.array(pool.ids),
            "race_date": ("race", np.array([r.date for r in races], dtype="datetime64[ns]")),
            "track": ("race", np.array([r.track for r in races])),
            "archetype": ("race", np.array([r.archetype for r in races])),
        },
        attrs={
            "title": "calq synthetic calibration dataset",
            "source": f"{GENERATOR} v{GENERATOR_VERSION}",
            TRUTH_ATTR: json.dumps(truth_attrs, sort_keys=True),
        },
    )

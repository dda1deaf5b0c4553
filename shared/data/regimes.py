"""Harder synthetic regimes: worlds where calq's default synthetic seasons are too kind.

The default generator (:func:`~shared.data.synth.synthesize`) simulates a
regular Cup schedule with moderate miscalibration, the data the model's
priors and sampler settings were first tuned on. Each :class:`Regime` here
bends one thing a real dataset may do — few tracks and races, one track
dominating, forecasts near 0 and 1, strong over- or under-confidence, tracks
that disagree with their archetype, very unequal rows per track, one or
three events — and names the job that should still converge on it (at
default sampler settings, after remedies) and recover the truth.

``calq synth --regime NAME`` writes one; :func:`synthesize_regime` makes it
in memory. The truth is recorded as for the default generator
(:func:`~shared.data.synth.truth`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import xarray as xr

from shared.data.synth import synthesize


@dataclass(frozen=True)
class Regime:
    """A world for the generator and the job that fits it."""

    name: str
    description: str
    archetype: str
    events: tuple[str, ...]
    schedule: tuple[str, ...]
    seasons: int = 1
    temperature: dict[str, float] = field(default_factory=dict)
    track_factor: dict[str, float] = field(default_factory=dict)
    true_scale: dict[str, float] = field(default_factory=dict)
    drivers_per_race: int = 38


REGIMES: dict[str, Regime] = {
    r.name: r
    for r in (
        Regime(
            "few_tracks",
            "two road courses, five races in all",
            archetype="road_course",
            events=("top_5", "top_10"),
            schedule=("Sonoma", "Watkins Glen", "Sonoma", "Watkins Glen", "Sonoma"),
        ),
        Regime(
            "three_tracks_few_races",
            "three superspeedways, one race each, over-confident forecasts",
            archetype="superspeedway",
            events=("top_5", "top_10"),
            schedule=("Daytona", "Talladega", "Atlanta"),
        ),
        Regime(
            "dominant_track",
            "one intermediate track holds 14 of 16 races",
            archetype="intermediate",
            events=("top_5", "top_10"),
            schedule=("Las Vegas",) * 7 + ("Kansas",) + ("Las Vegas",) * 7 + ("Texas",),
        ),
        Regime(
            "unequal_rows",
            "short tracks with 1, 2, 4 and 9 races and small fields",
            archetype="short_track",
            events=("top_5", "top_10"),
            schedule=("Martinsville",) + ("Bristol",) * 2 + ("Richmond",) * 4 + ("Phoenix",) * 9,
            drivers_per_race=30,
        ),
        Regime(
            "extreme_forecasts",
            "skill decides races: forecasts near 0 and 1",
            archetype="intermediate",
            events=("top_5", "top_10"),
            schedule=("Las Vegas", "Kansas", "Charlotte", "Texas", "Michigan", "Homestead") * 2,
            true_scale={"intermediate": 3.0},
        ),
        Regime(
            "over_confident",
            "a strongly over-confident forecaster (temperature 3)",
            archetype="road_course",
            events=("top_5", "top_10"),
            schedule=("Sonoma", "Watkins Glen", "COTA", "Chicago Street") * 2,
            temperature={"road_course": 3.0},
        ),
        Regime(
            "under_confident",
            "a strongly under-confident forecaster (temperature 0.4)",
            archetype="short_track",
            events=("top_5", "top_10"),
            schedule=("Martinsville", "Bristol", "Richmond", "Phoenix", "Dover", "Iowa") * 2,
            temperature={"short_track": 0.4},
        ),
        Regime(
            "track_outliers",
            "two intermediate tracks far from their archetype (temperature ×1.7 and ×0.6), four races each",
            archetype="intermediate",
            events=("top_5", "top_10"),
            schedule=("Las Vegas", "Kansas", "Charlotte", "Texas", "Michigan", "Homestead", "Las Vegas", "Kansas") * 2,
            track_factor={"Las Vegas": 1.7, "Kansas": 0.6, "Charlotte": 1.0, "Texas": 1.0, "Michigan": 1.0,
                          "Homestead": 1.0},
        ),
        Regime(
            "one_event",
            "a single event (top_10)",
            archetype="short_track",
            events=("top_10",),
            schedule=("Martinsville", "Bristol", "Richmond", "Phoenix", "Dover") * 2,
        ),
        Regime(
            "three_events",
            "three events (top_3, top_10, top_20)",
            archetype="road_course",
            events=("top_3", "top_10", "top_20"),
            schedule=("Sonoma", "Watkins Glen", "COTA", "Chicago Street", "Charlotte Roval"),
        ),
    )
}


def regime(name: str) -> Regime:
    """The regime called ``name``; ValueError naming the known ones otherwise."""
    try:
        return REGIMES[name]
    except KeyError:
        raise ValueError(f"unknown regime {name!r}; known: {', '.join(REGIMES)}") from None


def synthesize_regime(name: str, *, seed: int = 0, scenarios: int = 1000, first_season: int = 2024) -> xr.Dataset:
    """A dataset of regime ``name``; deterministic for ``seed``. The regime is in ``attrs["calq_regime"]``."""
    r = regime(name)
    ds = synthesize(
        seasons=r.seasons,
        scenarios=scenarios,
        seed=seed,
        first_season=first_season,
        drivers_per_race=r.drivers_per_race,
        pool_size=max(46, r.drivers_per_race + 8),
        schedule=r.schedule,
        temperature=r.temperature,
        track_factor=r.track_factor,
        true_scale=r.true_scale,
    )
    ds.attrs["calq_regime"] = r.name
    return ds


__all__ = ["REGIMES", "Regime", "regime", "synthesize_regime"]

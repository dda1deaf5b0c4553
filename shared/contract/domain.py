"""The racing domain: track archetypes, known tracks, event thresholds and the dates calq accepts.

A track is free-form data: new or renamed tracks appear every season, so an
unknown track is normal and borrows its archetype's parameters. The
archetype, by contrast, is one of :data:`ARCHETYPES`.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Literal

Archetype = Literal["superspeedway", "intermediate", "short_track", "road_course"]
ArchetypeOrAll = Literal["superspeedway", "intermediate", "short_track", "road_course", "all"]

ARCHETYPES: tuple[str, ...] = ("superspeedway", "intermediate", "short_track", "road_course")

#: The Cup Series tracks calq knows, by archetype (used by the generator; a
#: dataset may name any track).
TRACKS: dict[str, tuple[str, ...]] = {
    "superspeedway": ("Daytona", "Talladega", "Atlanta"),
    "intermediate": (
        "Las Vegas", "Kansas", "Charlotte", "Texas", "Michigan", "Homestead",
        "Nashville", "Darlington", "Pocono", "Kentucky",
    ),
    "short_track": (
        "Martinsville", "Bristol", "Richmond", "Phoenix", "North Wilkesboro",
        "Dover", "New Hampshire", "Iowa",
    ),
    "road_course": (
        "Sonoma", "Watkins Glen", "COTA", "Chicago Street", "Charlotte Roval",
        "Indianapolis Road Course", "Mexico City",
    ),
}

#: What a job id, archetype or event must look like to become part of a storage key or Redis key.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

#: The model's parameter names, by level (shared by the model, the InferenceData and the diagnostics).
ARCHETYPE_PARAMETERS: tuple[str, ...] = ("alpha_arch", "beta_arch", "sigma_alpha", "sigma_log_beta")
TRACK_PARAMETERS: tuple[str, ...] = ("alpha_track", "beta_track")
PARAMETERS: tuple[str, ...] = ARCHETYPE_PARAMETERS + TRACK_PARAMETERS

_EVENT = re.compile(r"top_([1-9][0-9]{0,2})")  # matched whole (fullmatch): no trailing newline

DEFAULT_EVENTS: tuple[str, ...] = ("top_1", "top_5", "top_10")
#: The largest field calq fits (the default ``limits.max_drivers``): no event threshold is above it.
MAX_FIELD = 200

#: Race dates and a job's ``as_of`` lie in [EARLIEST_DATE, LATEST_DATE): well inside what
#: nanosecond datetimes hold (1677–2262), so no date arithmetic on them overflows.
EARLIEST_DATE = date(1900, 1, 1)
LATEST_DATE = date(2200, 1, 1)
#: The longest data window a job may ask for (100 years).
MAX_WINDOW_DAYS = 36_500


def event_threshold(event: str) -> int:
    """The finishing-position threshold of an event name: ``"top_5"`` → 5, at most :data:`MAX_FIELD`."""
    match = _EVENT.fullmatch(event)
    if match is None:
        raise ValueError(f"unknown event {event!r}: events are named top_N, e.g. top_5")
    threshold = int(match.group(1))
    if threshold > MAX_FIELD:
        raise ValueError(f"event {event}: no field has more than {MAX_FIELD} drivers (MAX_FIELD)")
    return threshold


def archetypes_of(archetype: str) -> tuple[str, ...]:
    """The archetypes a job for ``archetype`` (or ``"all"``) fits."""
    if archetype == "all":
        return ARCHETYPES
    if archetype not in ARCHETYPES:
        raise ValueError(f"unknown archetype {archetype!r}; expected one of {', '.join(ARCHETYPES)} or all")
    return (archetype,)

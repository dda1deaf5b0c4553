"""The racing domain: track archetypes, known tracks and event thresholds.

A track is free-form data: new or renamed tracks appear every season, so an
unknown track is normal and borrows its archetype's parameters. The
archetype, by contrast, is one of :data:`ARCHETYPES`.
"""

from __future__ import annotations

import re
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

_EVENT = re.compile(r"^top_([1-9][0-9]{0,2})$")

DEFAULT_EVENTS: tuple[str, ...] = ("top_1", "top_5", "top_10")


def event_threshold(event: str) -> int:
    """The finishing-position threshold of an event name: ``"top_5"`` → 5."""
    match = _EVENT.match(event)
    if match is None:
        raise ValueError(f"unknown event {event!r}: events are named top_N, e.g. top_5")
    return int(match.group(1))


def archetypes_of(archetype: str) -> tuple[str, ...]:
    """The archetypes a job for ``archetype`` (or ``"all"``) fits."""
    if archetype == "all":
        return ARCHETYPES
    if archetype not in ARCHETYPES:
        raise ValueError(f"unknown archetype {archetype!r}; expected one of {', '.join(ARCHETYPES)} or all")
    return (archetype,)

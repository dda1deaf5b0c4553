"""Usage mistakes: what a person typed, checked before any work, each answered in one line.

A mistake in a command line or in the settings ends the command with exit
code 2 (:data:`producer.exit_codes.ExitCode.USAGE`) and one line that names
what was wrong and, where a near name exists, what was meant ("did you mean
superspeedway?"). The checks here raise :class:`typer.BadParameter` (Click's
usage error); :func:`one_line` is how :func:`producer.cli.main` prints any
usage error. A value someone typed is shown through
:func:`producer.sanitize.visible`, never as markup.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence

import typer

from producer.sanitize import visible
from shared.contract.domain import ARCHETYPES, DEFAULT_EVENTS, event_threshold

#: Events offered as near names when an event is misspelt (any ``top_N`` is valid).
_EVENT_EXAMPLES: tuple[str, ...] = (*DEFAULT_EVENTS, "top_15", "top_20")


def did_you_mean(value: str, choices: Iterable[str]) -> str | None:
    """The choice nearest to ``value`` (case ignored), or None when none is near."""
    choices = list(choices)
    by_fold = {c.casefold(): c for c in choices}
    if value.casefold() in by_fold:
        return by_fold[value.casefold()]
    close = difflib.get_close_matches(value.casefold(), list(by_fold), n=1, cutoff=0.6)
    return by_fold[close[0]] if close else None


def unknown(kind: str, value: str, choices: Sequence[str], *, listed: bool = True) -> str:
    """``unknown archetype 'x' (did you mean y?); expected one of a, b``: one line, the value shown visibly."""
    near = did_you_mean(value, choices)
    text = f"unknown {kind} '{visible(value)}'"
    if near is not None:
        text += f" (did you mean {visible(near)}?)"
    if listed and choices:
        text += f"; expected one of {', '.join(visible(c) for c in choices)}"
    return text


def archetype(value: str, *, allow_all: bool = True, hint: str = "--archetype") -> str:
    """``value`` if it is one of :data:`ARCHETYPES` (or ``all``), else a usage error naming the nearest."""
    choices = (*ARCHETYPES, "all") if allow_all else ARCHETYPES
    if value in choices:
        return value
    raise typer.BadParameter(unknown("archetype", value, choices), param_hint=hint)


def lane(value: str, *, hint: str = "--lane") -> str:
    """``value`` if it is a lane (:data:`shared.jobs.celery_app.LANES`), else a usage error naming the nearest."""
    from shared.jobs.celery_app import LANES

    if value in LANES:
        return value
    raise typer.BadParameter(unknown("lane", value, LANES), param_hint=hint)


def archetypes(value: str | None, *, allow_all: bool = True, hint: str = "--archetype") -> list[str] | None:
    """A comma-separated list of archetypes, each checked; None when ``value`` is None."""
    if value is None:
        return None
    names = [a.strip() for a in value.split(",") if a.strip()]
    if not names:
        raise typer.BadParameter("name at least one archetype", param_hint=hint)
    return [archetype(a, allow_all=allow_all, hint=hint) for a in names]


def event(value: str, *, hint: str = "--event") -> str:
    """``value`` if it is an event name (``top_N``), else a usage error naming the nearest."""
    try:
        event_threshold(value)
    except ValueError:
        digits = re.sub(r"\D", "", value)
        choices = (f"top_{int(digits)}", *_EVENT_EXAMPLES) if digits and 0 < int(digits) < 1000 else _EVENT_EXAMPLES
        message = unknown("event", value, list(dict.fromkeys(choices)), listed=False)
        raise typer.BadParameter(f"{message}; events are named top_N, e.g. top_5", param_hint=hint) from None
    return value


def events(value: str | None, *, hint: str = "--events") -> str | None:
    """A comma-separated list of events, each checked; returned as given."""
    if value is not None:
        for name in (e.strip() for e in value.split(",")):
            event(name, hint=hint)
    return value


def env_var(loc: Sequence[object]) -> str:
    """The environment variable of a settings field: ``("sampler", "warmup")`` → ``CALQ_SAMPLER__WARMUP``."""
    return "CALQ_" + "__".join(str(part).upper() for part in loc)


def problems(exc: Exception, *, naming: Callable[[Sequence[object]], str] | None = None) -> str:
    """A pydantic validation error as ``field: problem; …``; the values (which may be secrets) are never shown.

    ``naming`` turns a field's location into its name (default ``a.b``;
    :func:`env_var` for settings, so a person reads the variable to fix).
    """
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return type(exc).__name__
    name = naming or (lambda loc: ".".join(str(part) for part in loc))
    return "; ".join(
        f"{name(e['loc']) if e.get('loc') else 'input'}: {_message(e)}"
        for e in errors(include_url=False, include_input=False)
    )


def settings_problems(exc: Exception) -> str:
    """Invalid settings by environment variable and problem (see :func:`problems`)."""
    return problems(exc, naming=env_var)


def _message(error: dict) -> str:
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


def one_line(exc: typer.TyperException) -> str:
    """A usage error as one line: ``calq calibrate: Invalid value for '--archetype': … (see 'calq calibrate --help')``."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "calq"
    text = " ".join(visible(exc.format_message()).split())
    return f"{where}: {text}" + (f" (see '{where} --help')" if ctx is not None else "")


__all__ = [
    "archetype", "archetypes", "did_you_mean", "env_var", "event", "events", "one_line", "problems",
    "settings_problems", "unknown",
]

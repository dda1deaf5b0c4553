"""Where the CLI's commands print, and the client they talk through.

:mod:`producer.cli`, :mod:`producer.job_commands` and
:mod:`producer.report.command` all print here, so none of them imports
another command module for its output. Everything printed that calq did not
write itself goes through :mod:`producer.sanitize` first: :func:`say` for a
line of text, :func:`~producer.sanitize.for_markup` for a table cell, and
:func:`print_json` encodes every character outside printable ASCII.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rich.console import Console

from producer.sanitize import visible

if TYPE_CHECKING:
    from producer.client import CalibrationClient

out = Console()
err = Console(stderr=True)


def say(console: Console, text: object, *, style: str | None = None) -> None:
    """Print one line of text as text: control characters shown escaped, ``[...]`` never read as markup.

    The line is never broken at the console's width (``soft_wrap``): a URI or
    path in it stays whole and copyable, and the terminal wraps it if it must.
    """
    console.print(visible(text), style=style, markup=False, highlight=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    """``obj`` as indented JSON on stdout (colours on a terminal); non-ASCII characters are ``\\u`` escapes."""
    text = json.dumps(obj, default=str, indent=2, ensure_ascii=True)
    if out.is_terminal:
        out.print_json(text, highlight=False, ensure_ascii=True)
    else:
        print(text)


def client() -> CalibrationClient:
    """A client on the settings in force (embedded, or the fleet when ``CALQ_BROKER_URL`` is set)."""
    from producer.client import CalibrationClient

    return CalibrationClient()


__all__ = ["client", "err", "out", "print_json", "say"]

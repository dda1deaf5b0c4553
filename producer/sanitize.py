"""One sanitizer for text calq did not write, before a terminal or a page shows it.

Who writes what calq shows: a producer writes race ids, track names and the
job fields quoted in a reason; anyone holding Redis's keys can write a job
record's ``worker``, ``progress.phase`` or ``reason``; anyone holding the
store's keys, a summary. Shown raw, such text drives the reader's terminal:
ESC and CSI sequences (``\\x1b[2J`` clears the screen), C1 controls (``\\x9b``
is a one-byte CSI), OSC 8 hyperlinks, a carriage return that rewrites the
line, bidi overrides that reorder what a reader sees (the "Trojan Source"
characters), and rich markup (``[link=…]``) in a CLI that prints with rich.

:func:`visible` shows every such character as a visible escape (``\\x1b``,
``\\u202e``) and keeps newlines and tabs, so the text stays readable and
nothing in it acts; :func:`for_markup` also escapes rich markup, for table
cells and any string printed with markup on. The HTML and markdown reports
pass their text through :func:`visible` before their own escaping
(:mod:`producer.report.page`). Every value from a record, a dataset or a
summary goes through here on its way out; JSON output escapes the same
characters by encoding everything outside printable ASCII (``ensure_ascii``).
"""

from __future__ import annotations

import logging
import re

from rich.markup import escape

#: C0 controls but tab and newline, DEL, C1 controls, and the invisible format characters
#: that reorder or hide text: bidi marks, embeddings, overrides and isolates, the Arabic
#: letter mark, line and paragraph separators, the zero-width space, word joiners and the BOM
#: (zero-width joiners stay: scripts and emoji need them).
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028-\u202e\u2060-\u2069\ufeff]"
)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible(value: object) -> str:
    """``str(value)`` with every control and invisible format character shown as an escape.

    ``visible("a\\x1b[2Jb")`` is ``"a\\\\x1b[2Jb"``: the ESC is four visible
    characters. Tabs and newlines are kept; ``\\r`` is escaped (it rewrites
    the line). Printable text, accents and emoji included, is unchanged.
    """
    return _UNSAFE.sub(_escaped, str(value))


def for_markup(value: object) -> str:
    """:func:`visible` text with rich markup escaped: safe in a table cell or a markup-enabled print."""
    return escape(visible(value))


class VisibleFormatter(logging.Formatter):
    """A log formatter whose lines show control characters visibly: log messages quote reasons and ids too."""

    def format(self, record: logging.LogRecord) -> str:
        return visible(super().format(record))


__all__ = ["VisibleFormatter", "for_markup", "visible"]

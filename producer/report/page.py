"""A small page builder: a title, sections of text, tables and figures, rendered to HTML or markdown.

Pages are built from plain values (strings, numbers, matplotlib Figures);
every string is data until it is rendered, and escaping happens here, once,
at render time — :func:`escape_html` for HTML (both show control characters visibly first), :func:`escape_markdown` for
markdown. Callers never escape and never pass markup in.

A figure is turned into a PNG when it is added (:meth:`Section.figure`), then
closed, so a long report does not hold every matplotlib figure open; the
PNG is embedded as a base64 ``data:`` URI, so the page is one file that opens
offline. The HTML carries a Content-Security-Policy that allows nothing but
inline styles and ``data:`` images: the page cannot fetch anything, and a
script that slipped in could not run.

Usage::

    page = Page("calq report", subtitle="raw forecasts")
    s = page.section("Reliability", intro="Observed frequency against forecast.")
    s.figure(fig, caption="superspeedway: reliability per event", alt="reliability diagram")
    s.table(["event", "Brier"], [["top_5", 0.081]], caption="scores")
    page.write_html("out.html")
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from producer.sanitize import visible

#: Figures are rendered at this resolution: sharp on a laptop screen and on paper.
FIGURE_DPI = 110

Cell = Any  # str, int, float, None (shown as "–"), bool


def escape_html(text: object) -> str:
    """``text`` as HTML text or attribute value: controls shown visibly (:func:`~producer.sanitize.visible`), ``& < > " '`` escaped."""
    return html.escape(visible(text), quote=True)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|$~^&])")
_MD_LINE_START = re.compile(r"^(\s*)(?:([#+\-=])|(\d+)(?=[.)](?:\s|$)))")


def escape_markdown(text: object) -> str:
    """``text`` as literal markdown inline text.

    Every character markdown (CommonMark, GitHub's tables and its ``$`` math)
    could read as syntax is backslash-escaped, and line breaks become spaces,
    so a value cannot open a tag, a link, a table cell or a formula; control
    and bidi characters are shown visibly first (:func:`~producer.sanitize.visible`).
    """
    flat = " ".join(visible(text).splitlines())
    escaped = _MD_SPECIAL.sub(r"\\\1", flat)
    # a heading, list item or quote marker only counts at the start of a line
    return _MD_LINE_START.sub(_escape_line_start, escaped)


def _escape_line_start(m: re.Match) -> str:
    lead, marker, number = m.groups()
    return f"{lead}\\{marker}" if marker else f"{lead}{number}\\"


def format_cell(value: Cell, *, digits: int = 4) -> str:
    """A table cell as text: floats by :func:`fixed` to ``digits`` significant digits, None and NaN as "–"."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return fixed(value, digits=digits)
    return str(value)


def fixed(value: float, *, digits: int = 4) -> str:
    """``value`` rounded to ``digits`` significant digits, in fixed notation: never an exponent.

    One rule for every number on a page, so a score and a difference of two
    scores read alike (``0.00004830`` beside ``0.001205``, not ``4.83e-05``).
    Trailing zeros are kept: they are significant. Zero is ``0``.
    """
    if value == 0:
        return "0"
    rounded = float(f"{value:.{digits}g}")  # first, so 0.99996 becomes 1.000, not 0.10000e1
    return f"{rounded:.{max(0, digits - 1 - math.floor(math.log10(abs(rounded))))}f}"


@dataclass(frozen=True)
class Image:
    """A rendered figure: PNG bytes, a caption and alt text."""

    png: bytes
    caption: str
    alt: str

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str | None = None
    numeric: tuple[bool, ...] = ()


@dataclass(frozen=True)
class Paragraph:
    text: str
    tone: str = "plain"  # "plain", "note" (a highlighted remark) or "warning"


@dataclass(frozen=True)
class Facts:
    """A key → value list (run metadata)."""

    items: tuple[tuple[str, str], ...]


Block = Image | Table | Paragraph | Facts


def figure_png(fig, *, dpi: int = FIGURE_DPI) -> bytes:
    """A matplotlib Figure as PNG bytes; the figure is closed afterwards."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    return buffer.getvalue()


@dataclass
class Section:
    """A titled part of a page: blocks in the order they were added, and subsections."""

    title: str
    anchor: str
    intro: str | None = None
    blocks: list[Block] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)

    def text(self, text: str, *, tone: str = "plain") -> Section:
        self.blocks.append(Paragraph(str(text), tone))
        return self

    def figure(self, fig, *, caption: str, alt: str | None = None) -> Section:
        """Add a matplotlib Figure (rendered to PNG now, then closed)."""
        self.blocks.append(Image(figure_png(fig), caption=str(caption), alt=str(alt or caption)))
        return self

    def image(self, png: bytes, *, caption: str, alt: str | None = None) -> Section:
        self.blocks.append(Image(png, caption=str(caption), alt=str(alt or caption)))
        return self

    def table(
        self, headers: Sequence[str], rows: Iterable[Sequence[Cell]], *, caption: str | None = None, digits: int = 4
    ) -> Section:
        """Add a table; numbers are formatted by :func:`format_cell` and right-aligned."""
        raw = [list(r) for r in rows]
        numeric = tuple(
            bool(raw) and all((isinstance(r[i], (int, float)) and not isinstance(r[i], bool)) or r[i] is None for r in raw)
            for i in range(len(headers))
        )
        self.blocks.append(
            Table(
                headers=tuple(str(h) for h in headers),
                rows=tuple(tuple(format_cell(c, digits=digits) for c in r) for r in raw),
                caption=caption,
                numeric=numeric,
            )
        )
        return self

    def facts(self, items: Iterable[tuple[str, Cell]]) -> Section:
        self.blocks.append(Facts(tuple((str(k), format_cell(v)) for k, v in items)))
        return self

    def section(self, title: str, *, intro: str | None = None) -> Section:
        child = Section(title=str(title), anchor=f"{self.anchor}-{_slug(title)}", intro=intro)
        self.children.append(child)
        return child

    def images(self) -> list[Image]:
        """Every image in this section and its subsections."""
        own = [b for b in self.blocks if isinstance(b, Image)]
        return own + [i for c in self.children for i in c.images()]


@dataclass
class Page:
    """A report page: a title, a subtitle, and sections (see the module docstring)."""

    title: str
    subtitle: str | None = None
    sections: list[Section] = field(default_factory=list)
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def section(self, title: str, *, intro: str | None = None) -> Section:
        s = Section(title=str(title), anchor=self._free_anchor(_slug(title)), intro=intro)
        self.sections.append(s)
        return s

    def add(self, sections: Iterable[Section]) -> Page:
        """Append sections built elsewhere (another page's building blocks); clashing anchors are renumbered."""
        for s in sections:
            anchor = self._free_anchor(s.anchor)
            if anchor != s.anchor:
                _reanchor(s, s.anchor, anchor)
            self.sections.append(s)
        return self

    def _free_anchor(self, base: str) -> str:
        taken = {s.anchor for s in self.sections}
        anchor, n = base, 2
        while anchor in taken:
            anchor, n = f"{base}-{n}", n + 1
        return anchor

    def images(self) -> list[Image]:
        return [i for s in self.sections for i in s.images()]

    # -- rendering ---------------------------------------------------------

    def to_html(self) -> str:
        from producer.report.html import render_html

        return render_html(self)

    def to_markdown(self) -> str:
        from producer.report.markdown import render_markdown

        return render_markdown(self)

    def write_html(self, path: str | Path) -> Path:
        return _write(path, self.to_html())

    def write_markdown(self, path: str | Path) -> Path:
        return _write(path, self.to_markdown())


def _reanchor(section: Section, old: str, new: str) -> None:
    section.anchor = new + section.anchor[len(old):]
    for child in section.children:
        _reanchor(child, old, new)


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return slug or "section"


def _write(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary name, so a reader never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


__all__ = [
    "FIGURE_DPI",
    "Facts",
    "Image",
    "Page",
    "Paragraph",
    "Section",
    "Table",
    "escape_html",
    "escape_markdown",
    "figure_png",
    "fixed",
    "format_cell",
]

"""A :class:`~producer.report.page.Page` as markdown with base64-embedded PNGs.

For notebooks and pull requests: the same sections, tables and figures as the
HTML page. Every string from the page goes through
:func:`~producer.report.page.escape_markdown` here and nowhere else.
"""

from __future__ import annotations

from producer.report.page import Facts, Image, Page, Paragraph, Section, Table, escape_markdown


def render_markdown(page: Page) -> str:
    """The whole page as a markdown document (a string)."""
    m = escape_markdown
    out = [f"# {m(page.title)}", ""]
    if page.subtitle:
        out += [f"*{m(page.subtitle)}*", ""]
    out += [f"generated {m(page.generated_at.strftime('%Y-%m-%d %H:%M UTC'))}", ""]
    for section in page.sections:
        out.extend(_section(section, level=2))
    return "\n".join(out).rstrip() + "\n"


def _section(section: Section, *, level: int) -> list[str]:
    m = escape_markdown
    out = [f"{'#' * min(level, 6)} {m(section.title)}", ""]
    if section.intro:
        out += [f"*{m(section.intro)}*", ""]
    for block in section.blocks:
        out += [*_block(block), ""]
    for child in section.children:
        out.extend(_section(child, level=level + 1))
    return out


def _block(block) -> list[str]:
    m = escape_markdown
    if isinstance(block, Image):
        return [f"![{m(block.alt)}]({block.data_uri})", "", f"*{m(block.caption)}*"]
    if isinstance(block, Paragraph):
        prefix = {"note": "> ", "warning": "> **warning:** "}.get(block.tone, "")
        return [prefix + m(block.text)]
    if isinstance(block, Facts):
        return [f"- **{m(k)}:** {m(v)}" for k, v in block.items]
    if isinstance(block, Table):
        return _table(block)
    raise TypeError(f"cannot render {type(block).__name__}")


def _table(table: Table) -> list[str]:
    m = escape_markdown
    numeric = table.numeric or (False,) * len(table.headers)
    out = [f"**{m(table.caption)}**", ""] if table.caption else []
    out.append("| " + " | ".join(m(h) for h in table.headers) + " |")
    out.append("|" + "|".join("---:" if n else ":---" for n in numeric) + "|")
    out.extend("| " + " | ".join(m(c) for c in row) + " |" for row in table.rows)
    return out


__all__ = ["render_markdown"]

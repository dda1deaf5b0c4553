"""A :class:`~producer.report.page.Page` as one self-contained HTML file.

Every string from the page goes through :func:`~producer.report.page.escape_html`
here and nowhere else. Images are inline ``data:`` PNGs; the stylesheet is
inline; the Content-Security-Policy forbids every fetch, script and frame, so
the file opens offline and shows only what it holds. The layout is one
readable column on a laptop screen; ``@media print`` keeps figures and table
rows whole across pages.
"""

from __future__ import annotations

from producer.report.page import Facts, Image, Page, Paragraph, Section, Table, escape_html

#: Nothing but inline styles and data: images. No scripts, no fetches, no frames.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

STYLE = """
:root { --ink: #1f2328; --muted: #59636e; --rule: #d0d7de; --note: #0072b2; --warn: #d55e00; --bg-soft: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
       font: 15px/1.5 "DejaVu Sans", "Liberation Sans", Helvetica, Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 1.5rem 3rem; }
header h1 { margin: 0 0 .25rem; font-size: 1.7rem; }
header p.subtitle { margin: 0; color: var(--muted); }
header p.generated { margin: .25rem 0 0; color: var(--muted); font-size: .85rem; }
nav.toc { margin: 1rem 0 1.5rem; padding: .5rem 1rem; background: var(--bg-soft); border: 1px solid var(--rule); border-radius: 6px; }
nav.toc ol { margin: .25rem 0; padding-left: 1.25rem; }
nav.toc a { color: var(--note); text-decoration: none; }
section { margin: 2rem 0 0; }
section > h2 { border-bottom: 2px solid var(--rule); padding-bottom: .25rem; font-size: 1.35rem; }
section section > h3 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
p.intro { color: var(--muted); margin: .25rem 0 .75rem; }
p.note { border-left: 4px solid var(--note); padding: .25rem .75rem; background: var(--bg-soft); }
p.warning { border-left: 4px solid var(--warn); padding: .25rem .75rem; background: #fff4ec; }
figure { margin: 1rem 0 1.5rem; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--rule); }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .35rem; }
.table-wrap { overflow-x: auto; margin: .75rem 0 1.25rem; }
table { border-collapse: collapse; font-size: .88rem; font-variant-numeric: tabular-nums; }
p.table-title { font-weight: 600; margin: 0 0 .3rem; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid var(--rule); text-align: left; vertical-align: top; }
th { background: var(--bg-soft); }
td.num, th.num { text-align: right; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; font-size: .9rem; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; font-family: "DejaVu Sans Mono", monospace; font-size: .85rem; }
@media print {
  body { font-size: 11pt; }
  main { max-width: none; padding: 0; }
  nav.toc { display: none; }
  h2, h3, h4, p.intro, p.note { break-after: avoid; }
  figure, tr, dl.facts, p.table-title { break-inside: avoid; }
  p.table-title { break-after: avoid; }
  figure img { max-height: 24cm; border: none; }
  a { color: inherit; text-decoration: none; }
}
"""


def render_html(page: Page) -> str:
    """The whole page as an HTML document (a string)."""
    e = escape_html
    toc = "".join(f'<li><a href="#{e(s.anchor)}">{e(s.title)}</a></li>' for s in page.sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{e(CONTENT_SECURITY_POLICY)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="generator" content="calq report">',
        f"<title>{e(page.title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        "<main>",
        "<header>",
        f"<h1>{e(page.title)}</h1>",
    ]
    if page.subtitle:
        parts.append(f'<p class="subtitle">{e(page.subtitle)}</p>')
    parts.append(f'<p class="generated">generated {e(page.generated_at.strftime("%Y-%m-%d %H:%M UTC"))}</p>')
    parts.append("</header>")
    if len(page.sections) > 1:
        parts.append(f'<nav class="toc" aria-label="contents"><strong>Contents</strong><ol>{toc}</ol></nav>')
    parts.extend(_section(s, level=2) for s in page.sections)
    parts += ["</main>", "</body>", "</html>", ""]
    return "\n".join(parts)


def _section(section: Section, *, level: int) -> str:
    e = escape_html
    h = min(level, 6)
    out = [f'<section id="{e(section.anchor)}" data-section="{e(section.title)}">', f"<h{h}>{e(section.title)}</h{h}>"]
    if section.intro:
        out.append(f'<p class="intro">{e(section.intro)}</p>')
    out.extend(_block(b) for b in section.blocks)
    out.extend(_section(c, level=level + 1) for c in section.children)
    out.append("</section>")
    return "\n".join(out)


def _block(block) -> str:
    e = escape_html
    if isinstance(block, Image):
        return (
            f'<figure><img src="{block.data_uri}" alt="{e(block.alt)}">'
            f"<figcaption>{e(block.caption)}</figcaption></figure>"
        )
    if isinstance(block, Paragraph):
        cls = f' class="{e(block.tone)}"' if block.tone != "plain" else ""
        return f"<p{cls}>{e(block.text)}</p>"
    if isinstance(block, Facts):
        items = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in block.items)
        return f'<dl class="facts">{items}</dl>'
    if isinstance(block, Table):
        return _table(block)
    raise TypeError(f"cannot render {type(block).__name__}")


def _table(table: Table) -> str:
    e = escape_html
    numeric = table.numeric or (False,) * len(table.headers)

    def cls(i: int) -> str:
        return ' class="num"' if numeric[i] else ""

    head = "".join(f'<th scope="col"{cls(i)}>{e(h)}</th>' for i, h in enumerate(table.headers))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{e(c)}</td>" for i, c in enumerate(row)) + "</tr>" for row in table.rows)
    caption = f'<p class="table-title">{e(table.caption)}</p>' if table.caption else ""
    return f'<div class="table-wrap">{caption}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


__all__ = ["CONTENT_SECURITY_POLICY", "render_html"]

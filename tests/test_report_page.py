"""The page builder and the plots, without a fit: escaping, anchors, rendering, titled and labelled figures."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image as PILImage

from producer.report import plots
from producer.report.html import CONTENT_SECURITY_POLICY
from producer.report.page import Page, escape_markdown, format_cell
from shared.stats.metrics import reliability_curve

HOSTILE = "<script>alert('x')</script> $x$ & _hidden | [link](http://example.com) `code` *bold*"


def _figure():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 500)
    y = (rng.uniform(0, 1, 500) < p).astype(float)
    return plots.plot_reliability({HOSTILE: {HOSTILE: reliability_curve(p, y).to_dict()}}, title=HOSTILE)


def _page() -> Page:
    page = Page(HOSTILE, subtitle=HOSTILE)
    s = page.section(HOSTILE, intro=HOSTILE)
    s.text(HOSTILE, tone="warning")
    s.facts([(HOSTILE, HOSTILE)])
    s.table([HOSTILE, "n"], [[HOSTILE, 3], [HOSTILE, float("nan")]], caption=HOSTILE)
    s.figure(_figure(), caption=HOSTILE, alt=HOSTILE)
    s.section(HOSTILE).text(HOSTILE)
    return page


def test_html_shows_every_data_string_as_written_and_runs_nothing():
    text = _page().to_html()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;" in text
    # the only tags are the page's own
    tags = set(re.findall(r"</?([a-zA-Z0-9]+)", text))
    assert tags <= {"html", "head", "meta", "title", "style", "body", "main", "header", "h1", "h2", "h3", "p", "nav",
                    "strong", "ol", "li", "a", "section", "dl", "dt", "dd", "div", "table", "thead", "tbody", "tr", "th",
                    "td", "figure", "img", "figcaption"}
    assert f'content="{CONTENT_SECURITY_POLICY}"' in text.replace("&#x27;", "'")
    assert "http://example.com" not in re.sub(r"\[link\]\(http://example\.com\)", "", text)  # only as text, never a link
    assert 'href="http' not in text and 'src="http' not in text


def test_markdown_escapes_every_data_string():
    text = _page().to_markdown()
    body = "\n".join(line.removeprefix("> ") for line in text.splitlines())  # the page's own quote markers
    assert not re.search(r"(?<!\\)[<>]", body)  # no raw angle bracket: no tag can open
    assert r"\<script\>" in text and r"\$x\$" in text and r"\_hidden" in text and r"\|" in text
    assert not re.search(r"(?<!\\)\]\(http", text)  # the link is text, not a link
    for line in text.splitlines():
        if line.startswith("|"):  # table rows keep their column count
            assert len(re.findall(r"(?<!\\)\|", line)) == 3


@pytest.mark.parametrize(
    ("text", "escaped"),
    [("# not a heading", r"\# not a heading"), ("1. not a list", r"1\. not a list"), ("12.5 mph", "12.5 mph"),
     ("a\nb", "a b"), ("- item", r"\- item")],
)
def test_markdown_escapes_line_start_markers(text, escaped):
    assert escape_markdown(text) == escaped


def test_images_are_inline_pngs_that_decode():
    page = _page()
    html_text, md_text = page.to_html(), page.to_markdown()
    for text in (html_text, md_text):
        uris = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
        assert len(uris) == 1
        image = PILImage.open(io.BytesIO(base64.b64decode(uris[0])))
        image.load()
        assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_sections_added_from_another_page_get_unique_anchors():
    other = Page("scratch")
    other.section("Overview").section("Details")
    page = Page("main")
    page.section("Overview")
    page.add(other.sections)
    assert [s.anchor for s in page.sections] == ["overview", "overview-2"]
    assert page.sections[1].children[0].anchor == "overview-2-details"
    assert page.to_html().count('id="overview-2-details"') == 1


def test_cells_are_formatted():
    assert format_cell(None) == "–" and format_cell(float("nan")) == "–" and format_cell(True) == "yes"
    assert format_cell(0.123456) == "0.1235" and format_cell(12) == "12" and format_cell(float("inf")) == "∞"


def test_mpl_text_keeps_data_literal():
    fig = _figure()
    title = fig.get_suptitle()
    text, math = fig._suptitle._preprocess_math(title)
    assert not math and "$x$" in text
    legend_labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any("_hidden" in label for label in legend_labels)  # a leading "_" would have dropped it


def test_every_plot_has_a_title_and_axis_labels():
    rng = np.random.default_rng(1)
    grid = np.linspace(0.01, 0.99, 11)
    band = plots.Band(mean=grid, low=grid * 0.9, high=np.minimum(grid * 1.1, 1))
    figures = [
        _figure(),
        plots.plot_calibration_curve(grid, {"A": band, "$B$": band}, population=band, title="curves"),
        plots.plot_forest(
            {"α": ([plots.Interval("t", 0.1, -0.2, 0.3)], plots.Interval("arch", 0.0, -0.1, 0.1), (-0.5, 0.5))},
            title="forest",
            reference={"α": 0.0},
        ),
        plots.plot_pit_histogram({"a": rng.integers(10, 20, 10)}, title="pit"),
        plots.plot_coverage({"a": {0.5: 0.45, 0.8: 0.79, 0.95: 0.9}}, title="coverage"),
    ]
    for fig in figures:
        assert fig.get_suptitle()
        for ax in fig.axes:
            if ax.get_visible() and ax.has_data():
                # labelled, or sharing its x axis with a labelled panel right below it
                labels = [a.get_xlabel() for a in ax.get_shared_x_axes().get_siblings(ax)]
                assert any(labels), (fig.get_suptitle(), ax.get_title())
        # a y label on the first axes of every row
        assert any(ax.get_ylabel() for ax in fig.axes)


def test_numbers_are_fixed_notation_to_four_significant_digits_never_an_exponent():
    from producer.report.page import fixed

    cases = {4.83e-05: "0.00004830", 0.001205: "0.001205", -0.0123456: "-0.01235", 0.99996: "1.000", 2572.3: "2572",
             123456.0: "123500", 0.0: "0"}
    assert {value: fixed(value) for value in cases} == cases
    assert format_cell(4.83e-05) == "0.00004830" and format_cell(0.5, digits=2) == "0.50"

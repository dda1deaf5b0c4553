"""``calq report``: every kind of page, rendered from real fits, read back and opened in a browser.

One module-wide store holds two real (tiny) fits of a dataset whose track
names are hostile (``<script>``, ``$x$``, ``|``, ``[link](...)``): an ``all``
job for top_5 and top_10, then a superspeedway job for top_5, so the latest
superspeedway top_5 comes from the second job and everything else from the
first (the all job's data ends before the last superspeedway race, so the
superspeedway job is newer by the latest rule). The store's convergence criteria are relaxed so tiny fits count as
converged: these tests are about the report, not about convergence.

The pages are made by the real ``calq`` command. Each is parsed (sections,
captions, every image decodes as a PNG), and opened in headless Chromium
(Debian's ``chromium``, installed by ``.ci/run``): a checker script added to
a copy of the page lists every image that failed to load and every figure
per section; a screenshot is taken. With ``REPORT_SCREENSHOTS=DIR`` the
screenshots are kept in DIR for a person to look at.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from producer.client import CalibrationClient
from producer.report.command import UnreadablePosterior, dataset_page, load_job, load_latest, load_posterior
from shared.contract.errors import InvalidDataset, NotFound
from shared.contract.settings import Settings
from shared.contract.summary import ConvergenceCriteria
from shared.data.dataset import save_dataset
from shared.data.synth import synthesize

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_TRACK = "<script>alert('pwned')</script>"
MATH_TRACK = "$x$ | [link](http://example.com) _Day"
TINY = {"warmup": 50, "samples": 50, "chains": 2}
#: lenient enough that a 2 × 50-draw fit counts as converged
LENIENT = ConvergenceCriteria(max_rhat=1.5, min_ess_bulk=5, max_divergences=1000)

RAW_SECTIONS = ["Overview", "Reliability of event probabilities", "Finishing positions: PIT", "Fantasy-points ensemble",
                "Joint events: co-hits"]
ARCHETYPE_PARTS = ["Reliability: raw against calibrated", "Calibrated curves", "Bias α and steepness β per track",
                   "Hierarchical scales"]


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A dataset with hostile track names, an ``all`` job and a later superspeedway job in one store."""
    root = tmp_path_factory.mktemp("report")
    ds = synthesize(seasons=1, scenarios=120, seed=11)
    tracks = ds["track"].values.astype(object)  # not a fixed-width string array: it would cut the names
    tracks[tracks == "Talladega"] = SCRIPT_TRACK
    tracks[tracks == "Daytona"] = MATH_TRACK
    ds = ds.assign_coords(track=("race", tracks))
    dataset = save_dataset(ds, root / "hostile.nc")
    settings = Settings(storage_url=str(root / "store"), compile_cache_dir=str(root / "jax-cache"), convergence=LENIENT)
    client = CalibrationClient(settings)
    # the all job sees the races before the last superspeedway race, so the superspeedway job has newer data
    last_superspeedway = ds["race_date"].values[ds["archetype"].values.astype(str) == "superspeedway"].max()
    as_of = np.datetime64(last_superspeedway, "D").astype(object)
    all_job = client.submit(dataset, "all", events="top_5,top_10", as_of=as_of, **TINY)
    ss_job = client.submit(dataset, "superspeedway", events="top_5", **TINY, seed=1)
    summaries = {job: client.result(job) for job in (all_job, ss_job)}
    assert all(s.converged for s in summaries.values()), [s.convergence_issues for s in summaries.values()]
    return {"root": root, "dataset": dataset, "settings": settings, "all": all_job, "ss": ss_job, "summaries": summaries}


def _env(fitted) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(fitted["root"]),
        "JAX_PLATFORMS": "cpu",
        "CALQ_STORAGE_URL": fitted["settings"].storage_url,
        "CALQ_COMPILE_CACHE_DIR": fitted["settings"].compile_cache_dir,
        "MPLCONFIGDIR": str(fitted["root"] / "mpl"),
        "COLUMNS": "400",  # error panels on one line
    }


def calq(fitted, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", *args], cwd=ROOT, env=_env(fitted), capture_output=True, text=True, timeout=300
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def pages(fitted):
    """Every kind of page, written by the real command (the four at once): {kind: (html path, markdown path or None)}."""
    root = fitted["root"]
    posterior = fitted["summaries"][fitted["ss"]].posterior_uri.removeprefix("file://")  # a path works too
    commands = {
        "raw": [str(fitted["dataset"]), "--html", str(root / "raw.html"), "--md", str(root / "raw.md")],
        "job": ["--job", fitted["ss"], "--html", str(root / "job.html"), "--md", str(root / "job.md")],
        "posterior": ["--posterior", posterior, "--html", str(root / "posterior.html")],
        "latest": ["--latest", "--html", str(root / "latest.html"), "--md", str(root / "latest.md")],
    }
    running = {
        kind: subprocess.Popen([sys.executable, "-m", "producer.cli", "report", *args], cwd=ROOT, env=_env(fitted),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for kind, args in commands.items()
    }
    for kind, proc in running.items():
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"calq report ({kind}) exited {proc.returncode}: {stderr[-3000:]}"
    return {
        kind: (root / f"{kind}.html", root / f"{kind}.md" if "--md" in args else None) for kind, args in commands.items()
    }


# -- reading a page back -----------------------------------------------------------------


class _Outline(HTMLParser):
    """Sections (nested, by title), the images in each, figure captions, and every tag seen."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.images: list[dict] = []
        self.sections: list[str] = []
        self.tags: set[str] = set()
        self.captions: list[str] = []
        self._in_caption = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        if tag == "section":
            self.stack.append(a.get("data-section", ""))
            self.sections.append(" / ".join(self.stack))
        elif tag == "img":
            self.images.append({"alt": a.get("alt", ""), "src": a.get("src", ""), "sections": list(self.stack)})
        elif tag == "figcaption":
            self._in_caption = True
            self.captions.append("")

    def handle_endtag(self, tag):
        if tag == "section":
            self.stack.pop()
        elif tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_caption:
            self.captions[-1] += data


def outline(path: Path) -> _Outline:
    parser = _Outline()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def decode_png(uri: str) -> PILImage.Image:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:40]
    image = PILImage.open(io.BytesIO(base64.b64decode(uri[len(prefix):], validate=True)))
    image.load()
    assert image.format == "PNG" and image.width > 200 and image.height > 150
    return image


def images_in(page: _Outline, *sections: str) -> list[dict]:
    return [i for i in page.images if all(s in i["sections"] for s in sections)]


def assert_safe(path: Path, *, tracks: bool = True) -> None:
    text = path.read_text(encoding="utf-8")
    page = outline(path)
    assert "script" not in page.tags
    if tracks:  # shown as written
        assert SCRIPT_TRACK in "".join(page.text) and MATH_TRACK in "".join(page.text)
        assert "&lt;script&gt;" in text
    assert 'href="http' not in text and 'src="http' not in text  # nothing fetched, nothing linked out


def assert_markdown(path: Path, html_page: _Outline, *, tracks: bool = True) -> None:
    text = path.read_text(encoding="utf-8")
    uris = re.findall(r"!\[[^\n]*?\]\((data:image/png;base64,[A-Za-z0-9+/=]+)\)", text)
    assert len(uris) == len(html_page.images)
    for uri in uris:
        decode_png(uri)
    assert not re.search(r"(?<!\\)<script", text)
    if tracks:
        assert r"\<script\>" in text and r"\$x\$ \| \[link\](http://example.com) \_Day" in text


# -- the pages ---------------------------------------------------------------------------


def test_raw_forecast_page(pages):
    html_path, md_path = pages["raw"]
    page = outline(html_path)
    assert [s for s in page.sections if " / " not in s] == RAW_SECTIONS
    for image in page.images:
        decode_png(image["src"])
    archetypes = ["superspeedway", "intermediate", "short_track", "road_course"]
    for archetype in archetypes:
        assert f"Reliability diagram, {archetype}: top_1, top_5, top_10" in page.captions
        assert any(c.startswith(f"Joint-event reliability, {archetype}") for c in page.captions)
    assert "PIT histograms of finishing positions per archetype" in page.captions
    assert "Coverage of central intervals at 50/80/95 % per archetype" in page.captions
    text = "".join(page.text)
    assert "CRPS, log score and coverage of the points ensemble" in text and "coverage 95%" in text
    assert_safe(html_path, tracks=False)  # the raw page names archetypes, not tracks
    assert_markdown(md_path, page, tracks=False)


def _assert_calibration_sections(page: _Outline, archetype: str, tracks: list[str], events: list[str], *prefix: str):
    for part in ARCHETYPE_PARTS:
        assert images_in(page, *prefix, archetype, part), (archetype, part)
    captions = {i["alt"] for i in images_in(page, *prefix, archetype)}
    for event in events:
        assert f"Calibrated curve q(p) with 94 % band per track, {archetype}, {event}" in captions
        assert f"α and β forest per track, {archetype}, {event}" in captions
    assert f"Reliability diagram, raw against calibrated, {archetype}: {', '.join(events)}" in captions
    assert f"Rank plots of sigma_alpha and sigma_log_beta, {archetype}" in captions
    assert f"Traces of sigma_alpha and sigma_log_beta, {archetype}" in captions


def test_job_page(pages, fitted):
    html_path, md_path = pages["job"]
    page = outline(html_path)
    top = [s for s in page.sections if " / " not in s]
    assert top == ["Run", "Sampler and convergence", "superspeedway"]
    summary = fitted["summaries"][fitted["ss"]]
    text = "".join(page.text)
    for fact in (summary.job_id, summary.dataset_sha256, "calq 0.1.0", "compile", "arviz"):
        assert fact in text
    assert "Energy: marginal energy against energy transitions (overlapping: good exploration)" in page.captions
    assert "Convergence per parameter group" in text and "Energy BFMI per chain" in text
    if getattr(summary, "attempts", None):  # every sampler attempt, when the engine records them
        assert "Every sampler attempt, in order" in text and "target accept" in text
    _assert_calibration_sections(page, "superspeedway", summary.tracks["superspeedway"], ["top_5"])
    for image in page.images:
        decode_png(image["src"])
    assert not any(s.startswith("Joint events") for s in page.sections)  # only under its archetype, below
    assert any(s.endswith("superspeedway / Joint events: co-hits") for s in page.sections)
    assert_safe(html_path)
    assert_markdown(md_path, page)


def test_posterior_page(pages, fitted):
    page = outline(pages["posterior"][0])
    summary = fitted["summaries"][fitted["ss"]]
    assert [s for s in page.sections if " / " not in s] == ["Run", "Sampler and convergence", "superspeedway"]
    assert summary.posterior_uri in "".join(page.text)
    _assert_calibration_sections(page, "superspeedway", summary.tracks["superspeedway"], ["top_5"])
    for image in page.images:
        decode_png(image["src"])
    assert_safe(pages["posterior"][0])


def test_latest_page_takes_each_event_from_its_newest_job(pages, fitted):
    html_path, md_path = pages["latest"]
    page = outline(html_path)
    summary = fitted["summaries"][fitted["all"]]
    assert [s for s in page.sections if " / " not in s] == ["Overview", *summary.archetypes, "Jobs"]
    assert {s for s in page.sections if s.count(" / ") == 1 and s.startswith("Jobs / ")} == {
        f"Jobs / job {fitted['ss']}", f"Jobs / job {fitted['all']}"
    }
    assert len(images_in(page, "Jobs")) == 2  # one energy plot per job
    text = "".join(page.text)
    # superspeedway: top_5 from the later superspeedway job, top_10 from the all job, each said
    assert f"top_5: from job {fitted['ss']} (a superspeedway job" in text
    assert f"top_10: from job {fitted['all']} (an all-archetype job" in text
    ss_parts = [s for s in page.sections if s.count(" / ") == 1 and s.startswith("superspeedway / ")]
    assert ss_parts == [f"superspeedway / top_5 from job {fitted['ss']}", f"superspeedway / top_10 from job {fitted['all']}"]
    _assert_calibration_sections(page, "superspeedway", [], ["top_5"], f"top_5 from job {fitted['ss']}")
    _assert_calibration_sections(page, "superspeedway", [], ["top_10"], f"top_10 from job {fitted['all']}")
    for archetype in summary.archetypes[1:]:
        assert f"top_5, top_10: from job {fitted['all']}" in text
        _assert_calibration_sections(page, archetype, [], ["top_5", "top_10"])
    for image in page.images:
        decode_png(image["src"])
    assert_safe(html_path)
    assert_markdown(md_path, page)


def test_latest_for_some_archetypes(fitted):
    client = CalibrationClient(fitted["settings"])
    slots = load_latest(client, ["road_course", "superspeedway"])
    assert {a for a, _ in slots} == {"road_course", "superspeedway"}
    assert slots[("superspeedway", "top_5")].summary.job_id == fitted["ss"]
    assert slots[("superspeedway", "top_10")].summary.job_id == fitted["all"]
    with pytest.raises(NotFound, match="no converged calibration of intermediate"):
        load_latest(CalibrationClient(Settings(storage_url=str(fitted["root"] / "empty"))), ["intermediate"])


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--job", "cj-000000000000000000000000", "--html", "x.html"], 1, "not found: no summary for job"),
        (["--job", "cj-000000000000000000000000"], 2, "add --html OUT.html or --md OUT.md"),
        (["--latest", "--html", "/proc/calq-report/latest.html"], 1, "ReportNotWritten: cannot write the report to /proc"),
    ],
)
def test_clear_errors_from_the_command(fitted, args, code, message):
    result = calq(fitted, "report", *args, check=False)
    assert result.returncode == code, result.stderr
    assert message in " ".join(result.stderr.split())


def test_clear_errors_for_missing_and_unreadable_files(fitted):
    client = CalibrationClient(fitted["settings"])
    with pytest.raises(NotFound, match=r"no posterior file at /nonexistent/cj-x\.nc"):
        load_posterior(client, "/nonexistent/cj-x.nc")
    with pytest.raises(NotFound, match="no summary for job"):
        load_job(client, "cj-000000000000000000000000")
    garbage = fitted["root"] / "garbage.nc"
    garbage.write_bytes(b"not a netcdf file")
    with pytest.raises(UnreadablePosterior, match="cannot read the posterior at file://"):
        load_posterior(client, str(garbage))
    text = fitted["root"] / "notes.txt"
    text.write_text("a text file")
    with pytest.raises(UnreadablePosterior, match="is not a posterior"):
        load_posterior(client, str(text))
    lonely = fitted["root"] / "lonely" / "cj-lonely.nc"
    lonely.parent.mkdir()
    shutil.copy(fitted["summaries"][fitted["ss"]].posterior_uri.removeprefix("file://"), lonely)
    with pytest.raises(NotFound, match="no summary beside the posterior"):
        load_posterior(client, str(lonely))
    with pytest.raises(UnreadablePosterior, match="holds no calq posterior"):
        load_posterior(client, str(_not_a_posterior(fitted["root"])))
    with pytest.raises(InvalidDataset, match=r"garbage\.nc"):
        dataset_page(garbage)


def _not_a_posterior(root: Path) -> Path:
    """A NetCDF file that is not an InferenceData of calq's: a dataset named like a posterior."""
    path = root / "other" / "cj-other.nc"
    path.parent.mkdir()
    return save_dataset(synthesize(seasons=1, scenarios=10, seed=0).isel(race=slice(0, 2)), path)


# -- in a browser ------------------------------------------------------------------------

#: Added to a copy of the page: lists broken images and the figures of each section, as JSON in #calq-check.
CHECKER = """
<script>
addEventListener("load", () => {
  const figures = [...document.querySelectorAll("figure")].map(f => {
    const img = f.querySelector("img");
    const sections = [];
    for (let s = f.closest("section"); s; s = s.parentElement.closest("section")) sections.unshift(s.dataset.section);
    return {alt: img.alt, caption: f.querySelector("figcaption").textContent, sections,
            loaded: img.complete && img.naturalWidth > 0, width: img.getBoundingClientRect().width};
  });
  const out = document.createElement("pre");
  out.id = "calq-check";
  out.textContent = JSON.stringify({figures, broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))
                                                                        .map(i => i.alt)});
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (.ci/run installs Debian's chromium); CI is set, so this is an error")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def browse(html_path: Path, out_dir: Path, *, checker: str = CHECKER) -> tuple[dict, Path]:
    """Open a copy of the page with ``checker`` in headless Chromium, 1280 px wide: its JSON and a screenshot.

    ``checker`` is a script that writes its findings as JSON into ``<pre id="calq-check">``.
    """
    browser = chromium()
    text = html_path.read_text(encoding="utf-8")
    # the page's policy forbids scripts; the copy lets the checker (and only inline scripts) run
    policy = 'http-equiv="Content-Security-Policy" content="'
    assert text.count(policy) == 1
    checked = text.replace(policy, policy + "script-src 'unsafe-inline'; ", 1).replace("</body>", checker + "</body>", 1)
    copy = out_dir / f"{html_path.stem}.checked.html"
    copy.write_text(checked, encoding="utf-8")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={out_dir / 'chromium-profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--window-size=1280,2400", "--dump-dom", copy.as_uri()], capture_output=True,
                         text=True, timeout=120)
    match = re.search(r'<pre id="calq-check">(.*?)</pre>', dom.stdout, re.S)
    assert match, f"the checker did not run: {dom.stderr[-2000:]}"
    import html as html_lib

    report = json.loads(html_lib.unescape(match.group(1)))
    shot = out_dir / f"{html_path.stem}.png"
    subprocess.run([*flags, "--window-size=1280,2400", f"--screenshot={shot}", html_path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    keep = os.environ.get("REPORT_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    return report, shot


@pytest.mark.parametrize("kind", ["raw", "job", "latest"])
def test_pages_in_a_browser(pages, kind, tmp_path):
    html_path = pages[kind][0]
    report, shot = browse(html_path, tmp_path)
    assert report["broken"] == []
    figures = report["figures"]
    assert figures and all(f["loaded"] and f["width"] > 300 for f in figures)
    expected = outline(html_path)
    assert [f["alt"] for f in figures] == [i["alt"] for i in expected.images]
    by_section = {}
    for f in figures:
        by_section.setdefault(f["sections"][0], []).append(f["caption"])
    if kind == "raw":
        for section in RAW_SECTIONS[1:]:
            assert by_section.get(section), section
        assert any("Reliability diagram, superspeedway" in c for c in by_section["Reliability of event probabilities"])
    else:
        assert any(c.startswith("Energy") for f in figures for c in [f["caption"]])
        for archetype in ["superspeedway"] if kind == "job" else ["superspeedway", "intermediate", "short_track", "road_course"]:
            captions = by_section[archetype]
            assert any(c.startswith(f"Calibrated curve q(p) with 94 % band per track, {archetype}") for c in captions)
            assert any(c.startswith(f"α and β forest per track, {archetype}") for c in captions)
            assert any(c.startswith(f"Rank plots of sigma_alpha and sigma_log_beta, {archetype}") for c in captions)
    # the screenshot shows a page: not blank, not one colour
    image = PILImage.open(shot).convert("L")
    assert image.size == (1280, 2400)
    lo, hi = image.getextrema()
    assert hi - lo > 100 and len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50

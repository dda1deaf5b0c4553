"""Hostile text on its way to a terminal or a page (issue 16): one sanitizer, every command.

Whoever can write a job record (anyone holding Redis's keys), a dataset or a
summary picks the characters calq later prints. These cases plant escape
sequences, OSC 8 links, bidi overrides and rich markup in a record's
``worker``, ``progress.phase`` and ``reason`` and in a dataset's race ids,
then run the commands a person runs (``status``, ``jobs``, ``wait``,
``cancel``, ``calibrate``) as subprocesses on a real store, and the report
pages, and assert that no control character reaches the output: each shows
as a visible escape, and markup as text.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from producer.report.page import escape_html, escape_markdown
from producer.sanitize import for_markup, visible
from shared.contract.job import CalibrationJob, JobState, Progress, SamplerSettings
from shared.contract.settings import Settings
from shared.jobs.registry import StoreRegistry
from shared.storage.store import Store
from tests.services import calq_environ, run_calq

CLEAR = "\x1b[2J\x1b[H"
OSC8 = "\x1b]8;;https://evil.example/\x1b\\click me\x1b]8;;\x1b\\"
BIDI = "abc\u202edcb"  # a right-to-left override: shows "abcbcd"
C1_CSI = "x\x9b31mred"
MARKUP = "[link=https://evil.example]x[/link][bold red]"
#: What must never reach a terminal from data: ESC, C1 CSI, BEL, CR, the bidi override.
FORBIDDEN = ("\x1b", "\x9b", "\x07", "\r", "\u202e")


def no_controls(text: str) -> None:
    for char in FORBIDDEN:
        assert char not in text, (char, text[-2000:])


# -- the sanitizer itself -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (CLEAR, "\\x1b[2J\\x1b[H"),
        ("a\rb", "a\\x0db"),
        (BIDI, "abc\\u202edcb"),
        (C1_CSI, "x\\x9b31mred"),
        ("bell\x07", "bell\\x07"),
        ("\u2066isolate\u2069", "\\u2066isolate\\u2069"),
        ("line one\nline two\tcol", "line one\nline two\tcol"),
        ("Daytona — Talladega, Ōkuma 🏁", "Daytona — Talladega, Ōkuma 🏁"),
        ("", ""),
    ],
)
def test_visible_escapes_controls_and_keeps_printable_text(raw, shown):
    assert visible(raw) == shown
    assert visible(visible(raw)) == visible(raw)  # idempotent: sanitised twice reads the same


def test_for_markup_is_plain_text_in_rich():
    console = Console(record=True, width=200, force_terminal=True, color_system=None)
    console.print(for_markup(MARKUP + CLEAR + OSC8))
    shown = console.export_text()
    assert "[link=https://evil.example]x[/link][bold red]" in shown
    no_controls(shown)


def test_report_pages_escape_the_same_characters():
    for escaped in (escape_html(CLEAR + OSC8 + BIDI), escape_markdown(CLEAR + OSC8 + BIDI)):
        no_controls(escaped)
    assert "\\x1b[2J" in escape_html(CLEAR)
    assert "&lt;script&gt;" in escape_html("<script>")


# -- every command, on a record someone else wrote -------------------------------------


@pytest.fixture
def planted(tmp_path):
    """A store holding three records written with hostile text, and the CLI's environment for it."""
    settings = Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=None)
    registry = StoreRegistry(Store.from_settings(settings))
    uri = "file://" + str(tmp_path / "store" / "datasets" / ("a" * 64 + ".nc"))
    jobs = [CalibrationJob(archetype="all", dataset_uri=uri, dataset_sha256="a" * 64,
                           sampler=SamplerSettings(warmup=10, samples=10, chains=1, seed=seed)) for seed in range(3)]
    for job in jobs:
        registry.claim(job)
    running, rejected, cancellable = (job.job_id for job in jobs)
    for job_id in (running, cancellable):
        registry.mark_running(job_id, worker="w" + CLEAR + OSC8)
        registry.progress(job_id, Progress(phase="sampling" + CLEAR + BIDI, fraction=0.5))
    registry.mark_running(rejected, worker="w" + C1_CSI)
    registry.reject(rejected, "invalid calibration dataset: duplicated race ids: " + CLEAR + OSC8 + MARKUP + BIDI)
    environ = calq_environ(CALQ_STORAGE_URL=str(tmp_path / "store"), COLUMNS="200", TERM="xterm-256color")
    return environ, {"running": running, "rejected": rejected, "cancellable": cancellable}, registry


def calq(environ, *args: str) -> subprocess.CompletedProcess:
    return run_calq(environ, Path.cwd(), *args, check=False, timeout=120)


@pytest.mark.parametrize(
    ("command", "which", "code"),
    [
        (("status",), "running", 0),
        (("status",), "rejected", 0),
        (("status", "--json"), "rejected", 0),
        (("jobs",), None, 0),
        (("jobs", "--json"), None, 0),
        (("wait", "--timeout", "1"), "rejected", 1),
        (("wait", "--timeout", "1"), "running", 3),
        (("cancel",), "cancellable", 0),
        (("cancel",), "rejected", 0),
    ],
)
def test_no_command_prints_a_control_character_from_a_record(planted, command, which, code):
    environ, ids, _ = planted
    args = [*command[:1], *([ids[which]] if which else []), *command[1:]]
    result = calq(environ, *args)
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    no_controls(result.stdout + result.stderr)
    if which == "rejected" and command[0] in ("status", "wait"):
        shown = result.stdout + result.stderr
        assert "\\x1b[2J" in shown or "\\u001b[2J" in shown  # shown, visibly, not swallowed


def test_a_cancelled_record_keeps_the_text_it_was_given(planted):
    environ, ids, registry = planted
    assert calq(environ, "cancel", ids["cancellable"]).returncode == 0
    assert registry.get(ids["cancellable"]).cancel_requested
    assert registry.get(ids["rejected"]).state is JobState.REJECTED  # nothing else changed


def test_log_lines_show_controls_visibly():
    import logging

    from producer.sanitize import VisibleFormatter

    record = logging.LogRecord("calq", logging.WARNING, __file__, 1, "job %s rejected: %s", ("cj-1", CLEAR + BIDI), None)
    line = VisibleFormatter("%(levelname)s %(message)s").format(record)
    no_controls(line)
    assert line == "WARNING job cj-1 rejected: \\x1b[2J\\x1b[Habc\\u202edcb"

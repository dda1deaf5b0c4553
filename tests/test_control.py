"""JobControl: progress out, time limit and cancellation in, on a fake clock."""

from __future__ import annotations

import logging

import pytest

from shared.contract.control import JobControl
from shared.contract.errors import JobCancelled, JobTimeLimitExceeded
from shared.contract.job import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_time_limit_starts_once_and_is_checked_at_each_phase():
    clock = Clock()
    control = JobControl(clock=clock).start(10)
    clock.now += 5
    control.start(1000)  # a second start never moves the limit later
    control.check("load")
    clock.now += 5.5
    with pytest.raises(JobTimeLimitExceeded, match=r"time limit of 10 s \(during compile\)"):
        control.check("compile")


def test_no_limit_and_no_source_never_stops():
    control = JobControl()
    for phase in ("fetch", "load", "compile", "sampling", "write"):
        control.check(phase)


def test_the_cancel_source_is_polled_at_most_every_poll_interval():
    clock = Clock()
    asked: list[float] = []
    answer: list[str | None] = [None]

    def source() -> str | None:
        asked.append(clock.now)
        return answer[0]

    control = JobControl(cancel_source=source, poll_s=1.0, clock=clock)
    for _ in range(4):  # four checks within 0.75 s: one read
        control.check("sampling")
        clock.now += 0.25
    assert len(asked) == 1
    answer[0] = "superseded"
    with pytest.raises(JobCancelled, match="cancelled during sampling: superseded"):
        control.check("sampling")  # 1 s after the first read: read again, and stop
    assert asked == [100.0, 101.0] and control.cancelled == "superseded"


def test_cancel_from_this_process_is_seen_at_the_next_check_without_polling():
    control = JobControl(cancel_source=lambda: None, poll_s=3600)
    control.check("fetch")
    control.cancel("interrupted (Ctrl-C)")
    control.cancel("a later reason")  # the first one stands
    with pytest.raises(JobCancelled, match=r"during load: interrupted \(Ctrl-C\)"):
        control.check("load")


def test_a_cancellation_wins_over_the_time_limit():
    clock = Clock()
    control = JobControl(clock=clock).start(1)
    clock.now += 2
    control.cancel("stop")
    with pytest.raises(JobCancelled):
        control.check("sampling")


def test_a_failing_cancel_source_is_logged_once_and_never_stops_the_job(caplog):
    clock = Clock()

    def down() -> str | None:
        raise ConnectionError("redis went away")

    control = JobControl(cancel_source=down, poll_s=0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="shared.contract.control"):
        for _ in range(5):
            control.check("sampling")
    assert caplog.text.count("could not read the cancel flag") == 1


def test_progress_goes_to_the_attached_callback():
    seen: list[str] = []
    control = JobControl()
    control.progress(Progress(phase="load"))  # nowhere to go: dropped
    control.attach(on_progress=lambda p: seen.append(p.phase))
    control.progress(Progress(phase="compile"))
    control(Progress(phase="warmup"))  # a JobControl is also a ProgressCallback
    assert seen == ["compile", "warmup"]

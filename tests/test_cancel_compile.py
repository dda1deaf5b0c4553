"""Cancellation during a compile (issue 16): the job stops within seconds, not when XLA is done.

XLA cannot be interrupted; a compile of a new bucket on a cold cache took
140 s and a cancellation sent during it waited 77 s. The sampler now
compiles in a thread and checks the job's control while it waits: these
tests stretch the compile to seconds and cancel (or time out) the job
during it.
"""

from __future__ import annotations

import time

import pytest

from shared.contract.control import JobControl
from shared.contract.errors import JobCancelled, JobTimeLimitExceeded
from shared.data.synth import synthesize
from shared.fit.calibrate import prepare
from shared.fit.sampler import CompiledSampler
from tests.test_calibrate import make_job

#: How long the stretched compile takes (as a cold compile of a large bucket would, only shorter).
SLOW_COMPILE_S = 6.0


@pytest.fixture(scope="module")
def prepared():
    return prepare(synthesize(seasons=1, scenarios=50, seed=5), make_job())


@pytest.fixture
def slow_sampler(prepared, monkeypatch):
    """A fresh sampler (nothing compiled) whose compile takes SLOW_COMPILE_S longer."""
    original = CompiledSampler.compile

    def slow(self, data):
        time.sleep(SLOW_COMPILE_S)
        return original(self, data)

    monkeypatch.setattr(CompiledSampler, "compile", slow)
    return CompiledSampler(prepared.bucket)


def test_a_job_cancelled_during_its_compile_stops_at_once_and_never_samples(prepared, slow_sampler):
    phases: list[str] = []
    started = time.monotonic()

    def source() -> str | None:
        return "superseded" if time.monotonic() - started > 1.0 else None

    control = JobControl(on_progress=lambda p: phases.append(p.phase), cancel_source=source, poll_s=0.2)
    with pytest.raises(JobCancelled, match="cancelled during compile: superseded"):
        slow_sampler.run(prepared.data, seed=1, samples=20, control=control)
    assert time.monotonic() - started < SLOW_COMPILE_S / 2  # not when the compile ends
    assert phases == []  # no chunk ran: no warmup, no draws
    deadline = time.monotonic() + 300
    while slow_sampler._compiled is None and time.monotonic() < deadline:  # finished in the background
        time.sleep(0.2)
    assert slow_sampler._compiled is not None
    draws = slow_sampler.run(prepared.data, seed=1, samples=20, control=JobControl())  # the next job reuses it
    assert draws.params["alpha_arch"].shape[:2] == (prepared.bucket.chains, 20)


def test_a_time_limit_reached_during_a_compile_stops_the_job_there(prepared, slow_sampler):
    started = time.monotonic()
    with pytest.raises(JobTimeLimitExceeded, match="during compile"):
        slow_sampler.run(prepared.data, seed=1, samples=20, control=JobControl().start(1.0))
    assert time.monotonic() - started < SLOW_COMPILE_S / 2

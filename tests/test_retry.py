"""The retry primitive (shared.contract.retry): the backoff rule and the budgeted loop, on a fake clock."""

from __future__ import annotations

import pytest

from shared.contract.errors import BrokerUnavailable, InvalidJob, StorageUnavailable
from shared.contract.retry import backoff, is_transient, retry_transient


class Clock:
    """A fake monotonic clock that sleeping advances."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def flaky(fault: BaseException, times: int):
    calls = {"n": 0}

    def call():
        calls["n"] += 1
        if calls["n"] <= times:
            raise fault
        return "written"

    return call, calls


def test_backoff_doubles_from_first_and_is_capped():
    assert [backoff(n, first=1, most=30) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff(0, first=0.5, most=5) == 0.5  # no failure yet counts as one
    assert backoff(10_000, first=1, most=30) == 30  # no overflow


def test_transient_faults_are_retried_with_doubling_pauses_and_heard():
    clock, heard = Clock(), []
    call, calls = flaky(StorageUnavailable("down"), 3)
    result = retry_transient(call, budget_s=60, first_s=1, max_s=4, on_wait=lambda f, left: heard.append(left),
                             sleep=clock.sleep, clock=clock)
    assert result == "written" and calls["n"] == 4
    assert clock.pauses == [1, 2, 4]
    assert heard == [60, 59, 57]  # seconds left at each fault


def test_a_pause_that_would_pass_the_budget_is_not_taken():
    clock = Clock()
    call, calls = flaky(BrokerUnavailable("down"), 100)
    with pytest.raises(BrokerUnavailable):
        retry_transient(call, budget_s=10, first_s=1, max_s=4, sleep=clock.sleep, clock=clock)
    assert clock.pauses == [1, 2, 4] and calls["n"] == 4


def test_to_the_end_cuts_the_last_pause_and_tries_at_the_budget():
    clock = Clock()
    call, calls = flaky(BrokerUnavailable("down"), 100)
    with pytest.raises(BrokerUnavailable):
        retry_transient(call, budget_s=10, first_s=1, max_s=4, to_the_end=True, sleep=clock.sleep, clock=clock)
    assert clock.pauses == [1, 2, 4, 3] and calls["n"] == 5


def test_a_permanent_fault_is_raised_at_once():
    call, calls = flaky(InvalidJob("bad"), 5)
    with pytest.raises(InvalidJob):
        retry_transient(call, budget_s=60, first_s=1, max_s=4, sleep=lambda _: pytest.fail("slept"))
    assert calls["n"] == 1


def test_a_fault_type_with_its_own_budget():
    clock = Clock()
    call, _ = flaky(PermissionError("no"), 100)  # not transient by classify; retried for its own budget
    with pytest.raises(PermissionError):
        retry_transient(call, budget_s=60, first_s=1, max_s=4, budgets={PermissionError: 3},
                        sleep=clock.sleep, clock=clock)
    assert clock.pauses == [1, 2]


def test_the_caller_may_narrow_what_is_transient():
    call, calls = flaky(TimeoutError("a wait ran out"), 5)
    with pytest.raises(TimeoutError):
        retry_transient(call, budget_s=60, first_s=1, max_s=4, transient=lambda f: isinstance(f, BrokerUnavailable),
                        sleep=lambda _: pytest.fail("slept"))
    assert calls["n"] == 1 and is_transient(TimeoutError())

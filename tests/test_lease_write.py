"""The patient write (shared.jobs.spool) and the patient registry (shared.jobs.registry.patient): outages cost waiting, not fits."""

from __future__ import annotations

import errno

import pytest

from shared.contract.errors import BrokerUnavailable, JobFailed, StorageUnavailable
from shared.contract.settings import RecoverySettings, Settings
from shared.jobs.spool import patiently
from tests.test_retry import Clock, flaky

RECOVERY = RecoverySettings(write_budget_s=10, permission_budget_s=3, retry_first_s=1, retry_max_s=4)


def test_a_transient_fault_is_retried_with_doubling_pauses():
    clock = Clock()
    heard = []
    action, calls = flaky(StorageUnavailable("endpoint down"), 3)
    result = patiently(action, what="the posterior", recovery=RECOVERY, on_wait=heard.append,
                       sleep=clock.sleep, clock=clock)
    assert result == "written" and calls["n"] == 4
    assert clock.pauses == [1, 2, 4]
    assert [type(e) for e in heard] == [StorageUnavailable] * 3


def test_an_outage_past_the_budget_fails_the_job_clearly():
    clock = Clock()
    action, _ = flaky(StorageUnavailable("endpoint down"), 100)
    with pytest.raises(JobFailed, match=r"could not write the posterior: storage unavailable .*write_budget_s = 10"):
        patiently(action, what="the posterior", recovery=RECOVERY, sleep=clock.sleep, clock=clock)
    assert sum(clock.pauses) <= RECOVERY.write_budget_s
    assert clock.pauses == [1, 2, 4]  # the next pause would pass the budget


def test_a_transient_permission_error_is_retried_and_a_lasting_one_fails():
    clock = Clock()
    action, _ = flaky(PermissionError(errno.EPERM, "Operation not permitted"), 1)
    assert patiently(action, what="the spool file", recovery=RECOVERY, sleep=clock.sleep, clock=clock) == "written"
    action, _ = flaky(PermissionError(errno.EPERM, "Operation not permitted"), 100)
    with pytest.raises(JobFailed, match="permission denied writing the spool file"):
        patiently(action, what="the spool file", recovery=RECOVERY, sleep=Clock().sleep, clock=Clock())


def test_a_permanent_error_is_not_retried():
    action, calls = flaky(ValueError("bad attribute"), 5)
    with pytest.raises(ValueError):
        patiently(action, what="x", recovery=RECOVERY, sleep=lambda _: pytest.fail("slept"))
    assert calls["n"] == 1


def test_the_final_record_change_waits_for_redis():
    from shared.jobs.registry.patient import PatientRegistry

    class Registry:
        def __init__(self):
            self.calls = 0

        def succeed(self, job_id, summary):
            self.calls += 1
            if self.calls < 3:
                raise BrokerUnavailable("Redis unavailable")
            return "recorded"

        def progress(self, job_id, progress):
            raise BrokerUnavailable("Redis unavailable")

    inner = Registry()
    pauses = []
    settings = Settings(recovery=RECOVERY)
    patient = PatientRegistry(inner, settings, sleep=pauses.append)
    assert patient.succeed("cj-1", None) == "recorded" and inner.calls == 3
    assert pauses == [1, 2]
    with pytest.raises(BrokerUnavailable):  # progress is best-effort: not retried here
        patient.progress("cj-1", None)

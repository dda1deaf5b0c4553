"""The exit codes of every ``calq`` command, in one table.

====  ===================  ==============================================================
code  name                 when
====  ===================  ==============================================================
0     ``OK``               the command did what it was asked; a waited-for job succeeded
1     ``FAILED``           a job failed or was rejected; any other error calq reports
2     ``USAGE``            a usage mistake, in one line: a bad option or argument (an unknown
                           archetype or event, a missing file), or invalid settings (naming the
                           ``CALQ_`` variable)
3     ``TIMED_OUT``        ``wait`` (or ``calibrate`` on the fleet) gave up waiting
4     ``CANCELLED``        the job was cancelled (``calq cancel``, or Ctrl-C)
5     ``UNREACHABLE``      could not reach the fleet: Redis or the store, for the whole wait
====  ===================  ==============================================================

Where a command waits for several jobs, the most telling code wins, in the
order 5, 4, 1, 3 (an outage explains everything after it; a cancellation
is what the person asked for; a failure is worth more than a timeout).
The README shows this table; ``tests/test_exit_codes.py`` checks both agree.

No other code comes back from a command: an unexpected error is 1 (its
traceback only with ``calq --debug``), and Ctrl-C is 4 however often it is
pressed (typer's 130 for a KeyboardInterrupt is turned into 4, and a Ctrl-C
while calq is already exiting ends it at once with 4). Only a Ctrl-C before
calq's entry point runs, while Python is still importing it, ends with
Python's own 130.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

from shared.contract.errors import RetryableError
from shared.contract.job import JobState


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    TIMED_OUT = 3
    CANCELLED = 4
    UNREACHABLE = 5


_BY_STATE = {
    JobState.SUCCEEDED: ExitCode.OK,
    JobState.FAILED: ExitCode.FAILED,
    JobState.REJECTED: ExitCode.FAILED,
    JobState.CANCELLED: ExitCode.CANCELLED,
}

#: Which code wins when one command ends with several (higher first).
_PRECEDENCE = [ExitCode.UNREACHABLE, ExitCode.CANCELLED, ExitCode.FAILED, ExitCode.TIMED_OUT, ExitCode.USAGE, ExitCode.OK]


def for_state(state: JobState | str) -> ExitCode:
    """The exit code of a job that ended in ``state`` (an unfinished one has not ended: TIMED_OUT)."""
    return _BY_STATE.get(JobState(state), ExitCode.TIMED_OUT)


def for_error(exc: BaseException) -> ExitCode:
    """The exit code of an error that ends a command."""
    if isinstance(exc, RetryableError):
        return ExitCode.UNREACHABLE
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.CANCELLED
    if isinstance(exc, TimeoutError):
        return ExitCode.TIMED_OUT
    return ExitCode.FAILED


def worst(codes: Iterable[ExitCode]) -> ExitCode:
    """The one code for a command that ended with several (see the module docstring)."""
    found = set(codes)
    return next((code for code in _PRECEDENCE if code in found), ExitCode.OK)

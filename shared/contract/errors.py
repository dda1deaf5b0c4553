"""calq's exception tree.

Every error calq raises on purpose derives from :class:`CalqError`. The split
that matters to the fleet is whether trying again can help::

    CalqError
    ├── RetryableError          transient fault; the job is retried with backoff
    │   ├── StorageUnavailable  object store unreachable or timing out
    │   └── BrokerUnavailable   Redis unreachable
    ├── RejectedError           permanent: bad input, never retried
    │   ├── InvalidJob          the job message fails its schema
    │   ├── DatasetNotFound     the dataset URI points at nothing
    │   ├── DatasetHashMismatch the bytes at the URI are not the ones the job names
    │   └── InvalidDataset      the dataset breaks the contract (one problem per line)
    ├── JobFailed               the job ran and could not finish (time limit,
    │   └── JobTimeLimitExceeded  numerical failure); not retried automatically
    └── NotFound                a lookup (job, summary, posterior) found nothing

Non-convergence is *not* an error: it is a flag with reasons in the summary.
:func:`classify` is the one place that maps any exception to an outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum


class CalqError(Exception):
    """Base of every error calq raises deliberately."""


class RetryableError(CalqError):
    """A transient fault: the same job may well succeed if tried again."""


class StorageUnavailable(RetryableError):
    """The object store could not be reached or did not answer in time."""


class BrokerUnavailable(RetryableError):
    """The broker or result backend could not be reached."""


class RejectedError(CalqError):
    """A permanent fault in the input: retrying can never help."""


class InvalidJob(RejectedError):
    """The job message does not satisfy the job schema."""


class DatasetNotFound(RejectedError):
    """Nothing exists at the dataset URI the job names."""


class DatasetHashMismatch(RejectedError):
    """The dataset's content hash differs from the one the job was submitted with."""

    def __init__(self, uri: str, expected: str, actual: str) -> None:
        super().__init__(
            f"dataset {uri} has sha256 {actual}, but the job names {expected}: "
            "the file changed after submission"
        )
        self.uri, self.expected, self.actual = uri, expected, actual


class InvalidDataset(RejectedError):
    """The dataset breaks the calibration-dataset contract.

    ``problems`` holds one human-readable line per distinct problem, so a
    producer can fix all of them in one go.
    """

    def __init__(self, problems: Sequence[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" ({source})" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid calibration dataset{where}:\n{lines}")


class JobFailed(CalqError):
    """The job started but could not complete."""


class JobTimeLimitExceeded(JobFailed):
    """The job ran past its time limit; checked between sampling chunks."""


class JobCancelled(JobFailed):
    """The job was cancelled while it ran."""


class NotFound(CalqError, LookupError):
    """A job, summary or posterior that was asked for does not exist."""


class Outcome(str, Enum):
    RETRY = "retry"
    REJECT = "reject"
    FAIL = "fail"


def classify(exc: BaseException) -> Outcome:
    """Map an exception raised while running a job to what the fleet does next.

    Connection and timeout errors from the standard library and from the
    clients calq uses count as retryable; validation errors of the job
    message count as rejections; everything else is a failure, recorded
    with its reason and not retried blindly.
    """
    if isinstance(exc, RetryableError):
        return Outcome.RETRY
    if isinstance(exc, RejectedError):
        return Outcome.REJECT
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return Outcome.RETRY
    try:
        import pydantic

        if isinstance(exc, pydantic.ValidationError):
            return Outcome.REJECT
    except ImportError:  # pragma: no cover - pydantic is a hard dependency
        pass
    try:
        import redis.exceptions

        if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            return Outcome.RETRY
    except ImportError:  # pragma: no cover
        pass
    return Outcome.FAIL

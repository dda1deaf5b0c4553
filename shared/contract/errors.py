"""calq's exception tree.

Every error calq raises on purpose derives from :class:`CalqError`. The split
that matters to the fleet is whether trying again can help::

    CalqError
    ├── RetryableError          transient fault; the job is retried with backoff
    │   ├── StorageUnavailable  object store unreachable or timing out
    │   ├── BrokerUnavailable   Redis unreachable, or refusing writes (out of memory, MISCONF)
    │   └── ApiUnavailable      the calibration API unreachable or overloaded
    ├── RejectedError           permanent: bad input, never retried
    │   ├── InvalidJob          the job message fails its schema
    │   ├── DatasetNotFound     nothing at the job's own content address in the store
    │   ├── DatasetNotAllowed   the URI is not the store's content address (one message, no oracle)
    │   ├── DatasetHashMismatch the bytes at the URI are not the ones the job names
    │   ├── InvalidDataset      the dataset breaks the contract or a limit (one problem per line)
    │   ├── JobOverLimit        the job asks for more than this worker's caps
    │   └── OverQuota           the API token's quota (jobs at once, largest job) refuses the job
    ├── JobFailed               the job ran and could not finish (time limit,
    │   └── JobTimeLimitExceeded  numerical failure); not retried automatically
    ├── AuthenticationFailed    a wrong password or key (Redis, S3): permanent, never "unavailable"
    └── NotFound                a lookup (job, summary, posterior) found nothing
        ├── CorruptRecord       the job's record is there but unreadable (a resubmission replaces it)
        └── Unverified          a store object no worker vouches for (unsigned, forged, misplaced): skipped as absent

Non-convergence is *not* an error: it is a flag with reasons in the summary.
:func:`classify` is the one place that maps any exception to an outcome.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from enum import Enum


class CalqError(Exception):
    """Base of every error calq raises deliberately."""


class RetryableError(CalqError):
    """A transient fault: the same job may well succeed if tried again."""


class StorageUnavailable(RetryableError):
    """The object store could not be reached or did not answer in time."""


class BrokerUnavailable(RetryableError):
    """The broker or result backend could not be reached."""


class ApiUnavailable(RetryableError):
    """The calibration API could not be reached, timed out, or answered 5xx."""


class RejectedError(CalqError):
    """A permanent fault in the input: retrying can never help."""


class InvalidJob(RejectedError):
    """The job message does not satisfy the job schema."""


class DatasetNotFound(RejectedError):
    """Nothing exists at the dataset URI the job names."""


class DatasetNotAllowed(RejectedError):
    """The dataset URI is not where a job may read: its content address in the store.

    The message is one constant sentence: it says nothing about the target
    (whether it exists, its size or hash), so a job cannot probe the worker.
    """

    MESSAGE = (
        "dataset_uri is not this store's content address for dataset_sha256: a job reads its dataset only "
        "from the store, at datasets/<sha256>.nc under the store's prefix (upload it first)"
    )

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class DatasetHashMismatch(RejectedError):
    """The bytes at the dataset's address do not hash to the sha256 the job names.

    The message never holds the actual hash (no hash oracle).
    """

    def __init__(self, uri: str, expected: str, actual: str) -> None:
        super().__init__(f"dataset {uri}: its bytes do not have sha256 {expected}, the hash the job names")
        self.uri, self.expected, self.actual = uri, expected, actual

    @staticmethod
    def is_reason(reason: str | None) -> bool:
        """Whether a recorded rejection ``reason`` is this error's message, whole (and nothing else's).

        Such a job was refused for bytes at its address that need not be its
        producer's (anyone holding the store's key can put some there first).
        """
        return reason is not None and _MISMATCH_REASON.fullmatch(reason) is not None


#: :class:`DatasetHashMismatch`'s message (the URI is the store's content address: no newline, no text of the data).
_MISMATCH_REASON = re.compile(r"dataset [^\n]+: its bytes do not have sha256 [0-9a-f]{64}, the hash the job names")


class InvalidDataset(RejectedError):
    """The dataset breaks the calibration-dataset contract.

    ``problems`` holds one human-readable line per distinct problem, so a
    producer can fix all of them in one go.

    ``intrinsic`` is True only when the file's own bytes are at fault
    (unreadable, over a limit, breaking the contract), never for a problem
    of one job's choice (an archetype or window without races): only then
    may a worker delete the stored copy. ``kind`` names what the file was
    meant to be in the message's first line: a calibration dataset, or a
    posterior (the same checks guard both).
    """

    def __init__(
        self, problems: Sequence[str], *, source: str | None = None, intrinsic: bool = False,
        kind: str = "calibration dataset",
    ) -> None:
        self.problems = list(problems)
        self.source = source
        self.intrinsic = intrinsic
        where = f" ({source})" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {kind}{where}:\n{lines}")


class JobOverLimit(RejectedError):
    """The job asks for more than the worker's caps allow (chains, draws, events)."""


class OverQuota(RejectedError):
    """The API token may not submit this job now: too many of its jobs queued or running, or the job is too large.

    ``retry_after_s`` says when trying again may help (None: never, the job itself is too large).
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AuthenticationFailed(CalqError):
    """A service refused calq's credentials: permanent until the settings are fixed."""


class JobFailed(CalqError):
    """The job started but could not complete."""


class JobTimeLimitExceeded(JobFailed):
    """The job ran past its time limit; checked between sampling chunks."""


class JobCancelled(JobFailed):
    """The job was cancelled while it ran."""


class NotFound(CalqError, LookupError):
    """A job, summary or posterior that was asked for does not exist."""


class Unverified(NotFound):
    """A summary or posterior in the store that no worker vouches for: skipped, as if absent.

    Unsigned or signed under another key (with ``signing_key`` set), lying
    outside its own keys, or a posterior whose bytes are not the ones its
    signed summary records. The message names the object, never its content.
    """


class CorruptRecord(NotFound):
    """A job's record exists but cannot be used (not JSON, unknown state, another job's); its bytes are not quoted."""


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
    if is_authentication_failure(exc):
        return Outcome.FAIL
    if redis_refusing_writes(exc) is not None:
        return Outcome.RETRY
    try:
        import redis.exceptions

        if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            return Outcome.RETRY
    except ImportError:  # pragma: no cover
        pass
    return Outcome.FAIL


_S3_AUTH_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"}
)



@contextlib.contextmanager
def transient_as_retryable() -> Iterator[None]:
    """A transient fault from outside calq's own tree (Redis or the store out) becomes a RetryableError.

    The Celery task retries RetryableError (its ``autoretry_for``); :func:`classify` decides what is transient.
    """
    try:
        yield
    except RetryableError:
        raise
    except Exception as exc:
        if classify(exc) is Outcome.RETRY:
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
        raise


#: Redis's answers that mean "full" or "cannot persist, so no writes" (the error code redis-py strips from
#: the message is in its exception class): transient, fixed on the server's side.
_REDIS_REFUSALS = (
    ("OOM", "OutOfMemoryError",
     "Redis is out of memory (maxmemory reached under noeviction) and refuses writes until memory is freed"),
    ("MISCONF", None, "Redis cannot persist to disk (MISCONF) and refuses writes until its disk is fixed"),
    ("READONLY", "ReadOnlyError", "Redis is a read-only replica and refuses writes until it is promoted"),
)


def redis_refusing_writes(exc: BaseException) -> str | None:
    """Why Redis refuses writes for now (out of memory, cannot persist, read-only), or None.

    Such an answer is transient (:func:`classify` retries it): whoever
    writes waits through it as through an outage. The reason is calq's own
    words, never the server's text.
    """
    for current in causes(exc):
        names = {cls.__name__ for cls in type(current).__mro__}
        if "ResponseError" not in names:
            continue
        text = str(current)
        for code, name, why in _REDIS_REFUSALS:
            if name in names or text.startswith(code) or getattr(current, "status_code", None) == code:
                return why
    return None


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_authentication_failure(exc: BaseException) -> bool:
    """True if ``exc`` (or what caused it) is a refused password or key.

    Redis raises ``redis.AuthenticationError`` (a subclass of its
    ``ConnectionError``, hence the check before the retryable ones) or a
    ``ResponseError`` "WRONGPASS"/"NOAUTH"; S3 answers 403 with an access-key
    or signature error code.
    """
    for current in causes(exc):
        if isinstance(current, AuthenticationFailed):
            return True
        names = {cls.__name__ for cls in type(current).__mro__}
        if names & {"AuthenticationError", "AuthenticationRequiredError", "AuthenticationWrongNumberOfArgsError"}:
            return True
        if "ResponseError" in names and str(current).startswith(("WRONGPASS", "NOAUTH")):
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in _S3_AUTH_CODES:
            return True
    return False

"""shared.contract.errors: classify, the one place an exception becomes retry, reject or fail (fast tier, no services)."""

from __future__ import annotations

import redis

from shared.contract.errors import AuthenticationFailed, Outcome, classify


def test_a_refused_password_is_a_failure_and_an_unreachable_redis_a_retry():
    assert classify(AuthenticationFailed("authentication failed")) is Outcome.FAIL
    assert classify(redis.AuthenticationError("invalid password")) is Outcome.FAIL
    assert classify(redis.ConnectionError("refused")) is Outcome.RETRY

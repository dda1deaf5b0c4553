"""Hostile cases of issue 18, "Exactly once under partitions", that need no worker process.

A Redis that refuses writes (out of memory, cannot persist), dead
connections, a stale worker that lost its lease, a flushed Redis, a full
disk. The cases with real workers and supervisors are in the fault suite
(tests/test_faults.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.exceptions as rex

from shared.contract.errors import BrokerUnavailable, Outcome, classify, redis_refusing_writes
from shared.contract.settings import RecoverySettings, Settings
from shared.jobs.celery_app import celery_config
from shared.jobs.registry import RedisRegistry
from tests.test_registry import make_job

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def out_of_memory(url: str) -> Iterator[None]:
    """Redis at ``url`` refuses every write (``maxmemory 1`` under ``noeviction``) inside the block."""
    client = redis.Redis.from_url(url)
    before = client.config_get("maxmemory")["maxmemory"], client.config_get("maxmemory-policy")["maxmemory-policy"]
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    try:
        yield
    finally:
        client.config_set("maxmemory", before[0])
        client.config_set("maxmemory-policy", before[1])
        client.close()


# -- Redis refusing writes ------------------------------------------------------------------


@pytest.mark.parametrize("error", [
    rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    rex.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist"),
    rex.ReadOnlyError("You can't write against a read only replica."),
], ids=["oom", "misconf", "readonly"])
def test_a_redis_that_refuses_writes_for_now_is_transient(error):
    assert classify(error) is Outcome.RETRY
    why = redis_refusing_writes(RuntimeError("wrapped")) or redis_refusing_writes(error)
    assert why is not None and "refuses writes" in why and str(error) not in why  # calq's words, not the server's


def test_other_redis_answers_are_not_a_refusal_to_write():
    assert redis_refusing_writes(rex.ResponseError("ERR unknown command")) is None
    assert classify(rex.ResponseError("ERR unknown command")) is Outcome.FAIL


@pytest.mark.integration
def test_a_claim_on_a_redis_out_of_memory_is_broker_unavailable(redis_url):
    registry = RedisRegistry.from_url(redis_url)
    with out_of_memory(redis_url), pytest.raises(BrokerUnavailable, match="refuses writes: Redis is out of memory"):
        registry.claim(make_job())
    assert registry.find(make_job().job_id) is None  # nothing half-written


@pytest.mark.integration
def test_calq_submit_on_a_redis_out_of_memory_exits_5_with_one_line(redis_url, tmp_path):
    from shared.data.dataset import save_dataset
    from shared.data.synth import synthesize

    dataset = tmp_path / "season.nc"
    save_dataset(synthesize(seasons=1, scenarios=50, seed=3), dataset)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALQ_")}
    env.update(CALQ_BROKER_URL=redis_url, CALQ_STORAGE_URL=str(tmp_path / "store"), PYTHONPATH=str(ROOT))
    with out_of_memory(redis_url):
        done = subprocess.run([sys.executable, "-m", "producer.cli", "submit", str(dataset), "--archetype", "intermediate",
                               "--events", "top_5", "--warmup", "10", "--samples", "10", "--chains", "1"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 5, done.stderr[-2000:]
    assert "refuses writes: Redis is out of memory" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


# -- dead connections noticed in seconds ------------------------------------------------------


def test_every_redis_client_has_timeouts_keepalive_and_a_health_check(redis_url):
    recovery = RecoverySettings(redis_timeout_s=3, redis_keepalive_s=7, redis_health_check_s=9)
    registry = RedisRegistry.from_url(redis_url, recovery=recovery)
    kwargs = registry.redis.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 3 and kwargs["socket_connect_timeout"] == 3
    assert kwargs["socket_keepalive"] is True and kwargs["health_check_interval"] == 9
    assert set(kwargs["socket_keepalive_options"].values()) <= {7, 3}

    conf = celery_config(Settings(broker_url=redis_url, recovery=recovery))
    broker = conf["broker_transport_options"]
    assert broker["socket_timeout"] == 3 and broker["socket_keepalive"] is True and broker["health_check_interval"] == 9
    assert conf["redis_socket_timeout"] == 3 and conf["redis_socket_keepalive"] is True
    assert conf["redis_backend_health_check_interval"] == 9

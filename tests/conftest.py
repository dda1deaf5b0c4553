"""Test-wide setup. The device is chosen here, before anything imports JAX."""

from __future__ import annotations

import os

# Tests always run on the CPU, with four host devices so chains run in parallel.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import pytest  # noqa: E402

pytest_plugins = ["tests.services"]

from shared.settings import Settings  # noqa: E402


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Embedded-mode settings on a private local store."""
    return Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=str(tmp_path / "jax-cache"))

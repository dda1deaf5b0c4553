"""Test-wide setup. The device is chosen here, before anything imports JAX.

Tests are hermetic: a developer's exported ``CALQ_*`` variables and ``.env``
file never change what a test does. Tests that need settings build them
(``Settings(...)``) or pass an explicit environment to the subprocess they start
(:func:`tests.services.calq_environ`).

One JAX compile cache serves the whole session: :func:`pytest_configure` opens
it in the session's temporary folder before any test module imports JAX, and
every calq process a test starts inherits it (see
:func:`tests.services.share_compile_cache`). It starts empty each session.
"""

from __future__ import annotations

import os

from shared.fit.device import use_host_devices  # imports no JAX and reads no settings

for _name in [name for name in os.environ if name.startswith("CALQ_")]:
    del os.environ[_name]

# Tests always run on the CPU, with the host devices a CPU worker gets, so chains
# run in parallel and an embedded run lays chains out as a worker does.
os.environ["JAX_PLATFORMS"] = "cpu"
use_host_devices()

import pytest  # noqa: E402

pytest_plugins = ["tests.services"]

from shared.contract.settings import Settings  # noqa: E402

Settings.model_config["env_file"] = None  # a .env in the working directory is the developer's, not the test's


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin has set up the session's base folder
def pytest_configure(config: pytest.Config) -> None:
    """Open the session's compile cache (an xdist worker keeps the one its controller opened)."""
    from tests.services import share_compile_cache  # imported here: the plugin line above loads it (and rewrites its asserts)

    if not hasattr(config, "workerinput"):
        share_compile_cache(config._tmp_path_factory.getbasetemp() / "jax-cache")


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Embedded-mode settings on a private local store, compiling through the session's cache."""
    from tests.services import session_compile_cache

    return Settings(storage_url=str(tmp_path / "store"), compile_cache_dir=session_compile_cache())

"""Device choice, made once at process start, before JAX is imported.

On a CPU, JAX sees one device unless told otherwise, and chains can then only
be vectorised. Forcing one host device per default chain lets chains run in
parallel: on this 2-core machine four chains on four devices sampled about
2× faster than on one (bench/engine.py). Two devices × two vectorised chains
sampled no faster per leapfrog step and compiled twice as slowly. The flag must be
in ``XLA_FLAGS`` before JAX initialises, so the CLI calls
:func:`use_host_devices` first thing, and the worker supervisor writes the
flag into each CPU child's environment.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import MutableMapping

#: Host devices a CPU process gets: one per default chain.
HOST_DEVICES = 4
_FLAG = "--xla_force_host_platform_device_count"
_FLAG_PATTERN = re.compile(re.escape(_FLAG) + r"(=\S*)?")


def without_host_devices(flags: str) -> str:
    """``XLA_FLAGS`` with any host-device count removed."""
    return " ".join(_FLAG_PATTERN.sub("", flags).split())


def with_host_devices(flags: str, n: int = HOST_DEVICES) -> str:
    """``XLA_FLAGS`` forcing ``n`` host devices (replacing any count already there)."""
    return f"{without_host_devices(flags)} {_FLAG}={n}".strip()


def use_host_devices(n: int = HOST_DEVICES, *, environ: MutableMapping[str, str] = os.environ) -> bool:
    """For an in-process run on the CPU: give JAX ``n`` host devices.

    Leaves everything alone (and returns False) when JAX is already imported,
    when ``XLA_FLAGS`` already sets a count, or when ``JAX_PLATFORMS`` asks
    for an accelerator only.
    """
    if "jax" in sys.modules or _FLAG in environ.get("XLA_FLAGS", ""):
        return False
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(","):
        return False
    environ["XLA_FLAGS"] = with_host_devices(environ.get("XLA_FLAGS", ""), n)
    return True

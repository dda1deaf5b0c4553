"""Device choice before JAX starts: host devices for parallel chains on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

from shared.fit.device import HOST_DEVICES, use_host_devices, with_host_devices, without_host_devices


def run_python(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_flags_are_replaced_not_repeated():
    flags = "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"
    assert without_host_devices(flags) == "--xla_cpu_foo=1"
    assert with_host_devices(flags, 8) == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"


def test_a_fresh_cpu_process_gets_host_devices_before_jax_starts():
    code = "from shared.fit.device import use_host_devices; print(use_host_devices()); import jax; print(jax.local_device_count())"
    assert run_python(code, JAX_PLATFORMS="cpu").split() == ["True", str(HOST_DEVICES)]


def test_it_leaves_an_explicit_choice_alone():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert use_host_devices(environ=environ) is False and environ["XLA_FLAGS"].endswith("=2")
    code = "from shared.fit.device import use_host_devices; print(use_host_devices())"
    assert run_python(code, JAX_PLATFORMS="cuda") == "False"

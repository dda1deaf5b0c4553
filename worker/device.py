"""The worker process's device check, once at process start (``worker_process_init``).

A worker started with ``JAX_PLATFORMS=cuda`` must see a GPU: one that does
not logs why and exits with
:attr:`~worker.exit_codes.WorkerExit.DEVICE_UNAVAILABLE`, which its
supervisor does not restart, rather than quietly running GPU jobs on the
CPU. Imports JAX: only in the process that runs jobs, never in one that forks.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from worker.exit_codes import WorkerExit

log = logging.getLogger(__name__)


def device_problem(environ: Mapping[str, str] | None = None) -> str | None:
    """Why this process's JAX device is not the one it was started for, or None if it is.

    Only ``JAX_PLATFORMS=cuda`` is checked: such a worker must see a GPU.
    """
    environ = os.environ if environ is None else environ
    wanted = environ.get("JAX_PLATFORMS", "").strip().lower()
    try:
        import jax

        devices = jax.devices()
    except Exception as exc:
        return (
            f"JAX could not initialise the {wanted or 'default'} backend "
            f"({type(exc).__name__}: {str(exc) or 'no details'}); is jax[cuda12] installed and a GPU visible?"
        )
    log.info("JAX devices: %s", ", ".join(f"{d.platform}:{d.id}" for d in devices))
    if wanted == "cuda" and (not devices or devices[0].platform != "gpu"):
        return f"started with JAX_PLATFORMS=cuda but JAX runs on {devices[0].platform if devices else 'nothing'}"
    return None


def exit_unless_device_fits() -> None:
    """Exit this process at once with DEVICE_UNAVAILABLE if :func:`device_problem` finds one."""
    problem = device_problem()
    if problem is None:
        return
    log.error("%s (CUDA_VISIBLE_DEVICES=%r); exiting rather than running GPU jobs on the CPU",
              problem, os.environ.get("CUDA_VISIBLE_DEVICES"))
    logging.shutdown()
    sys.stderr.flush()
    os._exit(WorkerExit.DEVICE_UNAVAILABLE)

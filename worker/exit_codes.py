"""The exit codes of the worker's processes, in one table (as :mod:`producer.exit_codes` is for ``calq``).

Two processes exit: the supervisor (``calq worker``, ``python -m worker``),
whose code an operator or a service manager reads, and each Celery child it
starts, whose code the supervisor reads (:func:`worker.supervisor._exit_text`).

====  ======================  ========  ================================================================
code  name                    who       when
====  ======================  ========  ================================================================
0     ``OK``                  both      a warm shutdown: every running job finished first
1     ``STOPPED``             both      the supervisor: a cold shutdown (jobs handed back), or every
                                        child gave up in a way a restart cannot fix; a child: Celery's
                                        own failure (EX_FAILURE)
2     ``USAGE``               super.    a bad option (an unknown GPU list or queue)
69    ``DEVICE_UNAVAILABLE``  child     its JAX device is not the one it was started for
                                        (``JAX_PLATFORMS=cuda`` and no GPU): never restarted
                                        (sysexits' EX_UNAVAILABLE)
78    ``CREDENTIALS``         both      Redis or the store refuses the configured password or key,
                                        checked once before any child starts (sysexits' EX_CONFIG)
====  ======================  ========  ================================================================

Until this table, 78 meant both a missing device and refused credentials;
the device now has its own code, so the supervisor's log says which.
Any other code from a child is Celery's or Python's, and the child is
restarted with backoff. ``tests/test_exit_codes.py`` keeps this table and
:class:`WorkerExit` equal.
"""

from __future__ import annotations

from enum import IntEnum


class WorkerExit(IntEnum):
    """How a worker process ended (see the module's table)."""

    OK = 0
    STOPPED = 1
    USAGE = 2
    DEVICE_UNAVAILABLE = 69
    CREDENTIALS = 78


#: What calq's own codes mean (0, 1 and 2 are everyone's), in the words the supervisor logs after "exited with status N".
MEANING: dict[int, str] = {
    WorkerExit.DEVICE_UNAVAILABLE: "its device is not the one it was started for",
    WorkerExit.CREDENTIALS: "Redis or the store refused the configured credentials",
}

"""What the supervisor and its Celery children agree on, importable without Celery or JAX.

The supervisor (:mod:`worker.supervisor`) starts each child with two
variables in its environment and talks to it by one signal; the child
(:mod:`worker.tasks`) answers by beating and by handing its job back:

- :data:`SUPERVISOR_PID_ENV`: the supervisor's pid. When the child's parent
  is no longer that pid, its supervisor is gone (:func:`stop_reason`).
- :data:`BEAT_FILE_ENV`: a file the child touches to say it is alive
  (:func:`beat`); a child silent for ``recovery.silent_child_s`` is restarted.
- :data:`HAND_BACK_SIGNAL`: the supervisor's cold shutdown; the child stops
  its job at the next progress report and hands it back
  (:func:`listen_for_hand_back` installs the handler).
- :func:`lease_holder`: the name a child's lease carries, by which the
  supervisor finds the job a dead child held.

:data:`LOG_FORMAT` (every worker process's log line) is shared the same way.
(The sampling phases, counted once per delivery, are the jobs layer's:
:data:`shared.jobs.delivery.SAMPLING_PHASES`.)
``tests/test_layers.py`` checks that importing this module, or the
supervisor, imports no Celery.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

#: The supervisor's cold shutdown: stop the running job at its next progress report and hand it back.
HAND_BACK_SIGNAL = signal.SIGUSR2
#: The supervisor's pid, in each child's environment: when it changes, the supervisor is gone.
SUPERVISOR_PID_ENV = "CALQ_SUPERVISOR_PID"
#: The file a child touches to tell its supervisor it is alive (set by the supervisor; see :func:`beat`).
BEAT_FILE_ENV = "CALQ_BEAT_FILE"
#: Every worker process's log line: the running job's id on each.
LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s[%(process)d] %(name)s [%(job_id)s] %(message)s"

_hand_back_reason: str | None = None


def _on_hand_back_signal(signum: int, _frame: Any) -> None:
    global _hand_back_reason
    _hand_back_reason = "the worker is shutting down (cold shutdown)"


def listen_for_hand_back() -> None:
    """From now on, :data:`HAND_BACK_SIGNAL` makes :func:`stop_reason` say a cold shutdown (child processes only)."""
    signal.signal(HAND_BACK_SIGNAL, _on_hand_back_signal)


def stop_reason(environ: Mapping[str, str] | None = None) -> str | None:
    """Why this process must hand its job back now, or None: a cold shutdown, or its supervisor is gone."""
    if _hand_back_reason is not None:
        return _hand_back_reason
    environ = os.environ if environ is None else environ
    supervisor = environ.get(SUPERVISOR_PID_ENV, "").strip()
    if supervisor.isdigit() and os.getppid() != int(supervisor):
        return "its supervisor is gone (the worker was killed)"
    return None


def lease_holder(worker: str, pid: int | None = None) -> str:
    """Who holds a lease: the Celery node name and the process id (two supervisors on one host share names)."""
    return f"{worker}#{os.getpid() if pid is None else pid}"


def beat(environ: Mapping[str, str] | None = None) -> None:
    """Tell the supervisor this process is alive: touch the file it named in :data:`BEAT_FILE_ENV` (if any).

    Beats come from Celery's event loop while the process waits for a job
    (``worker.tasks._beat_while_idle``) and from the lease's heartbeat thread
    while a job runs: a process whose loop hangs (a dead connection with no
    timeout) stops beating, and its supervisor restarts it
    (``recovery.silent_child_s``).
    """
    path = (os.environ if environ is None else environ).get(BEAT_FILE_ENV)
    if path:
        try:
            os.utime(path) if os.path.exists(path) else open(path, "a").close()
        except OSError as exc:  # the supervisor restarts a silent child: say why, once per failure
            log.warning("could not beat (%s)", type(exc).__name__)

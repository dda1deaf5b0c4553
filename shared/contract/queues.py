"""calq's worker queues by name, and the one rule for what a queue name means.

``calq.gpu`` and ``calq.cpu`` are the interactive queues (GPU workers serve
both, CPU workers ``calq.cpu``); :func:`queue_for` reads a short or full
name, in any case, as one of them. Everything that takes a queue name from
a person reads it through :func:`queue_for`: ``--queue``, the client and
the API's submissions, ``CALQ_DEFAULT_QUEUE``
(:attr:`shared.contract.settings.Settings.default_queue`). The Celery
configuration, the lanes and their batch twins are
:mod:`shared.jobs.celery_app`'s.
"""

from __future__ import annotations

GPU_QUEUE = "calq.gpu"
CPU_QUEUE = "calq.cpu"
QUEUES = (GPU_QUEUE, CPU_QUEUE)

_QUEUE_ALIASES = {"gpu": GPU_QUEUE, "cpu": CPU_QUEUE, GPU_QUEUE: GPU_QUEUE, CPU_QUEUE: CPU_QUEUE}


def queue_for(name: str) -> str:
    """The queue a short or full name means: ``gpu``/``calq.gpu`` → ``calq.gpu``, same for cpu."""
    key = name.strip().lower() if isinstance(name, str) else name
    try:
        return _QUEUE_ALIASES[key]
    except (KeyError, TypeError):
        raise ValueError(f"unknown queue {name!r}: use one of gpu, cpu, {', '.join(QUEUES)}") from None


__all__ = ["CPU_QUEUE", "GPU_QUEUE", "QUEUES", "queue_for"]

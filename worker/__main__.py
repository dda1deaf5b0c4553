"""``python -m worker --gpus auto|none|0,1 [--queues gpu,cpu]``: the fleet entry point without the CLI.

The same as ``calq worker``; useful in containers that only have the worker package.
Its exit codes are :mod:`worker.exit_codes`'s.
"""

from __future__ import annotations

import argparse
import logging
import sys

from worker.exit_codes import WorkerExit
from worker.supervisor import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="auto", help="auto (detect), none (CPU workers) or a list such as 0,1")
    parser.add_argument("--queues", default=None, help="comma-separated queues: gpu, cpu (default: by device)")
    parser.add_argument("--cpu-workers", type=int, default=1, help="CPU workers to start when there is no GPU")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--stop-timeout", type=float, default=None, help="seconds to wait for running jobs on shutdown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    refused = credentials_refused()
    if refused is not None:  # permanent: say so once and stop, instead of Celery's reconnect loop
        logging.getLogger("worker").error("%s", refused)
        return WorkerExit.CREDENTIALS
    try:
        return run(
            args.gpus,
            args.queues.split(",") if args.queues else None,
            cpu_workers=args.cpu_workers,
            loglevel=args.loglevel.upper(),
            stop_timeout_s=args.stop_timeout,
        )
    except ValueError as exc:
        parser.error(str(exc))
        return 2  # unreachable: parser.error exits


def credentials_refused() -> str | None:
    """"authentication failed …" if Redis or the store refuses calq's password or key, else None.

    One request each, before any worker starts. An unreachable service is
    not refused (the workers wait for it, as always); a wrong password never
    becomes reachable, so Celery's reconnect loop would only hide it.
    """
    from shared.contract.errors import AuthenticationFailed, CalqError
    from shared.contract.settings import get_settings

    settings = get_settings()
    if settings.embedded:
        return None
    from shared.jobs.registry import RedisRegistry
    from shared.jobs.services import Services
    from shared.storage.store import Store, dataset_key

    services = Services.from_settings(settings, store=Store.from_settings(settings, max_attempts=1))
    checks = [lambda: services.registry.find("cj-credentials-check"),
              lambda: services.store.exists(dataset_key("0" * 64))]
    if settings.broker() != settings.backend():  # the broker first, as the workers meet it
        checks.insert(0, lambda: RedisRegistry.from_url(settings.broker(), recovery=settings.recovery)
                      .find("cj-credentials-check"))
    for check in checks:
        try:
            check()
        except AuthenticationFailed as exc:
            return str(exc)
        except (CalqError, OSError, ValueError):
            continue  # unreachable or otherwise unhappy: the workers report it as they run
    return None


if __name__ == "__main__":
    sys.exit(main())

"""``python -m worker --gpus auto|none|0,1 [--queues gpu,cpu]``: the fleet entry point without the CLI.

The same as ``calq worker``; useful in containers that only have the worker package.
"""

from __future__ import annotations

import argparse
import logging
import sys

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


if __name__ == "__main__":
    sys.exit(main())

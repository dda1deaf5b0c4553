"""Running the API: in the foreground (``calq serve``) or on a background thread (tests, benches).

Both run the same uvicorn server over :func:`producer.api.app.create_app`;
the background one returns once the socket listens and stops cleanly
(lifespan shutdown, so the batch feeder ends) when its block exits.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

#: How long :func:`in_background` waits for the server to listen.
START_TIMEOUT_S = 30.0


def serve(app: Any, *, host: str, port: int, log_level: str = "info", workers: int = 1) -> None:
    """Serve ``app`` until SIGINT or SIGTERM (uvicorn's own signal handling).

    With ``workers`` > 1, uvicorn starts that many processes, each building
    its own app from the environment's settings (:func:`producer.api.app.create_app`,
    with its own calibration cache); ``app`` is then not used.
    """
    if workers > 1:
        uvicorn.run("producer.api.app:create_app", factory=True, host=host, port=port, log_level=log_level,
                    access_log=False, workers=workers)
        return
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


@contextlib.contextmanager
def in_background(app: Any, *, host: str = "127.0.0.1", port: int) -> Iterator[str]:
    """Serve ``app`` on a thread; yields its base URL once it listens, stops it on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name=f"calq-api-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the API did not start listening on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


__all__ = ["in_background", "serve"]

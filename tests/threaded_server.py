"""Run an ASGI app under uvicorn on a free loopback port, in a thread, for the span of a
``with``: shared by the real-server and fake-server fixtures (tests/*/conftest.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def serve_in_thread(app, start_timeout_s: float = 60, stop_timeout_s: float = 30) -> Iterator[str]:
    """Yields the server's base URL, ``http://127.0.0.1:PORT``; stops it on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(stop_timeout_s)

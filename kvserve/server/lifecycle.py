"""Shutting down without losing what was accepted.

On the first SIGTERM or SIGINT the server drains: every new request gets 503 (the socket stays
open, so a load balancer sees the answer rather than a refused connection), running requests
get ``--shutdown-timeout`` seconds to finish, and those still running then end with a 503
(an error event in a stream) and are aborted. Then uvicorn stops, the lifespan stops the
engine loop and closes the engine (the disk tier writes its queued blocks), and the process
exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from kvserve.server.async_engine import AsyncEngine, ShuttingDownError
from kvserve.server.config import ServerConfig

log = logging.getLogger("kvserve.server")
FLUSH_SECONDS = 5.0  # after aborting, how long answers get to reach their clients


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine,
                 shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self._drain_task: asyncio.Task | None = None

    @classmethod
    def serve_app(cls, app: FastAPI, config: ServerConfig) -> None:
        uv = uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                            timeout_graceful_shutdown=FLUSH_SECONDS)
        cls(uv, app.state.ctx.engine, config.shutdown_timeout).run()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it would stop listening at once, and re-raise the signal on the way
        # out, so the process would die by it instead of exiting 0.
        loop = self.engine.loop
        if self.engine.draining or loop is None:
            self.should_exit = self.force_exit = True
            return
        log.info("%s: draining; new requests get 503, running ones have %g s to finish",
                 signal.Signals(sig).name, self.shutdown_timeout)
        self.engine.draining = True
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self.engine.groups and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.groups:
            log.warning("aborting %d requests still running after %g s",
                        len(self.engine.groups), self.shutdown_timeout)
            self.engine.fail_open_groups(ShuttingDownError(
                "the server is shutting down and this request ran past its grace period "
                "(--shutdown-timeout); it was aborted"))
            deadline = time.monotonic() + FLUSH_SECONDS
            while self.engine.groups and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.should_exit = True

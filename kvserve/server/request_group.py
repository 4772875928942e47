"""The HTTP side of one request: the outputs of its engine requests, as they come."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from kvserve.engine.output import RequestOutput

if TYPE_CHECKING:
    from kvserve.server.async_engine import AsyncEngine


class RequestTimeoutError(RuntimeError):
    """The request ran longer than the server's request timeout; it was aborted."""


class RequestGroup:
    """The engine requests behind one HTTP request: n choices of one or several prompts.

    Lives on the event loop; the engine thread reaches it only through ``receive``, which it
    schedules with ``call_soon_threadsafe``.
    """

    def __init__(self, owner: AsyncEngine, request_ids: list[str],
                 deadline: float | None = None) -> None:
        self.request_ids = request_ids
        self.deadline = deadline  # time.monotonic() after which outputs() raises
        self.first_output_time: float | None = None  # perf_counter, seen on the event loop
        self._owner = owner
        self._queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()
        self._unstarted = set(range(len(request_ids)))  # no output yet: they count as waiting
        self._unfinished = set(range(len(request_ids)))
        self._closed = False

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(index, output) as the engine produces them, until every request has finished.

        Raises the exception sent instead of an output (EngineDeadError, RequestFailedError,
        ShuttingDownError), or RequestTimeoutError once the deadline has passed."""
        while self._unfinished:
            index, item = await self._next()
            if isinstance(item, Exception):
                raise item
            if item.finished:
                self._unfinished.discard(index)
            yield index, item

    async def _next(self) -> tuple[int, RequestOutput | Exception]:
        if self.deadline is None:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(self._queue.get(), self.deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise RequestTimeoutError("the request ran longer than this server allows "
                                      "(--request-timeout); it was stopped") from None

    def close(self) -> None:
        """Abort whatever has not finished (the client went away, or an error); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._owner.groups.discard(self)
        self._owner.num_waiting -= len(self._unstarted)
        self._unstarted.clear()
        for index in self._unfinished:
            self._owner.abort(self.request_ids[index])

    def receive(self, index: int, item: RequestOutput | Exception) -> None:
        if self.first_output_time is None:
            self.first_output_time = time.perf_counter()
        if index in self._unstarted:
            self._unstarted.discard(index)
            self._owner.num_waiting -= 1
        self._queue.put_nowait((index, item))

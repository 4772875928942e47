"""One engine loop for the whole server: a thread steps the engine, asyncio serves HTTP.

HTTP handlers never touch the ``Engine``. They put commands in a thread-safe inbox and read
outputs from their request group's asyncio queue. The engine thread runs the commands between
steps and hands every ``RequestOutput`` to the event loop with ``call_soon_threadsafe``: a slow
client never holds up the batch, and a long step never blocks the event loop.

    HTTP handler  --submit / abort / call-->  inbox  -->  engine thread: commands, step()
    RequestGroup.outputs()  <--call_soon_threadsafe(receive)--  each RequestOutput
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kvserve.engine.engine import Engine
from kvserve.engine.output import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.metrics import RequestTimes, ServerMetrics
from kvserve.server.request_group import RequestGroup, RequestTimeoutError

log = logging.getLogger("kvserve.server")
T = TypeVar("T")
__all__ = ["AsyncEngine", "EngineDeadError", "QueueFullError", "RequestFailedError",
           "RequestTimeoutError", "ShuttingDownError"]


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; nothing can be served until the server restarts."""


class QueueFullError(RuntimeError):
    """More requests wait for their first token than ``max_waiting`` allows."""


class RequestFailedError(RuntimeError):
    """The engine failed on this request (and went on serving the others)."""


class ShuttingDownError(RuntimeError):
    """The server is shutting down: it takes no new request, and aborts those left running."""


@dataclass
class _Tracked:
    """Where the engine thread delivers one request's outputs, and its timings."""

    group: RequestGroup
    index: int
    times: RequestTimes


@dataclass(frozen=True)
class _Add:
    group: RequestGroup
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    submit_time: float


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Call:
    fn: Callable[[Engine], Any]
    future: concurrent.futures.Future


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: ServerMetrics,
                 max_waiting: int | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.num_waiting = 0  # accepted, no output yet; touched only on the event loop
        self.groups: set[RequestGroup] = set()  # not yet closed; touched only on the event loop
        self.draining = False  # set on shutdown: submit refuses, open groups may finish
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()  # submit vs. the loop dying: no command is lost between
        self._dead = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the HTTP side runs on, once started."""
        return self._loop

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def check_fits(self, ids: list[int], params: SamplingParams) -> None:
        """``Engine.check_fits``, safe from any thread: it reads only what is fixed at start.
        Callers check each prompt with it (in a worker thread: it scans every token id)
        before they submit; the engine checks again as it adds the request."""
        self.engine.check_fits(ids, params)

    def compile_grammar(self, params: SamplingParams) -> None:
        """Compile (and cache) a constrained request's grammar, safe from any thread: the
        server calls it in a worker thread, so the engine thread finds it compiled. Raises
        GrammarError (a ValueError) when it does not compile."""
        if params.structured_outputs is not None:
            self.engine.grammars.compile(params.structured_outputs)

    def submit(self, prompts: list[tuple[list[int], SamplingParams]], request_id: str,
               timeout: float | None = None) -> RequestGroup:
        """Queue prompts already checked with ``check_fits``, all of them (or none), as one
        group; it raises RequestTimeoutError once ``timeout`` seconds have passed.

        Raises:
            ValueError: more choices than ``max_waiting``; nothing was queued.
            QueueFullError: ``max_waiting`` would be exceeded; nothing was queued.
            ShuttingDownError: the server is draining; nothing was queued.
            EngineDeadError: the engine loop has stopped.
        """
        if self.draining:
            raise ShuttingDownError("the server is shutting down; retry on another instance")
        if self.max_waiting is not None:
            if len(prompts) > self.max_waiting:
                raise ValueError(f"{len(prompts)} completions in one request is more than the "
                                 f"server queues at once ({self.max_waiting})")
            if self.num_waiting + len(prompts) > self.max_waiting:
                raise QueueFullError(f"{self.num_waiting} requests are waiting (limit "
                                     f"{self.max_waiting}); retry shortly")
        deadline = None if timeout is None else time.monotonic() + timeout
        group = RequestGroup(self, [f"{request_id}-{i}" for i in range(len(prompts))], deadline)
        now = time.perf_counter()
        with self._lock:
            if not self.is_alive:
                raise EngineDeadError("the engine loop has stopped")
            for index, (ids, params) in enumerate(prompts):
                self._inbox.put(_Add(group, index, ids, params, now))
        self.num_waiting += len(prompts)
        self.groups.add(group)
        return group

    def fail_open_groups(self, exc: Exception) -> None:
        """Hand ``exc`` to every open group (their handlers answer with it and close them,
        which aborts their requests and frees their blocks). On the event loop only."""
        for group in list(self.groups):
            group.receive(0, exc)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread, between steps, and return its result."""
        return await asyncio.wrap_future(self.call_threadsafe(fn))

    def call_threadsafe(self, fn: Callable[[Engine], T]) -> concurrent.futures.Future[T]:
        """``call`` for any thread: the future completes on the engine thread."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if not self.is_alive:
                raise EngineDeadError("the engine loop has stopped")
            self._inbox.put(_Call(fn, future))
        return future

    # --- everything below runs on the engine thread ---

    def _run(self) -> None:
        try:
            while self._run_commands(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._step()
                    if not self.engine.has_unfinished():
                        self.engine.check_integrity()  # idle again: no block may be held
                self._publish_state()
        except Exception as exc:
            log.exception("the engine loop died; /health now answers 503")
            self._die(exc)

    def _run_commands(self, block: bool) -> bool:
        """Run what the inbox holds (waiting for one command when idle); False on stop."""
        try:
            command = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if command is None:
                    return False
                self._run_command(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _run_command(self, command: _Add | _Abort | _Call) -> None:
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _Abort):
            out = self.engine.abort(command.request_id)
            if out is not None:
                self._deliver(out)
        elif command.future.set_running_or_notify_cancel():
            try:
                command.future.set_result(command.fn(self.engine))
            except Exception as exc:
                command.future.set_exception(exc)

    def _add(self, command: _Add) -> None:
        request_id = command.group.request_ids[command.index]
        try:
            self.engine.add_request(command.prompt_ids, command.params, request_id)
        except Exception as exc:  # validated before queueing, so this is a bug: fail it alone
            log.exception("could not add request %s", request_id)
            self._send(command.group, command.index, RequestFailedError(repr(exc)))
            return
        self._tracked[request_id] = _Tracked(command.group, command.index,
                                             RequestTimes(command.submit_time))

    def _step(self) -> None:
        """One engine step. The engine keeps each failure with its request; an exception
        here is a bug in the engine itself, and ends the loop (``/health`` turns 503)."""
        for out in self.engine.step():
            self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        tracked = self._tracked.get(out.request_id)
        if tracked is None:
            return
        self.metrics.observe(out, tracked.times, time.perf_counter())
        if out.finished:
            del self._tracked[out.request_id]
        self._send(tracked.group, tracked.index, out)

    def _send(self, group: RequestGroup, index: int, item: RequestOutput | Exception) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(group.receive, index, item)

    def _publish_state(self) -> None:
        s = self.engine.stats()
        self.metrics.engine_state(s.num_running, s.num_waiting,
                                  s.num_blocks - s.num_free_blocks, s.kv_usage)

    def _die(self, exc: Exception) -> None:
        """Fail every request in flight or still in the inbox; refuse new ones."""
        with self._lock:
            self._dead = True
        dead = EngineDeadError(f"the engine loop has stopped: {exc!r}")
        for tracked in self._tracked.values():
            self._send(tracked.group, tracked.index, dead)
        self._tracked.clear()
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._send(command.group, command.index, dead)
            elif isinstance(command, _Call) and command.future.set_running_or_notify_cancel():
                command.future.set_exception(dead)


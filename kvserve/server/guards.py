"""Checks before any route runs: 503 while the server drains, 413 for a body over the limit.

A plain ASGI middleware: the body is read here, counted as it arrives (a ``Content-Length``
over the limit is refused before a byte is read), and handed to the app in one piece.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvserve.server.errors import APIError, error_response
from kvserve.units import format_size

OPEN_WHILE_DRAINING = ("/metrics",)


class Guards:
    def __init__(self, app: ASGIApp, max_body_size: int,
                 is_draining: Callable[[], bool]) -> None:
        self.app = app
        self.max_body_size = max_body_size
        self.is_draining = is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.is_draining() and scope["path"] not in OPEN_WHILE_DRAINING:
            await self._refuse(scope, receive, send, APIError(
                503, "the server is shutting down; retry on another instance",
                headers={"Connection": "close"}))
            return
        too_large = APIError(413, f"the request body is larger than this server takes "
                                  f"({format_size(self.max_body_size)}, --max-body-size)",
                             code="request_too_large", headers={"Connection": "close"})
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_size):
            await self._refuse(scope, receive, send, too_large if length.isdigit() else
                               APIError(400, "the Content-Length header is not a number"))
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before it sent its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_size:
                await self._refuse(scope, receive, send, too_large)
                return
            more = message.get("more_body", False)
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
        await error_response(error)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the whole body once, then whatever the client sends next
    (``http.disconnect``: routes watch for it)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay

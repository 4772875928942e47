"""A small fake OpenAI-compatible server on a free loopback port, scripted per test."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from threaded_server import serve_in_thread  # tests/, on the path through its conftest

from kvserve.cli import main


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: runs the real model behind a real server")


@dataclass
class Script:
    """How the fake server answers."""

    model: str = "fake-model"
    pieces: tuple[str, ...] = ("Hello", " there", "!")
    usage: bool = True
    completion_tokens: int = 7  # not len(pieces): shows that usage, when sent, is what counts
    cached_tokens: int = 3
    first_delay_s: float = 0.0
    gap_s: float = 0.0
    no_kv_gap_s: float = 0.0  # the gap instead when the body says use_kv_cache: false
    fail_every: int = 0  # requests 0, k, 2k, ... fail with `status`
    status: int = 500
    error_in_stream: bool = False  # fail the failing ones with an SSE error event instead


@dataclass
class FakeServer:
    url: str
    script: Script
    bodies: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def _chunk(endpoint: str, text: str) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}} if endpoint == "chat" else {
        "index": 0, "text": text}
    return {"id": "x", "object": "chunk", "choices": [choice]}


async def _events(server: FakeServer, body: dict[str, Any], endpoint: str,
                  fail: bool) -> AsyncIterator[str]:
    s = server.script
    server.in_flight += 1
    server.max_in_flight = max(server.max_in_flight, server.in_flight)
    try:
        if endpoint == "chat":  # a role-only first chunk, as OpenAI sends: no text, no TTFT
            yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'a'}}]})}\n\n"
        await asyncio.sleep(s.first_delay_s)
        gap = s.no_kv_gap_s if body.get("use_kv_cache") is False else s.gap_s
        for i, piece in enumerate(s.pieces):
            await asyncio.sleep(gap if i else 0)
            if fail and i == 1:
                yield f"data: {json.dumps({'error': {'message': 'engine fell over'}})}\n\n"
                break
            yield f"data: {json.dumps(_chunk(endpoint, piece))}\n\n"
        if s.usage and body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": 10, "completion_tokens": s.completion_tokens,
                     "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        server.in_flight -= 1


def fake_app(server: FakeServer) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.script.model, "object": "model"}]}

    async def complete(request: Request, endpoint: str) -> Response:
        body = await request.json()
        index = len(server.bodies)
        server.bodies.append(body)
        s = server.script
        if body.get("model") != s.model:
            return JSONResponse({"error": {"message": f"model {body.get('model')!r} does not "
                                                      "exist", "code": "model_not_found"}}, 404)
        fail = bool(s.fail_every) and index % s.fail_every == 0
        if fail and not s.error_in_stream:
            return JSONResponse({"error": {"message": f"boom {index}"}}, s.status)
        return StreamingResponse(_events(server, body, endpoint, fail),
                                 media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, "completions")

    return app


@contextmanager
def running_fake(script: Script) -> Iterator[FakeServer]:
    server = FakeServer("", script)
    with serve_in_thread(fake_app(server), start_timeout_s=30, stop_timeout_s=10) as url:
        server.url = url
        yield server


@pytest.fixture
def fake_server() -> Callable[..., AbstractContextManager[FakeServer]]:
    """``with fake_server(gap_s=0.01, ...) as server:`` a fake server following that Script."""
    return lambda **script: running_fake(Script(**script))


@pytest.fixture
def kvserve(capsys) -> Callable[..., tuple[int, str, str]]:
    """Run the ``kvserve`` command line in this process: (exit status, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        status = main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return run

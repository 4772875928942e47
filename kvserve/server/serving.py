"""What the OpenAI routes share: the server context, submitting, collecting, SSE streams."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kvserve.engine.output import RequestOutput
from kvserve.model.tokenizer import Tokenizer
from kvserve.sampling_params import SamplingParams
from kvserve.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    QueueFullError,
    RequestFailedError,
)
from kvserve.server.errors import APIError, bad_request, error_body
from kvserve.server.logprobs import TokenText
from kvserve.server.metrics import ServerMetrics
from kvserve.server.protocol import with_seed_offset
from kvserve.server.request_group import RequestGroup

ENGINE_FAILED = "the engine failed while running this request; see the server log"


@dataclass
class ServerContext:
    """Everything a route needs, built once per app."""

    engine: AsyncEngine
    metrics: ServerMetrics
    tokenizer: Tokenizer
    model_name: str
    fingerprint: str
    max_model_len: int
    num_pool_tokens: int
    api_key: str | None = None
    weights: str = ""  # which weights run: a dtype, or GGUF blocks computed on natively
    max_num_seqs: int = 0
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.token_text = TokenText(self.tokenizer)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", "model", "model_not_found")

    def tokenize(self, text: str, param: str) -> list[int]:
        check_unicode(text, param)
        return self.tokenizer.encode(text)

    def max_tokens_left(self, num_prompt_tokens: int) -> int:
        """The default when a request sets no limit: up to the context or KV pool end."""
        return max(1, min(self.max_model_len, self.num_pool_tokens + 1) - num_prompt_tokens)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], n: int,
               request_id: str, fields: Iterable[str], prompt_param: str) -> RequestGroup:
        """Queue n choices of each prompt (choice i*n + j is prompt i's j-th), or raise."""
        requests = [(ids, with_seed_offset(p, j)) for ids, p in zip(prompts, params)
                    for j in range(n)]
        try:
            return self.engine.submit(requests, request_id)
        except ValueError as exc:
            raise bad_request(exc, set(fields), prompt_param) from exc
        except QueueFullError as exc:
            raise APIError(503, str(exc), headers={"Retry-After": "1"}) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc


def check_unicode(text: str, param: str) -> None:
    """JSON can carry lone surrogates ("\\ud800"); the tokenizer cannot take them."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} is not valid Unicode: {exc.reason}", param) from exc


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx


Context = Annotated[ServerContext, Depends(get_context)]


def usage(prompts: list[list[int]], outputs: Iterable[RequestOutput], n: int) -> dict[str, Any]:
    """Token counts; a prompt counts once however many choices it has."""
    outputs = list(outputs)
    prompt_tokens = sum(len(ids) for ids in prompts)
    completion_tokens = sum(len(o.token_ids) for o in outputs)
    cached = sum(max(o.num_cached_tokens for o in outputs[i * n:(i + 1) * n])
                 for i in range(len(prompts)))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def collect(group: RequestGroup, request: Request) -> list[RequestOutput]:
    """The final output of every request in the group; abort them if the client leaves."""
    finals: dict[int, RequestOutput] = {}

    async def run() -> None:
        async for index, out in group.outputs():
            raise_if_failed(out)
            if out.finished:
                finals[index] = out

    work = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # nobody will read this answer; the requests are aborted below
            raise APIError(499, "client disconnected")
        try:
            work.result()
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc
        except RequestFailedError as exc:
            raise APIError(500, str(exc)) from exc
        return [finals[i] for i in range(len(group.request_ids))]
    finally:
        work.cancel()
        gone.cancel()
        group.close()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events: one ``data:`` line per chunk, an error event if the engine fails,
    then ``data: [DONE]``."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    except EngineDeadError as exc:
        yield f"data: {json.dumps(error_body(503, str(exc)))}\n\n"
    except RequestFailedError as exc:
        yield f"data: {json.dumps(error_body(500, str(exc)))}\n\n"
    yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response that aborts its requests however it ends: done, error or disconnect."""

    def __init__(self, chunks: AsyncIterator[dict[str, Any]], group: RequestGroup) -> None:
        self._events = sse(chunks)
        self._group = group
        super().__init__(self._events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            self._group.close()


def raise_if_failed(out: RequestOutput) -> None:
    """A request the engine failed becomes a 500, or an SSE error event mid-stream."""
    if out.finish_reason == "error":
        raise RequestFailedError(ENGINE_FAILED)

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
from kvserve.server import admission
from kvserve.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    QueueFullError,
    RequestFailedError,
    RequestTimeoutError,
    ShuttingDownError,
)
from kvserve.server.config import ServerConfig
from kvserve.server.errors import APIError, bad_request, error_body
from kvserve.server.logprobs import TokenText
from kvserve.server.metrics import ServerMetrics
from kvserve.server.protocol import with_seed_offset
from kvserve.server.request_group import RequestGroup
from kvserve.structured.grammar import GrammarError

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
    vocab_size: int
    config: ServerConfig = field(default_factory=ServerConfig)
    weights: str = ""  # which weights run: a dtype, or GGUF blocks computed on natively
    kv_cache_dtype: str = ""  # what the KV cache stores, auto resolved
    max_num_seqs: int = 0
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.token_text = TokenText(self.tokenizer)
        self.max_text_chars = self.max_model_len * admission.longest_token_chars(self.tokenizer)
        self.tenants = ({key: admission.tenant_salt(key) for key in self.config.api_key}
                        if self.config.isolate_tenants else {})

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", "model", "model_not_found")

    def tokenize(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text; a worker thread's work (it takes seconds for megabytes)."""
        check_unicode(text, param)
        if len(text) > self.max_text_chars:
            raise APIError(400, f"{param} is {len(text):,} characters, more than a context of "
                                f"{self.max_model_len} tokens can hold; shorten it", param)
        return admission.encode(self.tokenizer, text, add_special_tokens)

    def max_tokens_left(self, num_prompt_tokens: int, num_choices: int = 1,
                        use_kv_cache: bool = True) -> int:
        """The default when a request sets no limit: up to the context or KV pool end,
        within the server's limits."""
        room = min(self.max_model_len, self.num_pool_tokens + 1) - num_prompt_tokens
        return admission.default_max_tokens(self.config, room, num_prompt_tokens, num_choices,
                                            use_kv_cache)

    def admit(self, prompts: list[list[int]], params: list[SamplingParams], n: int,
              api_key: str | None, fields: Iterable[str], prompt_param: str,
              max_tokens_param: str = "max_tokens",
              no_cache_param: str = "use_kv_cache",
              grammar_param: str = "structured_outputs") -> list[SamplingParams]:
        """Check what the request asks for against the server's limits, the context and the
        pool, and compile its grammar; returns its params with the tenant's cache salt. A
        worker thread's work."""
        params = [admission.salted(p, self.tenants.get(api_key or "")) for p in params]
        try:
            for ids, p in zip(prompts, params):
                self.engine.check_fits(ids, p)
        except ValueError as exc:
            raise bad_request(exc, set(fields), prompt_param) from exc
        try:
            for p in params[:1]:  # every prompt of a request has the same constraint
                self.engine.compile_grammar(p)
        except GrammarError as exc:
            raise APIError(400, f"{grammar_param} does not compile: {exc}", grammar_param
                           ) from exc
        admission.check_cost(self.config, prompts, params, n, max_tokens_param, no_cache_param)
        return params

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], n: int,
               request_id: str) -> RequestGroup:
        """Queue n choices of each admitted prompt (choice i*n + j is prompt i's j-th)."""
        requests = [(ids, with_seed_offset(p, j)) for ids, p in zip(prompts, params)
                    for j in range(n)]
        try:
            return self.engine.submit(requests, request_id, self.config.request_timeout)
        except ValueError as exc:
            raise APIError(400, str(exc), "n") from exc
        except QueueFullError as exc:
            raise APIError(503, str(exc), headers={"Retry-After": "1"}) from exc
        except (EngineDeadError, ShuttingDownError) as exc:
            raise APIError(503, str(exc)) from exc


def check_unicode(text: str, param: str) -> None:
    """JSON can carry lone surrogates ("\\ud800"); the tokenizer cannot take them."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} is not valid Unicode: {exc.reason}", param) from exc


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx


def api_key_of(request: Request) -> str | None:
    """The API key the request was let in with (set by the app's key check), if any."""
    return getattr(request.state, "api_key", None)


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
        except (EngineDeadError, ShuttingDownError) as exc:
            raise APIError(503, str(exc)) from exc
        except RequestTimeoutError as exc:
            raise APIError(408, str(exc), code="request_timeout") from exc
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
    except (EngineDeadError, ShuttingDownError) as exc:
        yield f"data: {json.dumps(error_body(503, str(exc)))}\n\n"
    except RequestTimeoutError as exc:
        yield f"data: {json.dumps(error_body(408, str(exc), code='request_timeout'))}\n\n"
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

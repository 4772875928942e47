"""The OpenAI routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from kvserve.sampling_params import SamplingParams
from kvserve.server import chat, completions
from kvserve.server.protocol import ChatCompletionRequest, CompletionRequest
from kvserve.server.render import Renderer
from kvserve.server.serving import Context, EventStream, ServerContext, api_key_of, collect

router = APIRouter()


@router.get("/v1/models")
async def list_models(ctx: Context) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(ctx)]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, ctx: Context) -> dict[str, Any]:
    ctx.check_model(model)
    return _model_card(ctx)


def _model_card(ctx: ServerContext) -> dict[str, Any]:
    return {"id": ctx.model_name, "object": "model", "created": ctx.created,
            "owned_by": "kvserve", "max_model_len": ctx.max_model_len, "weights": ctx.weights,
            "kv_cache_dtype": ctx.kv_cache_dtype}


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request,
                            ctx: Context) -> Response:
    ctx.check_model(body.model)
    renderer, params = await run_in_threadpool(completions.prepare, ctx, body,
                                               api_key_of(request))
    return await _respond(renderer, params, request)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 ctx: Context) -> Response:
    ctx.check_model(body.model)
    renderer, params = await run_in_threadpool(chat.prepare, ctx, body, api_key_of(request))
    return await _respond(renderer, params, request)


async def _respond(renderer: Renderer, params: list[SamplingParams],
                   request: Request) -> Response:
    body = renderer.body
    group = renderer.ctx.submit(renderer.prompts, params, body.n, renderer.id)
    if body.stream:
        return EventStream(renderer.chunks(group), group)
    return JSONResponse(renderer.response(await collect(group, request)))

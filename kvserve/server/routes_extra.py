"""The routes beyond OpenAI's: legacy ``/generate``, ``/cache/*``, ``/health``, ``/metrics``."""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from kvserve import __version__
from kvserve.engine.engine import Engine
from kvserve.sampling_params import SamplingParams
from kvserve.server.async_engine import EngineDeadError
from kvserve.server.errors import APIError, bad_request
from kvserve.server.metrics import ServerMetrics
from kvserve.server.protocol import GenerateRequest
from kvserve.server.serving import Context, ServerContext, api_key_of, collect

T = TypeVar("T")
guarded = APIRouter()  # behind the API key, when there is one
open_router = APIRouter()


@guarded.post("/generate")
async def generate(body: GenerateRequest, request: Request, ctx: Context) -> dict[str, Any]:
    start = time.perf_counter()
    ids, params = await run_in_threadpool(_prepare, ctx, body, api_key_of(request))
    tokenized = time.perf_counter()
    group = ctx.submit([ids], params, 1, f"gen-{uuid.uuid4().hex}")
    [out] = await collect(group, request)
    end = time.perf_counter()
    first = group.first_output_time or end
    return {
        "text": out.text,
        "latency_ms": _ms(end - start),
        "tokens_per_sec": len(out.token_ids) / (end - start),
        "cache_enabled": body.use_cache,
        "prefix_cache_hit": bool(out.cached_tokens_by_tier),
        "timings": {
            "tokenize_ms": _ms(tokenized - start),
            "cache_lookup_ms": _ms(out.metrics.cache_lookup_time),
            "ttft_ms": _ms(first - start),
            "decode_ms": _ms(end - first),
            "total_ms": _ms(end - start),
            "prefix_tokens_saved": out.num_cached_tokens,
        },
    }


def _prepare(ctx: ServerContext, body: GenerateRequest, api_key: str | None
             ) -> tuple[list[int], list[SamplingParams]]:
    """Token ids and admitted params; runs in a worker thread."""
    ids = ctx.tokenize(body.prompt, "prompt")
    fields = set(GenerateRequest.model_fields)
    try:
        params = [body.sampling_params()]
    except ValueError as exc:
        raise bad_request(exc, fields, "prompt") from exc
    return ids, ctx.admit([ids], params, 1, api_key, fields, "prompt", "max_new_tokens",
                          "use_cache")


@guarded.get("/cache/stats")
async def cache_stats(ctx: Context) -> dict[str, Any]:
    return await _on_engine(ctx, lambda engine: _stats(engine, ctx.metrics))


@guarded.post("/cache/clear")
async def cache_clear(ctx: Context) -> dict[str, int]:
    """Drop the cached blocks no request holds; returns how many."""
    return {"cleared_blocks": await _on_engine(ctx, lambda engine: engine.clear_cache())}


@guarded.get("/v1/loads")
async def loads(ctx: Context) -> dict[str, Any]:
    """The load report cache-aware routers poll (the SGLang model gateway's ``/v1/loads``
    shape): one rank, its running and waiting requests and KV usage."""
    s = await _on_engine(ctx, lambda engine: engine.stats())
    cache = ctx.metrics
    asked = cache.num_requests_hit + cache.num_requests_missed
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "dp_rank_count": 1,
        "loads": [{
            "dp_rank": 0, "num_running_reqs": s.num_running, "num_waiting_reqs": s.num_waiting,
            "num_total_reqs": s.num_running + s.num_waiting,
            "num_used_tokens": s.num_used_blocks * s.block_size,
            "max_total_num_tokens": s.num_pool_tokens, "token_usage": s.kv_usage,
            "cache_hit_rate": cache.num_requests_hit / asked if asked else 0.0,
            "max_running_requests": ctx.max_num_seqs}],
    }


@open_router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@open_router.get("/health")
async def health(ctx: Context) -> dict[str, str]:
    if not ctx.engine.is_alive:
        raise APIError(503, "the engine loop is not running")
    return {"status": "ok"}


@open_router.get("/metrics")
async def metrics(ctx: Context) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _on_engine(ctx: ServerContext, fn: Callable[[Engine], T]) -> T:
    try:
        return await ctx.engine.call(fn)
    except EngineDeadError as exc:
        raise APIError(503, str(exc)) from exc


def _stats(engine: Engine, metrics: ServerMetrics) -> dict[str, Any]:
    """Runs on the engine thread. The engine's cache report, with the legacy keys (hits,
    misses, hit_rate, total_requests: requests whose prompt found cached tokens, or not)."""
    s = engine.stats()
    hits, misses = metrics.num_requests_hit, metrics.num_requests_missed
    return {
        **engine.cache_stats(),
        "cache_size": s.num_used_blocks + s.num_cached_blocks,  # device blocks holding K/V
        "hits": hits, "misses": misses, "total_requests": hits + misses,
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "kv_blocks_total": s.num_blocks, "kv_blocks_free": s.num_free_blocks,
        "kv_usage": s.kv_usage, "block_size": s.block_size,
        "num_running": s.num_running, "num_waiting": s.num_waiting,
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)

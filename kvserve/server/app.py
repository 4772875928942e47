"""The FastAPI app around one engine, and ``kvserve serve``."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request

from kvserve import __version__
from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.server import routes_extra, routes_openai
from kvserve.server.async_engine import AsyncEngine
from kvserve.server.errors import APIError, install_error_handlers
from kvserve.server.metrics import ServerMetrics
from kvserve.server.serving import ServerContext, get_context
from kvserve.units import format_size

log = logging.getLogger("kvserve.server")


def build_app(engine: Engine, *, served_model_name: str | None = None,
              api_key: str | None = None, max_waiting: int | None = None) -> FastAPI:
    """The app; its engine loop runs while the app does (the lifespan starts and stops it)."""
    metrics = ServerMetrics()
    if engine.remote_tier_report() is not None:
        metrics.watch_remote_tier(engine.remote_tier_report)
    ctx = ServerContext(
        engine=AsyncEngine(engine, metrics, max_waiting), metrics=metrics,
        tokenizer=engine.tokenizer, model_name=served_model_name or engine.model_config.name,
        fingerprint=engine.fingerprint, max_model_len=engine.max_model_len,
        num_pool_tokens=engine.stats().num_pool_tokens, api_key=api_key,
        weights=engine.weights, max_num_seqs=engine.config.max_num_seqs)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ctx.engine.start()
        yield
        ctx.engine.stop()
        engine.close()

    app = FastAPI(title="kvserve", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    install_error_handlers(app)
    guarded = [Depends(require_api_key)]
    app.include_router(routes_openai.router, dependencies=guarded)
    app.include_router(routes_extra.guarded, dependencies=guarded)
    app.include_router(routes_extra.open_router)
    return app


async def require_api_key(request: Request) -> None:
    key = get_context(request).api_key
    if key is None:
        return
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {key}".encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


def banner(engine: Engine, model_name: str, url: str) -> str:
    s = engine.stats()
    return (f"kvserve {__version__}: {model_name} (weights: {engine.weights}; activations and "
            f"KV: {engine.config.dtype}; {engine.device}), "
            f"context {engine.max_model_len} tokens, KV pool {s.num_blocks} blocks x "
            f"{s.block_size} tokens ({format_size(s.num_blocks * s.block_bytes)}), "
            f"prefix cache {'on' if engine.config.enable_prefix_caching else 'off'}, "
            f"serving at {url}")


def run_server(config: EngineConfig, host: str, port: int, *, api_key: str | None = None,
               max_waiting: int | None = None, served_model_name: str | None = None) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    engine = Engine(config)
    app = build_app(engine, served_model_name=served_model_name, api_key=api_key,
                    max_waiting=max_waiting)
    log.info(banner(engine, app.state.ctx.model_name, f"http://{host}:{port}"))
    uvicorn.run(app, host=host, port=port, log_level="info")

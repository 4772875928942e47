"""The FastAPI app around one engine, and ``kvserve serve``."""

from __future__ import annotations

import dataclasses
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from kvserve import __version__
from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.server import routes_extra, routes_openai, routes_tokenize
from kvserve.server.async_engine import AsyncEngine
from kvserve.server.config import ServerConfig
from kvserve.server.errors import APIError, install_error_handlers
from kvserve.server.guards import Guards
from kvserve.server.metrics import ServerMetrics
from kvserve.server.serving import ServerContext, get_context
from kvserve.units import format_size

log = logging.getLogger("kvserve.server")


def build_app(engine: Engine, config: ServerConfig | None = None, **options: Any) -> FastAPI:
    """The app; its engine loop runs while the app does (the lifespan starts and stops it).

    ``options``: ServerConfig fields that replace those of ``config``."""
    config = dataclasses.replace(config or ServerConfig(), **options)
    metrics = ServerMetrics()
    if engine.remote_tier_report() is not None:
        metrics.watch_remote_tier(engine.remote_tier_report)
    ctx = ServerContext(
        engine=AsyncEngine(engine, metrics, config.max_waiting), metrics=metrics,
        tokenizer=engine.tokenizer, model_name=config.served_model_name
        or engine.model_config.name, fingerprint=engine.fingerprint,
        max_model_len=engine.max_model_len, num_pool_tokens=engine.stats().num_pool_tokens,
        vocab_size=engine.model_config.vocab_size, config=config, weights=engine.weights,
        kv_cache_dtype=engine.config.kv_dtype,
        max_num_seqs=engine.config.max_num_seqs)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ctx.engine.start()
        yield
        ctx.engine.stop()
        engine.close()

    docs_open = not config.api_key
    app = FastAPI(title="kvserve", version=__version__, lifespan=lifespan,
                  openapi_url="/openapi.json" if docs_open else None,
                  docs_url="/docs" if docs_open else None,
                  redoc_url="/redoc" if docs_open else None)
    app.state.ctx = ctx
    install_error_handlers(app)
    guarded = [Depends(require_api_key)]
    app.include_router(routes_openai.router, dependencies=guarded)
    app.include_router(routes_extra.guarded, dependencies=guarded)
    app.include_router(routes_tokenize.router, dependencies=guarded)
    app.include_router(routes_extra.open_router)
    if not docs_open:
        _add_guarded_docs(app, guarded)
    app.add_middleware(Guards, max_body_size=config.max_body_size,
                       is_draining=lambda: ctx.engine.draining)
    return app


def _add_guarded_docs(app: FastAPI, guarded: list) -> None:
    """/openapi.json, /docs and /redoc behind the API key, like the routes they describe."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guarded)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="kvserve")

    @app.get("/redoc", include_in_schema=False, dependencies=guarded)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="kvserve")


async def require_api_key(request: Request) -> None:
    """401 unless the request carries one of the keys; remembers which one (its tenant)."""
    keys = get_context(request).config.api_key
    if not keys:
        return
    given = request.headers.get("authorization", "").encode()
    matched = None
    for key in keys:  # every key compared, in constant time: no hint which one is near
        if hmac.compare_digest(given, f"Bearer {key}".encode()):
            matched = key
    if matched is None:
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")
    request.state.api_key = matched


def banner(engine: Engine, model_name: str, url: str) -> str:
    s = engine.stats()
    return (f"kvserve {__version__}: {model_name} (weights: {engine.weights}; activations: "
            f"{engine.config.dtype}; KV: {engine.config.kv_dtype}; {engine.device}), "
            f"context {engine.max_model_len} tokens, KV pool {s.num_blocks} blocks x "
            f"{s.block_size} tokens ({format_size(s.kv_bytes_total)}"
            f"{'; sliding layers hold their window' if any(engine.windows) else ''}), "
            f"prefix cache {'on' if engine.config.enable_prefix_caching else 'off'}, "
            f"serving at {url}")


def run_server(config: EngineConfig, server: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain (see lifecycle.py) and return."""
    from kvserve.server.lifecycle import DrainingServer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    engine = Engine(config)
    app = build_app(engine, server)
    log.info(banner(engine, app.state.ctx.model_name, f"http://{server.host}:{server.port}"))
    DrainingServer.serve_app(app, server)

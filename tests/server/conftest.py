"""Real servers on free loopback ports: the default model, float32, CPU, weights loaded once."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from threaded_server import serve_in_thread  # tests/, on the path through its conftest

from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.server.app import build_app
from kvserve.server.serving import ServerContext

SMALL_POOL = 64 << 20  # 91 blocks of 16 tokens: enough here, and quick to allocate


@dataclass
class Server:
    url: str
    ctx: ServerContext

    @property
    def engine(self) -> Engine:
        return self.ctx.engine.engine

    def on_engine(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread, between steps."""
        return self.ctx.engine.call_threadsafe(fn).result(timeout=60)

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    return sample.value
        raise KeyError(name)

    def wait_idle(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll /cache/stats until nothing runs or waits; then check the block accounting."""
        deadline = time.monotonic() + timeout
        while True:
            stats = httpx.get(f"{self.url}/cache/stats", headers=self.auth).json()
            if stats["num_running"] == stats["num_waiting"] == 0:
                break
            assert time.monotonic() < deadline, f"engine still busy: {stats}"
            time.sleep(0.05)
        assert self.on_engine(lambda e: (e.check_integrity(), e.has_unfinished()))[1] is False
        return stats

    @contextmanager
    def options(self, **changes: Any) -> Iterator[Server]:
        """The server with other ServerConfig values (those read per request) for a while."""
        before = self.ctx.config
        self.ctx.config = dataclasses.replace(before, **changes)
        try:
            yield self
        finally:
            self.ctx.config = before

    @property
    def auth(self) -> dict[str, str]:
        keys = self.ctx.config.api_key
        return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


@contextmanager
def running_server(checkpoint, engine_options: dict[str, Any] | None = None,
                   **app_options: Any) -> Iterator[Server]:
    config = EngineConfig(device="cpu", kv_cache_memory=SMALL_POOL, **(engine_options or {}))
    app = build_app(Engine(config, checkpoint), **app_options)
    with serve_in_thread(app) as url:
        yield Server(url, app.state.ctx)


@pytest.fixture(scope="session")
def start_server(checkpoint) -> Callable[..., AbstractContextManager[Server]]:
    """``with start_server(engine_options, **app_options) as server:`` another server."""
    return functools.partial(running_server, checkpoint)


@pytest.fixture(scope="session")
def server(checkpoint) -> Iterator[Server]:
    with running_server(checkpoint) as s:
        yield s


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c

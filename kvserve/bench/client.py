"""An async load client for any OpenAI-compatible server (kvserve, llama.cpp, vLLM).

Every request streams (``stream_options.include_usage``) so each one yields its time to the
first text, the gaps between text chunks, and its end-to-end time. Token counts come from the
server's ``usage`` when it sends one, else from the number of text chunks.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
ERROR_CHARS = 500  # an error body is cut to this many characters


class BenchError(ValueError):
    """A benchmark that cannot run, or whose requests failed. A ValueError so that the CLI
    prints it on one line and exits with status 2."""


@dataclass(frozen=True)
class LoadSpec:
    """One workload: ``prompts`` holds one prompt per request, sent in order."""

    base_url: str
    prompts: tuple[str, ...]
    model: str | None = None  # None: the first id GET /v1/models lists
    endpoint: str = "chat"
    max_tokens: int = 50
    concurrency: int = 4
    request_rate: float = math.inf  # requests/s with Poisson arrivals; inf: all at once
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    seed: int = 0

    @property
    def root(self) -> str:
        """The server's address without a trailing ``/v1``: both spellings are accepted."""
        return self.base_url.rstrip("/").removesuffix("/v1")


@dataclass
class RequestResult:
    error: str | None = None
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    num_chunks: int = 0  # chunks that carried text
    completion_tokens: int | None = None  # from the server's usage
    cached_tokens: int | None = None

    @property
    def output_tokens(self) -> int:
        return self.num_chunks if self.completion_tokens is None else self.completion_tokens

    @property
    def decode_s(self) -> float:
        return self.e2e_s - self.ttft_s

    @property
    def tpot_s(self) -> float | None:
        n = self.output_tokens
        return self.decode_s / (n - 1) if n > 1 else None


@dataclass(frozen=True)
class LoadResult:
    model: str
    requests: list[RequestResult]
    duration_s: float

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.requests if r.error is None]

    @property
    def first_error(self) -> str | None:
        return next((r.error for r in self.requests if r.error is not None), None)


def arrival_offsets(num: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request arrives: a Poisson process of ``rate``
    requests/s (exponential gaps), or all at time 0 when the rate is infinite."""
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(num):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def request_body(spec: LoadSpec, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "temperature": 0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if spec.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body | spec.extra_body


def chunk_text(chunk: dict[str, Any], endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def resolve_model(client: httpx.AsyncClient, spec: LoadSpec) -> str:
    """The model to ask for, checked against GET /v1/models where the server has one."""
    url = f"{spec.root}/v1/models"
    try:
        response = await client.get(url)
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {spec.root}: {exc or type(exc).__name__} "
                         "(is the server running? check --base-url)") from exc
    if response.status_code in (401, 403):
        raise BenchError(f"GET {url} answered {response.status_code} (check --api-key): "
                         f"{_cut(response.text)}")
    if response.status_code != 200:
        if spec.model is not None:
            return spec.model  # the server has no model list; trust the name given
        raise BenchError(f"GET {url} answered {response.status_code}, so pass --model: "
                         f"{_cut(response.text)}")
    ids = [card["id"] for card in response.json().get("data", [])]
    if spec.model is None:
        if not ids:
            raise BenchError(f"GET {url} lists no models; pass --model")
        return ids[0]
    if spec.model not in ids:
        raise BenchError(f"model {spec.model!r} is not served at {spec.root} "
                         f"(GET /v1/models lists {ids})")
    return spec.model


async def send(client: httpx.AsyncClient, spec: LoadSpec, model: str,
               prompt: str) -> RequestResult:
    """One streamed request, timed; a failure is recorded in the result, never raised."""
    url = spec.root + ENDPOINTS[spec.endpoint]
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=request_body(spec, model, prompt)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                return RequestResult(error=f"HTTP {response.status_code}: {_cut(body)}")
            result = await _read_stream(response, spec.endpoint, start)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestResult(error=_cut(f"{type(exc).__name__}: {exc}"))
    if result.error is None and result.num_chunks == 0:
        result.error = "the stream carried no text"
    return result


async def _read_stream(response: httpx.Response, endpoint: str, start: float) -> RequestResult:
    result = RequestResult()
    last: float | None = None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = f"error event in the stream: {_cut(data)}"
            return result
        now = time.perf_counter()
        if chunk_text(chunk, endpoint):
            if last is None:
                result.ttft_s = now - start
            else:
                result.itl_s.append(now - last)
            last = now
            result.num_chunks += 1
        if chunk.get("usage"):
            usage = chunk["usage"]
            result.completion_tokens = usage.get("completion_tokens")
            result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    result.e2e_s = time.perf_counter() - start
    return result


async def run_load(spec: LoadSpec,
                   on_done: Callable[[RequestResult], None] = lambda _: None) -> LoadResult:
    """Send every prompt of ``spec`` (at most ``concurrency`` in flight) and time them."""
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    limits = httpx.Limits(max_connections=spec.concurrency + 1)
    timeout = httpx.Timeout(600.0, connect=10.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = await resolve_model(client, spec)
        gate = asyncio.Semaphore(spec.concurrency)
        start = time.perf_counter()

        async def one(prompt: str, offset: float) -> RequestResult:
            await asyncio.sleep(max(0.0, offset - (time.perf_counter() - start)))
            async with gate:
                result = await send(client, spec, model, prompt)
            on_done(result)
            return result

        offsets = arrival_offsets(len(spec.prompts), spec.request_rate, spec.seed)
        results = await asyncio.gather(*(one(p, t) for p, t in zip(spec.prompts, offsets)))
        return LoadResult(model, list(results), time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def stats_ms(values_s: list[float]) -> dict[str, float | None]:
    """Mean, p50, p95 and p99 in milliseconds of values in seconds (None when there are none)."""
    if not values_s:
        return {"mean": None, "p50": None, "p95": None, "p99": None}
    ms = [v * 1000 for v in values_s]
    return {"mean": sum(ms) / len(ms), "p50": percentile(ms, 50), "p95": percentile(ms, 95),
            "p99": percentile(ms, 99)}


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS] + "..."

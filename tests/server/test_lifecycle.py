"""Request timeouts, and shutdown on SIGTERM: drain, abort what is left, flush, exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from kvserve.config import EngineConfig
from kvserve.engine.llm import LLM
from kvserve.sampling_params import SamplingParams

LONG = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}
ROOT = Path(__file__).resolve().parents[2]


def sse_events(url: str, body: dict, events: list, headers: dict | None = None) -> None:
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers,
                      timeout=120) as r:
        events.append(r.status_code)
        events.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))


@pytest.fixture
def impatient(server):
    with server.options(request_timeout=0.5) as s:
        yield s


def test_a_request_past_the_timeout_ends_with_408_and_frees_its_blocks(impatient):
    start = time.perf_counter()
    r = httpx.post(f"{impatient.url}/v1/completions", json=LONG, timeout=60)
    assert r.status_code == 408 and time.perf_counter() - start < 5
    assert r.json()["error"]["code"] == "request_timeout"
    events: list = []
    sse_events(f"{impatient.url}/v1/completions", LONG, events)
    assert events[0] == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    stats = impatient.wait_idle()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    ok = httpx.post(f"{impatient.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 11 blocks of 16 tokens of an int8 KV cache (12,960 bytes a token), named explicitly so that
# the pool holds the same tokens whatever ``auto`` resolves to on this machine.
POOL = str(11 * 16 * 12_960 + 1000)


def start_serve(*flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvserve.cli", "serve", "--port", str(port), "--device", "cpu",
         "--kv-cache-memory", POOL, "--kv-cache-dtype", "int8", *flags], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "kvserve serve did not start"
        time.sleep(0.1)


def stream_in_thread(url: str, body: dict) -> tuple[threading.Thread, list]:
    events: list = []
    thread = threading.Thread(target=sse_events,
                              args=(f"{url}/v1/completions", body, events))
    thread.start()
    deadline = time.monotonic() + 60
    while len(events) < 3:  # streaming has begun
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    return thread, events


def completion(url: str, prompt: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=60,
                      json={"prompt": prompt, "max_tokens": 1, "temperature": 0})


def test_sigterm_drains_flushes_the_disk_tier_and_exits_0(tmp_path):
    # A pool of 11 blocks of 16 tokens: eight prompts of two full blocks evict the first ones
    # to the disk tier (written behind; shutdown must flush them).
    folder = tmp_path / "kv"
    prompts = [f"Prompt number {i}: " + "the quick brown fox jumps over a lazy dog. " * 4
               for i in range(8)]
    # A grace period of 0.3 s: the 4-token answer ends within it, the 170-token one cannot
    # (it would need under 1.8 ms per token on this 2-core machine; a token takes 5 to 15).
    proc, url = start_serve("--kv-disk-cache", str(folder), "--shutdown-timeout", "0.3")
    try:
        for prompt in prompts:
            assert completion(url, prompt).status_code == 200
        short = {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
        done, done_events = stream_in_thread(url, short)
        cut, cut_events = stream_in_thread(url, {**short, "max_tokens": 170})
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = completion(url, "Hi")
        assert refused.status_code == 503 and "shutting down" in refused.text
        assert httpx.get(f"{url}/health").status_code == 503
        done.join(60)
        cut.join(60)
        assert proc.wait(60) == 0
    finally:
        proc.kill() if proc.poll() is None else None
    # Within the grace period: a whole answer. Past it: an error event, then [DONE].
    assert done_events[0] == 200 and done_events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in done_events[1:-1]]
    assert all("error" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert cut_events[0] == 200 and cut_events[-1] == "[DONE]"
    error = json.loads(cut_events[-2])["error"]
    assert error["type"] == "service_unavailable_error" and "--shutdown-timeout" in error["message"]
    # A restarted engine (the server's own settings, weights loaded the same way) reads the
    # flushed blocks back.
    llm = LLM(config=EngineConfig(device="cpu", kv_cache_memory=int(POOL),
                                  kv_cache_dtype="int8", kv_disk_cache=str(folder)))
    try:
        [out] = llm.generate([prompts[0]], SamplingParams(max_tokens=1, temperature=0))
        assert out.cached_tokens_by_tier.get("disk", 0) >= 16
    finally:
        llm.close()

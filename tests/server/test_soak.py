"""A bounded soak: 64 clients at once, streaming and not, n up to 2, mixed salts, a quarter of
them leaving at random points; afterwards nothing is held and every answer was whole."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

NUM_CLIENTS = 64
SECONDS = 8.0
MAX_TOKENS = 6
SALTS = [None, "team-a", "team-b"]
WORDS = "cache block token prefix page engine stream batch".split()


async def one_request(client: httpx.AsyncClient, rng: random.Random, tally: dict) -> None:
    n = rng.choice([1, 2])
    body = {"prompt": " ".join(rng.choices(WORDS, k=rng.randint(2, 40))),
            "max_tokens": MAX_TOKENS, "ignore_eos": True, "n": n}
    if salt := rng.choice(SALTS):
        body["cache_salt"] = salt
    leave = rng.random() < 0.25
    if rng.random() < 0.5:
        async with client.stream("POST", "/v1/completions",
                                 json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events, finished = [], {}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if leave and len(events) >= rng.randint(1, 4):
                    tally["left"] += 1
                    return  # the client goes away mid-stream
                if events[-1] != "[DONE]":
                    chunk = json.loads(events[-1])
                    assert "error" not in chunk, chunk
                    for choice in chunk["choices"]:
                        if choice["finish_reason"]:
                            finished[choice["index"]] = choice["finish_reason"]
        assert events[-1] == "[DONE]" and finished == {k: "length" for k in range(n)}
    else:
        request = client.post("/v1/completions", json=body)
        if leave:
            try:
                await asyncio.wait_for(request, rng.uniform(0.01, 1.0))
            except asyncio.TimeoutError:
                tally["left"] += 1
                return
        else:
            r = await request
            assert r.status_code == 200, r.text
            answer = r.json()
            assert answer["usage"]["completion_tokens"] == n * MAX_TOKENS
            assert [c["finish_reason"] for c in answer["choices"]] == ["length"] * n
    tally["whole"] += 1


async def soak(url: str) -> dict:
    tally = {"whole": 0, "left": 0}
    deadline = time.monotonic() + SECONDS
    limits = httpx.Limits(max_connections=NUM_CLIENTS * 2)

    async def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            while time.monotonic() < deadline:
                await one_request(client, rng, tally)

    await asyncio.gather(*(client_loop(i) for i in range(NUM_CLIENTS)))
    return tally


def test_64_clients_leave_nothing_behind(server):
    tally = asyncio.run(soak(server.url))
    preempted = server.on_engine(lambda e: e.stats().scheduler.num_preemptions)
    print(f"soak: {tally}, {preempted} preemptions so far")
    assert tally["whole"] + tally["left"] >= NUM_CLIENTS and tally["left"] > 0, tally
    assert tally["whole"] >= NUM_CLIENTS // 2, tally  # each client sends at least one
    stats = server.wait_idle(timeout=60)  # nothing running or waiting; integrity checked
    assert stats["num_running"] == stats["num_waiting"] == 0
    httpx.post(f"{server.url}/cache/clear")
    stats = httpx.get(f"{server.url}/cache/stats").json()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert server.ctx.engine.num_waiting == 0 and not server.ctx.engine.groups
    server.on_engine(lambda e: e.check_integrity())

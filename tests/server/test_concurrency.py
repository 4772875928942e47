"""One engine loop for every HTTP request: batched, exact, and clean when clients leave."""

from __future__ import annotations

import asyncio
import json

import httpx

from kvserve import SamplingParams

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "List three primary colors:", "The theory of relativity says that", "Water boils at",
    "My favourite recipe for pancakes starts with", "import numpy as np\n\n# the mean\n",
    "The quick brown fox", "In 1969, astronauts", "Photosynthesis is the process",
    "SELECT name FROM users WHERE", "The best way to learn a language is",
    "Dear hiring manager,", "Rain in Spain falls", "A haiku about the sea:",
]
MAX_TOKENS = 12


async def _complete_all(url: str, prompts: list[str]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                   "return_token_ids": True} for p in prompts]
        responses = await asyncio.gather(*(client.post("/v1/completions", json=b)
                                           for b in bodies))
    assert all(r.status_code == 200 for r in responses)
    return [r.json() for r in responses]


def test_concurrent_greedy_requests_match_the_offline_llm(server, llm):
    steps_before = server.on_engine(lambda e: e.scheduler.stats.num_steps)
    answers = asyncio.run(_complete_all(server.url, PROMPTS))
    steps = server.on_engine(lambda e: e.scheduler.stats.num_steps) - steps_before
    expected = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                    ignore_eos=True))
    assert [a["choices"][0]["token_ids"] for a in answers] == [o.token_ids for o in expected]
    assert [a["choices"][0]["text"] for a in answers] == [o.text for o in expected]
    assert steps < len(PROMPTS) * MAX_TOKENS // 2  # they shared steps: one loop batched them
    server.wait_idle()


async def _leave_streams_midway(url: str, num_streams: int) -> None:
    body = {"prompt": "Count from one to a thousand:", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def read_two_chunks() -> None:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        assert json.loads(line[6:])["choices"][0]["finish_reason"] is None
                        seen += 1
                        if seen == 2:
                            return  # closes the connection mid-stream

        await asyncio.gather(*(read_two_chunks() for _ in range(num_streams)))


def test_disconnected_streams_are_aborted_and_their_blocks_freed(server):
    aborted = server.metric("kvserve_requests_finished_total", finish_reason="abort")
    asyncio.run(_leave_streams_midway(server.url, 4))
    stats = server.wait_idle(timeout=20)  # 400 tokens each would take far longer
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert server.metric("kvserve_requests_finished_total", finish_reason="abort") == aborted + 4


def test_a_client_that_leaves_before_its_answer_is_aborted(server):
    aborted = server.metric("kvserve_requests_finished_total", finish_reason="abort")
    body = {"prompt": "Count to a thousand:", "max_tokens": 400, "ignore_eos": True}
    try:
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.0)
        raise AssertionError("400 tokens came back within a second")
    except httpx.ReadTimeout:
        pass
    stats = server.wait_idle(timeout=20)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert server.metric("kvserve_requests_finished_total", finish_reason="abort") == aborted + 1

"""The API key and the waiting-queue limit, on a server with both."""

from __future__ import annotations

import asyncio

import httpx
import pytest

KEY = "sk-test-key"
MAX_WAITING = 2
GUARDED = [("GET", "/v1/models", None),
           ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
           ("POST", "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
           ("POST", "/generate", {"prompt": "hi", "max_new_tokens": 1}),
           ("GET", "/cache/stats", None), ("POST", "/cache/clear", None)]


@pytest.fixture(scope="module")
def guarded(start_server):
    # One sequence at a time, so requests queue up behind each other.
    with start_server({"max_num_seqs": 1}, api_key=KEY, max_waiting=MAX_WAITING) as s:
        yield s


@pytest.mark.parametrize("method, path, body", GUARDED)
def test_api_key_is_required(guarded, method, path, body):
    url = guarded.url + path
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.request(method, url, json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60)
    assert r.status_code == 200, r.text


def test_health_and_metrics_stay_open(guarded):
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    assert httpx.get(f"{guarded.url}/metrics").status_code == 200


async def _burst(url: str, num_requests: int) -> list[httpx.Response]:
    body = {"prompt": "Tell me a story", "max_tokens": 24, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=body)
                                      for _ in range(num_requests)))


def test_a_full_queue_answers_503_and_keeps_what_it_accepted(guarded):
    responses = asyncio.run(_burst(guarded.url, 8))
    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    assert len(accepted) + len(refused) == 8
    assert len(accepted) >= MAX_WAITING and refused
    for r in refused:
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "service_unavailable_error"
    for r in accepted:
        assert r.json()["usage"]["completion_tokens"] == 24
        assert r.json()["choices"][0]["finish_reason"] == "length"
    guarded.wait_idle()
    assert guarded.ctx.engine.num_waiting == 0


def test_more_choices_than_the_queue_holds_is_a_400(guarded):
    r = httpx.post(f"{guarded.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": "hi", "max_tokens": 1, "n": MAX_WAITING + 1})
    assert r.status_code == 400

"""The server's limits answer clear 4xx errors, and nothing heavy runs on the event loop."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from kvserve.server.admission import encode

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
LIMITS = {"max_prompts": 3, "max_n": 2, "max_stop_strings": 2, "max_stop_length": 8,
          "max_request_tokens": 40, "max_no_cache_tokens": 24}


@pytest.fixture
def limited(server):
    with server.options(**LIMITS) as s:
        yield s


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None, *words: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], error["message"]


@pytest.mark.parametrize("route, body, param, flag", [
    (COMPLETIONS, {"prompt": "x", "stop": ["a", "b", "c"]}, "stop", "--max-stop-strings"),
    (COMPLETIONS, {"prompt": "x", "stop": "123456789"}, "stop", "--max-stop-length"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 3}, "stop",
     "--max-stop-strings"),
    (COMPLETIONS, {"prompt": ["a", "b", "c", "d"]}, "prompt", "--max-prompts"),
    (COMPLETIONS, {"prompt": "x", "n": 3}, "n", "--max-n"),
    (COMPLETIONS, {"prompt": "x", "n": 2, "max_tokens": 21}, "max_tokens",
     "--max-request-tokens"),
    (COMPLETIONS, {"prompt": ["a", "b"], "max_tokens": 21}, "max_tokens",
     "--max-request-tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 24, "use_kv_cache": False}, "use_kv_cache",
     "--max-no-cache-tokens"),
    ("/generate", {"prompt": "x", "max_new_tokens": 41}, "max_new_tokens",
     "--max-request-tokens"),
    ("/generate", {"prompt": "x", "max_new_tokens": 24, "use_cache": False}, "use_cache",
     "--max-no-cache-tokens"),
])
def test_each_limit_is_a_400_naming_the_field_and_the_option(limited, route, body, param, flag):
    assert_error(post(limited, route, body), 400, param, flag)


def test_within_the_limits_requests_run(limited):
    r = post(limited, COMPLETIONS, {"prompt": ["a", "b"], "n": 2, "max_tokens": 10,
                                    "stop": ["12345678", "@@"], "ignore_eos": True,
                                    "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
    r = post(limited, "/generate", {"prompt": "x", "max_new_tokens": 20, "use_cache": False})
    assert r.status_code == 200
    # With no max_tokens, a chat request gets what the limits leave: 40 tokens for 2 choices.
    r = post(limited, CHAT, {"messages": [{"role": "user", "content": "Count to 100"}], "n": 2,
                             "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
    limited.wait_idle()


def test_a_body_over_the_limit_is_a_413_before_or_while_it_is_read(server):
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()  # over the default 2 MiB
    r = httpx.post(server.url + COMPLETIONS, content=big,
                   headers={"Content-Type": "application/json"})
    assert_error(r, 413, None, "--max-body-size")
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    r = httpx.post(server.url + COMPLETIONS, content=chunks(),
                   headers={"Content-Type": "application/json"})
    assert_error(r, 413, None, "--max-body-size")
    assert httpx.get(server.url + "/health").status_code == 200


def test_the_gil_free_encode_gives_the_tokenizer_s_ids(server):
    tokenizer = server.ctx.tokenizer
    for text in ("Hello, world!", " leading space", "ünïcödé 日本語 🙂", "a\n\nb\tc", ""):
        for special in (True, False):
            assert encode(tokenizer, text, special) == tokenizer.encode(text, special), text


def test_health_answers_while_huge_prompts_are_tokenized_and_refused(server):
    """Tokenizing ~600k characters takes about a second of a worker thread; refusing a
    multi-megabyte body or text costs nothing; /health answers throughout."""
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            while not done.is_set():
                start = time.perf_counter()
                assert c.get("/health").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        words = "The cache is the product. " * 24_000  # 624k characters: tokenized, too long
        r = post(server, COMPLETIONS, {"prompt": words, "max_tokens": 1})
        assert_error(r, 400, "prompt", "8192")
        r = post(server, CHAT, {"messages": [{"role": "user", "content": words}]})
        assert_error(r, 400, "messages", "8192")
        r = post(server, COMPLETIONS, {"prompt": words * 3})  # 1.9 MB: refused untokenized
        assert_error(r, 400, "prompt", "characters")
        r = post(server, COMPLETIONS, {"prompt": [7] * 250_000})  # 0.75 MB of token ids
        assert_error(r, 400, "prompt", "8192")
        r = post(server, COMPLETIONS, {"prompt": words * 40})  # 25 MB: 413 from its length
        assert r.status_code == 413
    finally:
        done.set()
        poller.join()
    assert len(latencies) > 5 and max(latencies) < 0.5, max(latencies)

"""Engine faults: one failing request fails alone; a dead loop turns /health to 503."""

from __future__ import annotations

import json

import httpx
import pytest

POISON_SEED = 4242  # the patched runner fails any step that runs a request with this seed


@pytest.fixture
def fragile(start_server, monkeypatch):
    with start_server() as s:
        runner = s.engine.runner
        execute = runner.execute

        def failing_execute(out, *args, **kwargs):
            if any(s.params.seed == POISON_SEED for s in out.scheduled):
                raise RuntimeError("injected fault")
            return execute(out, *args, **kwargs)

        monkeypatch.setattr(runner, "execute", failing_execute)
        yield s


def test_a_failing_request_fails_alone_and_the_loop_serves_on(fragile):
    body = {"prompt": "Hello", "max_tokens": 4, "seed": POISON_SEED}
    r = httpx.post(f"{fragile.url}/v1/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
    with httpx.stream("POST", f"{fragile.url}/v1/completions",
                      json={**body, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["type"] == "internal_server_error"
    assert events[-1] == "[DONE]"
    assert fragile.metric("kvserve_requests_finished_total", finish_reason="error") == 2
    ok = httpx.post(f"{fragile.url}/v1/completions", json={**body, "seed": 1})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(f"{fragile.url}/health").status_code == 200
    fragile.wait_idle()


def test_a_dead_engine_loop_answers_503(fragile, monkeypatch):
    def broken() -> bool:
        raise RuntimeError("injected loop fault")

    monkeypatch.setattr(fragile.engine, "has_unfinished", broken)
    r = httpx.post(f"{fragile.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 503 and "stopped" in r.json()["error"]["message"]
    assert httpx.get(f"{fragile.url}/health").status_code == 503
    r = httpx.post(f"{fragile.url}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503
    assert httpx.get(f"{fragile.url}/cache/stats").status_code == 503


def test_a_surrogate_salt_is_refused_while_a_healthy_stream_goes_on(server):
    import threading

    events: list[str] = []

    def stream() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True,
                "stream": True, "temperature": 0}  # sampled, a token may end mid-character
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            events.append(str(r.status_code))
            events.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))

    healthy = threading.Thread(target=stream)
    healthy.start()
    bad = httpx.post(f"{server.url}/v1/completions", timeout=60,
                     content=b'{"prompt": "hi", "max_tokens": 4, "cache_salt": "\\ud800"}',
                     headers={"Content-Type": "application/json"})
    healthy.join(120)
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["param"] == "cache_salt" and "Unicode" in error["message"]
    assert events[0] == "200" and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[1:-1]]
    assert all("error" not in c for c in chunks)
    assert sum(len(c["choices"]) for c in chunks) >= 24
    server.wait_idle()

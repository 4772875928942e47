"""Property-based fuzzing of the live server's own OpenAPI schema (schemathesis).

Every route gets schema-conforming requests and (three times as many) schema-violating ones,
with a fixed seed; the
server's limits keep each generation to a few tokens, so the run is short. No answer may be a
5xx, every 4xx is in OpenAI's error shape, and the server stays healthy. Set
KVSERVE_FUZZ_EXAMPLES to generate more per route and mode (docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
from collections import Counter

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

# Per route: a valid request runs the model (a few tokens), an invalid one costs little.
EXAMPLES = int(os.environ.get("KVSERVE_FUZZ_EXAMPLES", "40"))
LIMITS = {"max_request_tokens": 4, "max_no_cache_tokens": 48, "max_n": 2, "max_prompts": 2,
          "max_stop_strings": 4, "request_timeout": 30.0}
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


@pytest.fixture
def fuzzed(server):
    with server.options(**LIMITS) as s:
        yield s


def check(response: httpx.Response, where: str) -> None:
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
        assert isinstance(error["message"], str) and error["message"], where


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_no_generated_request_gets_a_5xx(fuzzed, mode):
    schema = schemathesis.openapi.from_dict(httpx.get(f"{fuzzed.url}/openapi.json").json())
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=fuzzed.url, timeout=60) as client:
        for result in schema.get_all_operations():
            operation = result.ok()
            negative = mode.value == "negative"
            if negative and not (len(operation.body) or len(operation.path_parameters)):
                continue  # nothing of its request can be made invalid

            @seed(1234)
            @settings(max_examples=EXAMPLES * (3 if negative else 1), deadline=None, database=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def send(case) -> None:
                kwargs = case.as_transport_kwargs(base_url=fuzzed.url)
                r = client.request(kwargs["method"], kwargs["url"],
                                   headers=kwargs.get("headers"), params=kwargs.get("params"),
                                   content=_content(kwargs))
                statuses[r.status_code] += 1
                check(r, f"{case.method} {case.formatted_path} {str(case.body)[:300]}")
                if r.status_code >= 400:
                    assert client.get("/health").status_code == 200

            try:
                send()
            except Unsatisfiable:  # no invalid request of this shape (a free-text path)
                assert mode.value == "negative", operation.label
    print(f"{mode.value}: {sum(statuses.values())} requests, statuses {dict(statuses)}")
    assert sum(statuses.values()) >= EXAMPLES, statuses
    r = client_ok(fuzzed)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    fuzzed.wait_idle()


def client_ok(server) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": "Hello", "max_tokens": 2, "ignore_eos": True})


def _content(kwargs: dict) -> bytes | None:
    import json

    if "json" in kwargs:
        return json.dumps(kwargs["json"]).encode()
    data = kwargs.get("data")
    return data.encode() if isinstance(data, str) else data

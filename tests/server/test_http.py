"""Plain HTTP: the legacy and operational routes, and every kind of bad input."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

LONG_PROMPT = "Paged attention stores keys and values in fixed-size blocks of tokens. " * 6
GENERATE_KEYS = {"text", "latency_ms", "tokens_per_sec", "cache_enabled", "prefix_cache_hit",
                 "timings"}
TIMING_KEYS = {"tokenize_ms", "cache_lookup_ms", "ttft_ms", "decode_ms", "total_ms",
               "prefix_tokens_saved"}


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_each_finished_request_logs_one_line(client, caplog):
    caplog.set_level(logging.INFO, logger="kvserve.server")
    answer = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3,
                                                  "ignore_eos": True}).json()
    lines = [r.getMessage() for r in caplog.records if answer["id"] in r.getMessage()]
    assert len(lines) == 1
    assert "1 prompt tokens (0 cached), 3 generated, TTFT" in lines[0]
    assert lines[0].endswith("length")


def test_generate_shape_and_cache_modes_agree(client):
    body = {"prompt": "Once upon a time", "max_new_tokens": 12}
    cached = client.post("/generate", json=body).json()
    recomputed = client.post("/generate", json={**body, "use_cache": False,
                                                "use_prefix_cache": False}).json()
    assert set(cached) == GENERATE_KEYS and set(cached["timings"]) == TIMING_KEYS
    assert cached["text"] and cached["text"] == recomputed["text"]  # greedy by default
    assert cached["cache_enabled"] is True and recomputed["cache_enabled"] is False
    t = cached["timings"]
    assert 0 < t["ttft_ms"] <= t["total_ms"] == cached["latency_ms"]
    assert t["decode_ms"] == pytest.approx(t["total_ms"] - t["ttft_ms"], abs=0.01)
    assert cached["tokens_per_sec"] == pytest.approx(12 / (t["total_ms"] / 1000), rel=1e-3)


def test_generate_reports_a_prefix_hit_on_a_repeat(client):
    body = {"prompt": LONG_PROMPT, "max_new_tokens": 2}
    client.post("/generate", json=body)
    again = client.post("/generate", json=body).json()
    assert again["prefix_cache_hit"] is True
    assert again["timings"]["prefix_tokens_saved"] >= 16


def test_cache_stats_and_clear(client, server):
    client.post("/generate", json={"prompt": LONG_PROMPT + " Again.", "max_new_tokens": 2})
    stats = server.wait_idle()
    assert {"cache_size", "hits", "misses", "hit_rate", "total_requests"} <= set(stats)
    assert stats["total_requests"] == stats["hits"] + stats["misses"] > 0
    assert stats["hit_rate"] == pytest.approx(stats["hits"] / stats["total_requests"])
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    cleared = client.post("/cache/clear").json()["cleared_blocks"]
    assert cleared > 0  # the prompt above left full blocks in the prefix cache
    assert client.post("/cache/clear").json() == {"cleared_blocks": 0}
    server.on_engine(lambda e: e.check_integrity())


def test_metrics_count_a_request(client, server):
    before = {name: server.metric(name, **labels) for name, labels in METRICS}
    client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 5,
                                         "ignore_eos": True})
    after = {name: server.metric(name, **labels) for name, labels in METRICS}
    grew = {name: after[name] - before[name] for name in after}
    assert grew["kvserve_requests_finished_total"] == 1
    assert grew["kvserve_generation_tokens_total"] == 5
    assert grew["kvserve_prompt_tokens_total"] == 2
    assert grew["kvserve_prefix_cache_queried_tokens_total"] == 2
    assert grew["kvserve_time_to_first_token_seconds_count"] == 1
    assert grew["kvserve_inter_token_latency_seconds_count"] == 4
    assert grew["kvserve_e2e_request_latency_seconds_count"] == 1
    assert server.metric("kvserve_requests_running") == 0
    assert 0 <= server.metric("kvserve_kv_usage_ratio") <= 1
    assert server.metric("kvserve_kv_blocks_used") >= 0


METRICS = [("kvserve_requests_finished_total", {"finish_reason": "length"}),
           ("kvserve_generation_tokens_total", {}), ("kvserve_prompt_tokens_total", {}),
           ("kvserve_prefix_cache_queried_tokens_total", {}),
           ("kvserve_time_to_first_token_seconds_count", {}),
           ("kvserve_inter_token_latency_seconds_count", {}),
           ("kvserve_e2e_request_latency_seconds_count", {})]

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
BAD_INPUTS = [
    # (route, body, param)
    (COMPLETIONS, {}, "prompt"),
    (COMPLETIONS, {"prompt": 5}, "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": [[]]}, "prompt"),
    (COMPLETIONS, {"prompt": [10**9]}, "prompt"),
    (COMPLETIONS, {"prompt": [-1]}, "prompt"),
    (COMPLETIONS, {"prompt": "a\ud800b"}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "16"}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "temperature": 2.5}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "temperature": True}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, "top_p"),
    (COMPLETIONS, {"prompt": "x", "top_k": -2}, "top_k"),
    (COMPLETIONS, {"prompt": "x", "min_p": 1.5}, "min_p"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, "n"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 6}, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "seed": -1}, "seed"),
    (COMPLETIONS, {"prompt": "x", "stop": ""}, "stop"),
    (COMPLETIONS, {"prompt": "x", "stop": [1]}, "stop[0]"),
    (COMPLETIONS, {"prompt": "x", "stream": "yes"}, "stream"),
    (COMPLETIONS, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    (COMPLETIONS, {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"one": 5}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"1": 101}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    (COMPLETIONS, {"prompt": "x", "min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    (COMPLETIONS, {"prompt": "x", "use_kv_cache": "no"}, "use_kv_cache"),
    (COMPLETIONS, {"prompt": "x", "cache_salt": 3}, "cache_salt"),
    (CHAT, {}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": ["hi"]}, "messages[0]"),
    (CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": "\udfff"}]}, "messages[0].content"),
    (CHAT, {"messages": USER, "max_completion_tokens": -3}, "max_completion_tokens"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": USER, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": 1}, "logprobs"),
    # Refused, never ignored: unknown fields, and fields that would change the output.
    (COMPLETIONS, {"prompt": "x", "something_new": 1}, "something_new"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x"),
    (COMPLETIONS, {"prompt": "x", "suffix": "end"}, "suffix"),
    (COMPLETIONS, {"prompt": "x", "best_of": 3}, "best_of"),
    (COMPLETIONS, {"prompt": "x", "cache_salt": ""}, "cache_salt"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema"}}, "response_format"),
    (CHAT, {"messages": USER, "response_format": {"type": "xml"}}, "response_format.type"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f f"}}]},
     "tools[0].function.name"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    (CHAT, {"messages": USER, "structured_outputs": {"choice": []}},
     "structured_outputs.choice"),
    (CHAT, {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    (CHAT, {"messages": USER, "functions": [{"name": "f"}]}, "functions"),
    (CHAT, {"messages": USER, "reasoning_effort": "high"}, "reasoning_effort"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ("/generate", {"prompt": "x", "max_tokens": 4}, "max_tokens"),
    # Token ids are checked before anything detokenizes them (echo).
    (COMPLETIONS, {"prompt": [-1], "echo": True}, "prompt"),
    (COMPLETIONS, {"prompt": [[5], [10**9]], "echo": True}, "prompt"),
    (COMPLETIONS, {"prompt": [2**70], "echo": True, "stream": True}, "prompt"),
    ("/generate", {"max_new_tokens": 4}, "prompt"),
    ("/generate", {"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ("/generate", {"prompt": "x", "use_cache": "true"}, "use_cache"),
]


@pytest.mark.parametrize("route, body, param", BAD_INPUTS)
def test_bad_input_is_a_400_naming_the_field(client, route, body, param):
    r = client.post(route, content=json.dumps(body),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_refusals_say_why_with_a_code(client):
    r = client.post(CHAT, json={"messages": USER, "temperature": 0, "logit_bias_x": 1})
    error = r.json()["error"]
    assert error["code"] == "unknown_parameter" and "'logit_bias_x'" in error["message"]
    r = client.post(COMPLETIONS, json={"prompt": "x", "suffix": "y"})
    error = r.json()["error"]
    assert error["code"] == "unsupported_parameter" and "not supported yet" in error["message"]


def test_neutral_values_of_unimplemented_fields_are_accepted(client):
    body = {"messages": USER, "max_tokens": 1, "user": "u", "metadata": {"k": "v"},
            "store": False, "service_tier": "auto", "response_format": {"type": "text"},
            "tools": [], "tool_choice": "auto", "parallel_tool_calls": True,
            "prompt_cache_key": "k", "safety_identifier": "s", "presence_penalty": 0,
            "frequency_penalty": 0, "logit_bias": {}, "stream_options": None}
    assert client.post(CHAT, json=body).status_code == 200
    r = client.post(COMPLETIONS, json={"prompt": [5, 6], "echo": True, "max_tokens": 1,
                                       "best_of": 1, "suffix": ""})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


@pytest.mark.parametrize("content", [b"{", b"not json", b"[1, 2]", b'"text"', b"", b"null",
                                     b"\xff\xfe", b'{"prompt": "x",}', b"1e999"])
def test_malformed_bodies_are_400(client, content):
    for route in (COMPLETIONS, CHAT, "/generate"):
        r = client.post(route, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (route, content, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_too_long_for_the_context_or_the_pool_gives_the_limits(client, server):
    r = client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 100_000})
    assert r.status_code == 400 and "8192" in r.json()["error"]["message"]
    pool = server.ctx.num_pool_tokens
    r = client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": pool + 10})
    assert r.status_code == 400 and str(pool) in r.json()["error"]["message"]
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi " * 9000}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert server.wait_idle()["kv_blocks_free"] == server.engine.kv.num_blocks  # nothing leaked


def test_model_card_says_which_weights_and_kv_cache_run(client):
    (card,) = client.get("/v1/models").json()["data"]
    assert card["object"] == "model" and card["owned_by"] == "kvserve"
    # the tests' server runs the dequantized float32 checkpoint: auto keeps a float32 cache
    assert card["weights"] == "float32" and card["kv_cache_dtype"] == "float32"
    assert client.get(f"/v1/models/{card['id']}").json() == card


def test_unknown_model_routes_and_methods_keep_the_error_shape(client):
    r = client.post(COMPLETIONS, json={"model": "gpt-4o", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert client.get("/v1/nothing").json()["error"]["message"]
    r = client.get(COMPLETIONS)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_odd_inputs_never_give_a_500(client):
    odd = [{"prompt": "x", "max_tokens": 10**30}, {"prompt": [[1], "two"]},
           {"prompt": "x", "temperature": float("nan")}, {"prompt": "x", "n": 10**6},
           {"prompt": "x", "stop": [None]}, {"prompt": {"a": 1}}, {"prompt": "x", "seed": 2**70},
           {"prompt": [True, False]}, {"prompt": "x", "temperature": 1e-300, "max_tokens": 2},
           {"prompt": "\x00" * 50, "max_tokens": 2},
           {"prompt": "x", "logprobs": None, "max_tokens": 2, "top_k": 10**12},
           {"prompt": "x", "max_tokens": 2, "top_p": 5e-324}]  # 0 in float32: found by fuzzing
    for body in odd:
        r = client.post(COMPLETIONS, content=json.dumps(body, allow_nan=True),
                        headers={"Content-Type": "application/json"})
        assert r.status_code in (200, 400), (body, r.text)
    assert r.status_code == 200  # the tiny top_p keeps the most likely token alone
    assert client.get("/health").status_code == 200


def test_form_encoded_body_says_to_send_json(server):
    r = httpx.post(f"{server.url}{COMPLETIONS}", data={"prompt": "x"})
    assert r.status_code == 400 and "application/json" in r.json()["error"]["message"]

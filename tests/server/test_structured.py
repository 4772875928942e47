"""Structured output through the official `openai` client on the real model: JSON schemas,
JSON objects, regexes and choices; and the 400s of constraints that do not compile."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

NAME = {"type": "string", "maxLength": 16}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0,
                                                            "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"], "additionalProperties": False},
    {"type": "object", "properties": {"fruits": {"type": "array", "items": NAME, "minItems": 1,
                                                 "maxItems": 3}},
     "required": ["fruits"], "additionalProperties": False},
    {"type": "object", "properties": {"person": {
        "type": "object", "properties": {"first": NAME, "last": NAME},
        "required": ["first", "last"], "additionalProperties": False}},
     "required": ["person"], "additionalProperties": False},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50,
                                                      "maximum": 60},
                                      "unit": {"enum": ["C", "F"]}},
     "required": ["temperature", "unit"], "additionalProperties": False},
    {"type": "object", "properties": {"title": NAME, "done": {"type": "boolean"},
                                      "note": NAME},  # note is optional
     "required": ["title", "done"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
     "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"city": NAME, "population": {"type": "integer",
                                                                   "minimum": 0,
                                                                   "maximum": 99999999}},
     "required": ["city", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"], "additionalProperties": False}}},
     "required": ["points"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                      "confidence": {"type": "number", "minimum": 0,
                                                     "maximum": 1}},
     "required": ["answer", "confidence"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def chat(oai, content: str, **kwargs):
    return oai.chat.completions.create(
        model=None, messages=[{"role": "user", "content": content}], temperature=0, **kwargs)


def test_ten_json_schemas_at_once_all_parse_and_validate(server, oai):
    def ask(i_schema):
        i, schema = i_schema
        return chat(oai, f"Reply in JSON. Example {i}.", max_tokens=48, response_format={
            "type": "json_schema",
            "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        replies = list(pool.map(ask, enumerate(SCHEMAS)))
    for schema, reply in zip(SCHEMAS, replies):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert server.engine.grammars.num_compiled >= len(SCHEMAS)
    server.wait_idle()


def test_json_object_regex_and_choice(oai):
    reply = chat(oai, 'Reply with the JSON object {"ok": true}.', max_tokens=40,
                 response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    pattern = r"[0-9]{3}-[0-9]{4}"
    reply = chat(oai, "A phone number:", max_tokens=12,
                 extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, reply.choices[0].message.content)
    reply = oai.completions.create(model=None, prompt="The sky is", max_tokens=5, temperature=0,
                                   extra_body={"structured_outputs": {
                                       "choice": ["green", "blue", "plaid"]}})
    assert reply.choices[0].text in ("green", "blue", "plaid")
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]+/'
    reply = chat(oai, "What is 2 + 2?", max_tokens=12,
                 extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"The answer is [0-9]+\.", reply.choices[0].message.content)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs"),
])
def test_a_constraint_that_does_not_compile_is_a_400_naming_it(oai, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        chat(oai, "hi", max_tokens=4, extra_body=body)
    assert err.value.body["param"] == param


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def assert_valid_call(call, names=("get_weather", "get_time")):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    schema = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema["function"]["parameters"])


def test_tool_calls_required_named_streamed_and_answered(oai):
    def create(max_tokens=40, **kwargs):
        return oai.chat.completions.create(model=None, tools=TOOLS, temperature=0,
                                           max_tokens=max_tokens, **kwargs)

    with ThreadPoolExecutor(3) as pool:
        required = pool.submit(create, messages=ASK, tool_choice="required",
                               parallel_tool_calls=False)
        named = pool.submit(create, messages=ASK, tool_choice={
            "type": "function", "function": {"name": "get_time"}})
        streamed = pool.submit(lambda: list(create(messages=ASK, tool_choice="required",
                                                   parallel_tool_calls=False, stream=True)))
    required, named, streamed = required.result(), named.result(), streamed.result()
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert_valid_call(call)
    [named_call] = named.choices[0].message.tool_calls
    assert_valid_call(named_call, names=("get_time",))
    deltas = [c.choices[0].delta for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    [delta] = deltas
    assert delta.tool_calls[0].function.name == call.function.name
    assert delta.tool_calls[0].function.arguments == call.function.arguments
    assert streamed[-1].choices[0].finish_reason == "tool_calls"

    answer = create(messages=[*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}],
        tool_choice="none", max_tokens=12)
    final = answer.choices[0]
    assert final.finish_reason in ("stop", "length") and final.message.content
    assert not final.message.tool_calls


def test_logit_bias_forces_a_token_and_penalties_are_accepted(oai):
    token = 28  # any id: a bias of 100 makes it the argmax
    reply = oai.completions.create(model=None, prompt="Hello", max_tokens=3, temperature=0,
                                   logit_bias={str(token): 100}, frequency_penalty=0.5,
                                   presence_penalty=0.5, extra_body={"return_token_ids": True,
                                                                     "repetition_penalty": 1.1})
    assert reply.choices[0].token_ids == [token] * 3


def test_tokenize_and_detokenize_in_vllm_shapes(server, oai):
    import httpx

    text = "The KV cache is the product."
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "return_token_strs": True})
    body = r.json()
    ids = server.ctx.tokenizer.encode(text)
    assert body == {"count": len(ids), "max_model_len": server.ctx.max_model_len, "tokens": ids,
                    "token_strs": [server.ctx.tokenizer.id_to_token(t) for t in ids]}
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": ids})
    assert r.json() == {"prompt": text}
    r = httpx.post(f"{server.url}/tokenize", json={"messages": ASK, "tools": TOOLS})
    chat = oai.chat.completions.create(model=None, messages=ASK, tools=TOOLS, max_tokens=1)
    assert r.json()["count"] == chat.usage.prompt_tokens
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "x", "messages": ASK})
    assert r.status_code == 400


def test_echo_with_logprobs_and_prompt_logprobs(server, oai):
    prompt = "The three primary colors are"
    ids = server.ctx.tokenizer.encode(prompt)
    reply = oai.completions.create(model=None, prompt=prompt, max_tokens=2, temperature=0,
                                   echo=True, logprobs=2)
    lp = reply.choices[0].logprobs
    assert reply.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:]) and lp.text_offset[0] == 0
    streamed = list(oai.completions.create(model=None, prompt=prompt, max_tokens=2,
                                           temperature=0, echo=True, logprobs=2, stream=True))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens
    chat = oai.chat.completions.create(model=None, messages=ASK, max_tokens=1,
                                       extra_body={"prompt_logprobs": 1})
    scored = chat.choices[0].model_extra["prompt_logprobs"]
    assert scored[0] is None and len(scored) == chat.usage.prompt_tokens
    assert all(entry[min(entry, key=lambda t: entry[t]["rank"])]["rank"] == 1
               for entry in scored[1:])

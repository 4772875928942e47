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

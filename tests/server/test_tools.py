"""Tool plans, prompts and parsing without the model: milliseconds."""

import json
from types import SimpleNamespace

import llguidance

from kvserve.server import tools

FN = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
QWEN = SimpleNamespace(chat_template="{% if tools %}<tools>{% endif %}<tool_call>")
LLAMA3 = SimpleNamespace(chat_template="{% if tools %}{{ tools }}{% endif %}parameters")
SMOL = SimpleNamespace(chat_template="{{ messages }}")
CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
HISTORY = [{"role": "user", "content": "add one"},
           {"role": "assistant", "content": "", "tool_calls": [CALL]},
           {"role": "tool", "content": "2", "tool_call_id": "call_1"}]


def test_plans_follow_the_template():
    assert tools.make_plan(SMOL, [FN], "none", None) is None
    smol = tools.make_plan(SMOL, [FN], None, None)
    assert (smol.choice, smol.in_template, smol.style, smol.parallel) == ("auto", False,
                                                                         "hermes", True)
    assert tools.make_plan(QWEN, [FN], "required", False).style == "hermes"
    llama = tools.make_plan(LLAMA3, [FN], {"type": "function", "function": {"name": "add"}}, None)
    assert (llama.choice, llama.in_template, llama.style) == ("add", True, "llama3")


def test_fallback_prompt_writes_tools_calls_and_results_as_text():
    plan = tools.make_plan(SMOL, [FN], "auto", None)
    system, user, assistant, result = tools.template_messages(HISTORY, plan)
    assert system["role"] == "system" and json.dumps(FN) in system["content"]
    assert assistant == {"role": "assistant", "content":
                         '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'}
    assert result == {"role": "user", "content": "<tool_response>\n2\n</tool_response>"}
    in_template = tools.template_messages(HISTORY, tools.make_plan(QWEN, [FN], "auto", None))
    assert in_template[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert in_template[2]["role"] == "tool"


def test_required_grammars_compile_and_replies_parse():
    for template in (SMOL, LLAMA3):
        plan = tools.make_plan(template, [FN], "required", True)
        grammar = llguidance.LLMatcher.grammar_from_lark(tools.constraint(plan).grammar)
        assert llguidance.LLMatcher.validate_grammar(grammar) == ""
    plan = tools.make_plan(SMOL, [FN], "required", True)
    content, calls = tools.parse('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n'
                                 '</tool_call>\n<tool_call>\n{"name": "add", "arguments": '
                                 '{"a": 2}}\n</tool_call>', plan)
    assert content is None and [c["function"]["arguments"] for c in calls] == ['{"a": 1}',
                                                                               '{"a": 2}']
    assert tools.parse('<tool_call>{"name": "sub", "arguments": {}}</tool_call>', plan)[1] == []
    assert tools.parse("just text", plan) == ("just text", [])
    llama = tools.make_plan(LLAMA3, [FN], "auto", None)
    assert tools.parse('{"name": "add", "parameters": {"a": 3}}', llama)[1][0]["function"] == {
        "name": "add", "arguments": '{"a": 3}'}

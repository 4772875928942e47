"""Tool calls in OpenAI's shapes: the tool list into the prompt, a grammar that makes a
required call parse, and the reply parsed back into ``tool_calls``.

A chat template that renders ``tools`` (Qwen, Llama 3.x) gets them as it expects, with
assistant ``tool_calls`` (arguments as objects) and ``tool`` messages. A template that does
not (SmolLM2's) gets the tool list in the system prompt in the Hermes format that Qwen uses:

    # Tools
    You may call one or more functions to assist with the user query. ...
    <tools>
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}
    </tools>
    ... <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

with earlier calls written back the same way and tool results as user turns inside
``<tool_response></tool_response>``. Calls are ``<tool_call>`` blocks (Hermes: Qwen and the
fallback) or one bare JSON object with ``name`` and ``parameters`` (Llama 3.x).

``tool_choice``: ``none`` leaves the tools out; ``auto`` lets the model choose (its reply is
parsed, and taken as text if it holds no valid call); ``required`` and a named function
constrain decoding so the reply is one call (several with ``parallel_tool_calls``) whose
arguments match the function's JSON schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from kvserve.model.tokenizer import Tokenizer
from kvserve.sampling_params import StructuredOutputs
from kvserve.structured.grammar import JSON_OPTIONS

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
SYSTEM_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]]  # OpenAI's {"type": "function", "function": {...}}
    choice: str  # "auto", "required", or the name of the one function to call
    parallel: bool
    in_template: bool  # the chat template renders the tools itself
    style: str  # "hermes" (<tool_call> blocks) or "llama3" (one JSON object)

    @property
    def parameters(self) -> dict[str, dict[str, Any]]:
        return {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"}
                for t in self.tools}


def make_plan(tokenizer: Tokenizer, tools: list[dict[str, Any]] | None,
              tool_choice: str | dict[str, Any] | None,
              parallel_tool_calls: bool | None) -> ToolPlan | None:
    """None when the tools play no part (none given, or tool_choice "none")."""
    if not tools or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        choice = tool_choice["function"]["name"]
    else:
        choice = tool_choice or "auto"
    template = tokenizer.chat_template or ""
    in_template = "tools" in template
    style = "llama3" if in_template and "<tool_call>" not in template else "hermes"
    return ToolPlan(tools, choice, parallel_tool_calls is not False, in_template, style)


def template_messages(messages: list[dict[str, Any]], plan: ToolPlan | None
                      ) -> list[dict[str, Any]]:
    """The conversation as the chat template takes it: calls and results in the template's
    own fields, or written out as text when the template cannot render them."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"],
                      "arguments": _arguments_object(c["function"]["arguments"])}
                     for c in m["tool_calls"]]
            if plan is not None and plan.in_template:
                m["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": call}
                                   for c, call in zip(m["tool_calls"], calls)]
                m["content"] = m.get("content") or ""
            else:
                del m["tool_calls"]
                text = "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)
                m["content"] = "\n".join(filter(None, [m.get("content"), text]))
        elif m["role"] == "tool" and not (plan is not None and plan.in_template):
            m = {"role": "user",
                 "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if plan is not None and not plan.in_template:
        prompt = SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t) for t in plan.tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def constraint(plan: ToolPlan | None) -> StructuredOutputs | None:
    """The grammar of a required or named call; None leaves the model free."""
    if plan is None or plan.choice == "auto":
        return None
    names = list(plan.parameters) if plan.choice == "required" else [plan.choice]
    key = "parameters" if plan.style == "llama3" else "arguments"
    schema = {"anyOf": [
        {"type": "object", "properties": {"name": {"const": name}, key: plan.parameters[name]},
         "required": ["name", key], "additionalProperties": False} for name in names],
        "x-guidance": JSON_OPTIONS}
    body = f"%json {json.dumps(schema)}"
    if plan.style == "llama3":
        return StructuredOutputs(grammar=f"start: {body}")
    repeat = ' ("\\n" call)*' if plan.parallel else ""
    return StructuredOutputs(grammar=f'start: call{repeat}\n'
                                     f'call: "<tool_call>\\n" {body} "\\n</tool_call>"')


def parse(text: str, plan: ToolPlan) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a reply; a reply with no valid call is all content."""
    if plan.style == "llama3":
        found = [text.strip().removeprefix("<|python_tag|>")]
        rest = ""
    else:
        found = _HERMES_CALL.findall(text)
        rest = _HERMES_CALL.sub("", text).strip()
    calls = []
    for raw in found:
        try:
            call = json.loads(raw)
        except ValueError:
            return text, []
        args = call.get("parameters", call.get("arguments")) if isinstance(call, dict) else None
        if not isinstance(args, dict) or call.get("name") not in plan.parameters:
            return text, []
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(args)}})
    if not plan.parallel:
        calls = calls[:1]
    return (rest or None) if calls else text, calls


def _arguments_object(arguments: str | dict[str, Any]) -> Any:
    """OpenAI sends arguments as JSON text; templates want the object."""
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments

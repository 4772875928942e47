"""Request bodies of the OpenAI routes and the legacy ``/generate``, and their SamplingParams.

Strict types (a string is not a number), OpenAI's ranges, and no field ignored: a field is
implemented, accepted because it cannot change the output (``user``, ``metadata``,
``logit_bias: null`` ...), or refused with a 400 naming it. An unknown field is refused too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from kvserve.sampling_params import SamplingParams, StructuredOutputs

Prompt = str | list[int]
_GREEDY_BELOW = 1e-5  # temperatures this small are greedy (dividing by them overflows)
_SEED_RANGE = 2**63


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # padding against length side channels: none here


class JsonSchemaFormat(OpenAIModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # always strict here: replies follow the schema


class ResponseFormat(OpenAIModel):
    """OpenAI's ``response_format``: plain text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @field_validator("json_schema")
    @classmethod
    def _with_json_schema(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("type") != "json_schema":
            raise ValueError('is only for {"type": "json_schema"}')
        return value

    def constraint(self) -> StructuredOutputs | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.json_schema is None:
            raise ValueError('response_format of type "json_schema" needs its json_schema')
        return StructuredOutputs(json=self.json_schema.schema_ or {})


class StructuredOutputsRequest(OpenAIModel):
    """vLLM's ``structured_outputs``: exactly one of these constrains the output."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark, or GBNF (llama.cpp's EBNF)
    json_object: bool | None = None

    def constraint(self) -> StructuredOutputs:
        return StructuredOutputs(json=self.json_, regex=self.regex, grammar=self.grammar,
                                 choice=None if self.choice is None else tuple(self.choice),
                                 json_object=bool(self.json_object))


def unsupported(message: str) -> PydanticCustomError:
    """A field this server does not implement yet; the 400 carries code unsupported_parameter."""
    return PydanticCustomError("unsupported_parameter", message)


class SamplingRequest(OpenAIModel):
    """Fields both OpenAI routes share."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, lt=_SEED_RANGE)
    stop: list[str] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as text) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    # vLLM's extensions.
    structured_outputs: StructuredOutputsRequest | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    min_tokens: int = Field(0, ge=0)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    stop_token_ids: list[int] | None = None
    # Accepted because they never change the output: bookkeeping and routing hints.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # kvserve extensions.
    cache_salt: str | None = None
    use_kv_cache: bool = True
    use_prefix_cache: bool | None = None
    return_token_ids: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("logit_bias")
    @classmethod
    def _bias_by_token_id(cls, value: Any) -> Any:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"values must be in [-100, 100], got {bias}")
        return value

    @field_validator("cache_salt", mode="before")
    @classmethod
    def _salt_not_empty(cls, value: Any) -> Any:
        if value == "":
            raise ValueError("must not be empty: leave it out (or null) for no salt")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def constraint_param(self) -> str:
        """The field a grammar error is reported against."""
        return "structured_outputs" if self.structured_outputs else "response_format"

    def constraint(self) -> StructuredOutputs | None:
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("structured_outputs and response_format cannot both constrain "
                             "the output; send one")
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint()
        return None if self.response_format is None else self.response_format.constraint()

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        constraint: StructuredOutputs | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        temperature = 1.0 if self.temperature is None else self.temperature
        return make_sampling_params(
            max_tokens=max_tokens, temperature=0.0 if temperature < _GREEDY_BELOW else temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, seed=self.seed,
            stop=tuple(self.stop or ()), ignore_eos=self.ignore_eos, logprobs=logprobs,
            use_kv_cache=self.use_kv_cache, use_prefix_cache=self.use_prefix_cache,
            cache_salt=self.cache_salt, structured_outputs=constraint or self.constraint(),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()})


class CompletionRequest(SamplingRequest):
    prompt: list[Prompt]  # one or more prompts, each text or token ids
    max_tokens: int | None = Field(16, ge=1)  # None: up to the end of the context
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None  # accepted when it equals n: nothing to choose between
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: Any) -> Any:
        if value:
            raise unsupported("is not supported yet (insertion needs a fill-in-the-middle "
                              "model); leave it out")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, info.data.get("n", 1)):
            raise unsupported("is not supported yet; leave it out or set it to n")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_as_list(cls, value: Any) -> Any:
        """OpenAI's four prompt forms: "text", ["text", ...], [ids], [[ids], ...]."""
        if isinstance(value, str) or (value and _is_token_ids(value)):
            return [value]
        if (isinstance(value, list) and value
                and all(isinstance(p, str) or _is_token_ids(p) for p in value)):
            return value
        raise ValueError("must be a string, a list of strings, a list of token ids or a list "
                         "of token-id lists, and not empty")


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_of(cls, value: Any) -> Any:
        """Content parts [{"type": "text", "text": ...}] joined; other kinds are refused."""
        if value is None:
            return ""
        if not isinstance(value, list):
            return value
        if not all(isinstance(part, dict) and part.get("type") == "text"
                   and isinstance(part.get("text"), str) for part in value):
            raise ValueError('only text content is supported: [{"type": "text", "text": "..."}]')
        return "".join(p["text"] for p in value)

    @field_validator("tool_calls")
    @classmethod
    def _calls_from_assistant(cls, value: Any, info: ValidationInfo) -> Any:
        if value and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return value

    def as_template_input(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None  # calls always follow the schema here


class Tool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, value: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        if value == "required" and not tools:
            raise ValueError("is 'required' but no tools are given")
        if isinstance(value, NamedToolChoice) and value.function.name not in {
                t.function.name for t in tools}:
            raise ValueError(f"names function {value.function.name!r}, which is not in tools")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: Any) -> Any:
        names = [t.function.name for t in value or ()]
        if len(set(names)) != len(names):
            raise ValueError("must not name a function twice")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class GenerateRequest(OpenAIModel):
    """The legacy ``/generate`` body."""

    prompt: str
    max_new_tokens: int = Field(64, ge=1)
    use_cache: bool = True
    use_prefix_cache: bool = True
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=_SEED_RANGE)

    def sampling_params(self) -> SamplingParams:
        temperature = 0.0 if self.temperature < _GREEDY_BELOW else self.temperature
        return make_sampling_params(
            max_tokens=self.max_new_tokens, temperature=temperature, top_p=self.top_p,
            seed=self.seed, use_kv_cache=self.use_cache, use_prefix_cache=self.use_prefix_cache)


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def make_sampling_params(**values: Any) -> SamplingParams:
    """SamplingParams from the values given; None means the default."""
    return SamplingParams(**{k: v for k, v in values.items() if v is not None})


def with_seed_offset(params: SamplingParams, offset: int) -> SamplingParams:
    """The params of choice ``offset`` of n: a seeded request's choices must differ."""
    if params.seed is None or offset == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed + offset) % _SEED_RANGE)

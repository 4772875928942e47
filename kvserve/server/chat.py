"""``POST /v1/chat/completions``: messages through the model's chat template."""

from __future__ import annotations

from typing import Any

from kvserve.engine.output import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server import tools
from kvserve.server.admission import check_shape
from kvserve.server.errors import APIError, bad_request
from kvserve.server.logprobs import chat_logprobs
from kvserve.server.protocol import ChatCompletionRequest, NamedToolChoice
from kvserve.server.render import ChoiceState, Renderer
from kvserve.server.serving import ServerContext, check_unicode


def prepare(ctx: ServerContext, body: ChatCompletionRequest, api_key: str | None
            ) -> tuple[ChatRenderer, list[SamplingParams]]:
    """The renderer (which holds the conversation's token ids) and the sampling params,
    admitted; raises APIError for a bad request. Runs in a worker thread: it renders the
    template, tokenizes and compiles the grammar."""
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    check_shape(ctx.config, body.n, body.stop)
    for i, message in enumerate(body.messages):
        check_unicode(message.content, f"messages[{i}].content")
    plan = tools.make_plan(ctx.tokenizer, [t.model_dump(exclude_none=True) for t in body.tools]
                           if body.tools else None, _choice(body), body.parallel_tool_calls)
    calls = tools.constraint(plan)
    if calls is not None and body.constraint() is not None:
        raise APIError(400, "a required tool call cannot also follow response_format or "
                            "structured_outputs; send one", "tool_choice")
    messages = tools.template_messages([m.as_template_input() for m in body.messages], plan)
    try:
        text = ctx.tokenizer.apply_chat_template(
            messages, tools=plan.tools if plan is not None and plan.in_template else None)
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from exc
    ids = ctx.tokenize(text, "messages", add_special_tokens=False)  # the template wrote BOS
    top = (body.top_logprobs or 0) if body.logprobs else None
    fields = set(ChatCompletionRequest.model_fields)
    max_tokens = body.max_new_tokens or ctx.max_tokens_left(len(ids), body.n, body.use_kv_cache)
    try:
        params = [body.sampling_params(max_tokens, top, calls)]
    except ValueError as exc:
        raise bad_request(exc, fields, "messages") from exc
    params = ctx.admit([ids], params, body.n, api_key, fields, "messages",
                       grammar_param="tools" if calls is not None else body.constraint_param)
    return ChatRenderer(ctx, body, [ids], plan), params


def _choice(body: ChatCompletionRequest) -> str | dict[str, Any] | None:
    choice = body.tool_choice
    return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice


class ChatRenderer(Renderer):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, ctx: ServerContext, body: ChatCompletionRequest,
                 prompts: list[list[int]], plan: tools.ToolPlan | None = None) -> None:
        super().__init__(ctx, body, prompts)
        self.chat = body
        self.plan = plan  # with tools, a reply is parsed once whole, then sent as one delta

    @property
    def wants_logprobs(self) -> bool:
        return self.chat.logprobs

    def first_chunks(self) -> list[dict[str, Any]]:
        """OpenAI opens each streamed choice with the assistant role and no text."""
        choices = [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for k in range(self.body.n)]
        extra = {"usage": None} if self.body.include_usage else {}
        return [self._envelope(self.chunk_object_name, [c], **extra) for c in choices]

    def stream_text(self, text: str, out: RequestOutput) -> str:
        if self.plan is None:
            return text
        return out.text if out.finished else ""

    def choice_body(self, index: int, text: str, streaming: bool,
                    out: RequestOutput) -> dict[str, Any]:
        if self.plan is None or not out.finished:
            if streaming:
                return {"delta": {"content": text} if text else {}}
            return {"message": {"role": "assistant", "content": text}}
        content, calls = tools.parse(out.text, self.plan)
        finish = {"finish_reason": "tool_calls"} if calls else {}
        if streaming:
            delta: dict[str, Any] = {"content": content} if content else {}
            if calls:
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
            return {"delta": delta, **finish}
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return {"message": message, **finish}

    def logprobs(self, out: RequestOutput, state: ChoiceState) -> dict[str, Any] | None:
        if out.logprobs is None:
            return None
        start = state.num_tokens_sent
        return chat_logprobs(self.ctx.token_text, out.token_ids[start:], out.logprobs[start:],
                             self.chat.top_logprobs or 0)

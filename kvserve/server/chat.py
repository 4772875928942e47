"""``POST /v1/chat/completions``: messages through the model's chat template."""

from __future__ import annotations

from typing import Any

from kvserve.engine.output import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.admission import check_shape
from kvserve.server.errors import APIError, bad_request
from kvserve.server.logprobs import chat_logprobs
from kvserve.server.protocol import ChatCompletionRequest
from kvserve.server.render import ChoiceState, Renderer
from kvserve.server.serving import ServerContext, check_unicode


def prepare(ctx: ServerContext, body: ChatCompletionRequest, api_key: str | None
            ) -> tuple[ChatRenderer, list[SamplingParams]]:
    """The renderer (which holds the conversation's token ids) and the sampling params,
    admitted; raises APIError for a bad request. Runs in a worker thread: it renders the
    template and tokenizes."""
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    check_shape(ctx.config, body.n, body.stop)
    for i, message in enumerate(body.messages):
        check_unicode(message.content, f"messages[{i}].content")
    try:
        text = ctx.tokenizer.apply_chat_template([m.as_template_input() for m in body.messages])
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from exc
    ids = ctx.tokenize(text, "messages", add_special_tokens=False)  # the template wrote BOS
    top = (body.top_logprobs or 0) if body.logprobs else None
    fields = set(ChatCompletionRequest.model_fields)
    max_tokens = body.max_new_tokens or ctx.max_tokens_left(len(ids), body.n, body.use_kv_cache)
    try:
        params = [body.sampling_params(max_tokens, top)]
    except ValueError as exc:
        raise bad_request(exc, fields, "messages") from exc
    params = ctx.admit([ids], params, body.n, api_key, fields, "messages",
                       grammar_param=body.constraint_param)
    return ChatRenderer(ctx, body, [ids]), params


class ChatRenderer(Renderer):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, ctx: ServerContext, body: ChatCompletionRequest,
                 prompts: list[list[int]]) -> None:
        super().__init__(ctx, body, prompts)
        self.chat = body

    @property
    def wants_logprobs(self) -> bool:
        return self.chat.logprobs

    def first_chunks(self) -> list[dict[str, Any]]:
        """OpenAI opens each streamed choice with the assistant role and no text."""
        choices = [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for k in range(self.body.n)]
        extra = {"usage": None} if self.body.include_usage else {}
        return [self._envelope(self.chunk_object_name, [c], **extra) for c in choices]

    def choice_body(self, index: int, text: str, streaming: bool) -> dict[str, Any]:
        if streaming:
            return {"delta": {"content": text} if text else {}}
        return {"message": {"role": "assistant", "content": text}}

    def logprobs(self, out: RequestOutput, state: ChoiceState) -> dict[str, Any] | None:
        if out.logprobs is None:
            return None
        start = state.num_tokens_sent
        return chat_logprobs(self.ctx.token_text, out.token_ids[start:], out.logprobs[start:],
                             self.chat.top_logprobs or 0)

"""``POST /v1/chat/completions``: messages through the model's chat template."""

from __future__ import annotations

from typing import Any

from kvserve.engine.output import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.errors import APIError, bad_request
from kvserve.server.logprobs import chat_logprobs
from kvserve.server.protocol import ChatCompletionRequest
from kvserve.server.render import ChoiceState, Renderer
from kvserve.server.serving import ServerContext, check_unicode


def prepare(ctx: ServerContext, body: ChatCompletionRequest
            ) -> tuple[list[list[int]], list[SamplingParams]]:
    """The conversation's token ids and sampling params; raises APIError for a bad request."""
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    for i, message in enumerate(body.messages):
        check_unicode(message.content, f"messages[{i}].content")
    try:
        ids = ctx.tokenizer.encode_chat([m.as_template_input() for m in body.messages])
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from exc
    top = (body.top_logprobs or 0) if body.logprobs else None
    try:
        params = body.sampling_params(body.max_new_tokens or ctx.max_tokens_left(len(ids)), top)
    except ValueError as exc:
        raise bad_request(exc, set(ChatCompletionRequest.model_fields), "messages") from exc
    return [ids], [params]


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

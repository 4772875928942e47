"""Response bodies and stream chunks in OpenAI's shape; subclasses draw one choice.

A streamed choice carries, per chunk, the text new since the last chunk (``RequestOutput.delta``:
the engine already holds back half characters and possible stop-string starts) and the tokens
new since the last chunk, so the streamed text joins up to exactly the non-streamed text.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kvserve.engine.output import RequestOutput
from kvserve.server.logprobs import vllm_prompt_logprobs
from kvserve.server.protocol import SamplingRequest
from kvserve.server.request_group import RequestGroup
from kvserve.server.serving import ServerContext, raise_if_failed, usage


@dataclass
class ChoiceState:
    """How much of one streamed choice the client has seen."""

    num_tokens_sent: int = 0
    text_offset: int = 0  # completions logprobs: where the next token's text starts
    started: bool = False


class Renderer:
    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, ctx: ServerContext, body: SamplingRequest,
                 prompts: list[list[int]]) -> None:
        self.ctx, self.body, self.prompts = ctx, body, prompts
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def choice_body(self, index: int, text: str, streaming: bool,
                    out: RequestOutput) -> dict[str, Any]:
        """The choice's text part (a ``finish_reason`` in it overrides the engine's)."""
        raise NotImplementedError

    def stream_text(self, text: str, out: RequestOutput) -> str:
        """What of a streamed choice's new text to send now."""
        return text

    @property
    def wants_logprobs(self) -> bool:
        raise NotImplementedError

    def logprobs(self, out: RequestOutput, state: ChoiceState) -> dict[str, Any] | None:
        """Logprobs of the tokens from ``state.num_tokens_sent`` on (None: not asked for)."""
        raise NotImplementedError

    def text_prefix(self, index: int) -> str:
        """Text shown before choice ``index``'s generated text (the prompt, with echo)."""
        return ""

    def first_chunks(self) -> list[dict[str, Any]]:
        return []

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        choices = [self._choice(k, out, self.text_prefix(k) + out.text, ChoiceState(), False)
                   for k, out in enumerate(outputs)]
        return self._envelope(self.object_name, choices,
                              usage=usage(self.prompts, outputs, self.body.n))

    async def chunks(self, group: RequestGroup) -> AsyncIterator[dict[str, Any]]:
        for chunk in self.first_chunks():
            yield chunk
        states = [ChoiceState() for _ in group.request_ids]
        finals: dict[int, RequestOutput] = {}
        extra = {"usage": None} if self.body.include_usage else {}
        async for k, out in group.outputs():
            raise_if_failed(out)
            state = states[k]
            text = self.stream_text(
                out.delta if state.started else self.text_prefix(k) + out.delta, out)
            has_new_tokens = len(out.token_ids) > state.num_tokens_sent
            wants_tokens = self.wants_logprobs or self.body.return_token_ids
            if text or out.finished or (has_new_tokens and wants_tokens):
                yield self._envelope(self.chunk_object_name,
                                     [self._choice(k, out, text, state, True)], **extra)
                state.started = True
            if out.finished:
                finals[k] = out
        if self.body.include_usage:
            outputs = [finals[k] for k in sorted(finals)]
            yield self._envelope(self.chunk_object_name, [],
                                 usage=usage(self.prompts, outputs, self.body.n))

    def _choice(self, index: int, out: RequestOutput, text: str, state: ChoiceState,
                streaming: bool) -> dict[str, Any]:
        body = self.choice_body(index, text, streaming, out)
        choice = {"index": index, **body, "logprobs": self.logprobs(out, state),
                  "finish_reason": body.get("finish_reason", out.finish_reason)}
        if self.body.return_token_ids:
            choice["token_ids"] = out.token_ids[state.num_tokens_sent:]
        if self.body.prompt_logprobs is not None and not state.started:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(self.ctx.token_text,
                                                             out.prompt_logprobs or [])
        state.num_tokens_sent = len(out.token_ids)
        return choice

    def _envelope(self, object_name: str, choices: list[dict[str, Any]],
                  **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created,
                "model": self.ctx.model_name, "system_fingerprint": self.ctx.fingerprint,
                "choices": choices, **extra}

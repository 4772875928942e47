"""``POST /v1/completions``: prompts in OpenAI's four forms, text (and logprobs) out."""

from __future__ import annotations

from typing import Any

from kvserve.engine.output import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server.admission import check_shape, check_token_ids
from kvserve.server.errors import bad_request
from kvserve.server.logprobs import completion_logprobs
from kvserve.server.protocol import CompletionRequest
from kvserve.server.render import ChoiceState, Renderer
from kvserve.server.serving import ServerContext


def prepare(ctx: ServerContext, body: CompletionRequest, api_key: str | None
            ) -> tuple[CompletionRenderer, list[SamplingParams]]:
    """The renderer (which holds the token ids of each prompt) and the sampling params of each
    prompt, admitted; raises APIError for a bad request. Runs in a worker thread."""
    check_shape(ctx.config, body.n, body.stop, len(body.prompt))
    prompts = []
    for p in body.prompt:
        ids = ctx.tokenize(p, "prompt") if isinstance(p, str) else p
        check_token_ids(ids, ctx.vocab_size, "prompt")
        prompts.append(ids)
    fields = set(CompletionRequest.model_fields)
    num_choices = body.n * len(prompts)
    try:
        params = [body.sampling_params(
            body.max_tokens or ctx.max_tokens_left(len(ids), num_choices, body.use_kv_cache),
            body.logprobs, prompt_logprobs=body.logprobs if body.echo else None)
            for ids in prompts]
    except ValueError as exc:
        raise bad_request(exc, fields, "prompt") from exc
    params = ctx.admit(prompts, params, body.n, api_key, fields, "prompt",
                       grammar_param=body.constraint_param)
    return CompletionRenderer(ctx, body, prompts), params


class CompletionRenderer(Renderer):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, ctx: ServerContext, body: CompletionRequest,
                 prompts: list[list[int]]) -> None:
        super().__init__(ctx, body, prompts)
        self.completion = body
        # Token ids were checked (check_token_ids) before this decodes them.
        self._echo = ([p if isinstance(p, str) else ctx.tokenizer.decode(p) for p in body.prompt]
                      if body.echo else None)

    @property
    def wants_logprobs(self) -> bool:
        return self.completion.logprobs is not None

    def text_prefix(self, index: int) -> str:
        return self._echo[index // self.body.n] if self._echo else ""

    def choice_body(self, index: int, text: str, streaming: bool,
                    out: RequestOutput) -> dict[str, Any]:
        return {"text": text}

    def logprobs(self, out: RequestOutput, state: ChoiceState) -> dict[str, Any] | None:
        if out.logprobs is None:
            return None
        start = state.num_tokens_sent
        ids, logprobs = out.token_ids[start:], out.logprobs[start:]
        if self._echo and not state.started:  # the prompt's tokens come first
            ids, logprobs = out.prompt_token_ids + ids, (out.prompt_logprobs or []) + logprobs
        result = completion_logprobs(self.ctx.token_text, ids, logprobs, state.text_offset)
        state.text_offset += sum(len(t) for t in result["tokens"])
        return result

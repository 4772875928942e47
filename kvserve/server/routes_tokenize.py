"""``/tokenize`` and ``/detokenize`` in vLLM's shapes: a prompt, or chat messages through the
template (tools included), to token ids with their count and the model's context length;
token ids back to text."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from kvserve.server import tools
from kvserve.server.admission import check_token_ids
from kvserve.server.errors import APIError
from kvserve.server.protocol import ChatMessage, OpenAIModel, Tool
from kvserve.server.serving import Context, ServerContext, check_unicode

router = APIRouter()


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None  # rendered as a chat request would render them
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, ctx: Context) -> dict[str, Any]:
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", "prompt")
    ids = await run_in_threadpool(_token_ids, ctx, body)
    strs = [ctx.tokenizer.id_to_token(t) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids,
            "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, ctx: Context) -> dict[str, str]:
    ctx.check_model(body.model)
    check_token_ids(body.tokens, ctx.vocab_size, "tokens")
    return {"prompt": await run_in_threadpool(ctx.tokenizer.decode, body.tokens)}


def _token_ids(ctx: ServerContext, body: TokenizeRequest) -> list[int]:
    if body.prompt is not None:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        return ctx.tokenize(body.prompt, "prompt", add_special_tokens=add)
    assert body.messages is not None
    for i, message in enumerate(body.messages):
        check_unicode(message.content, f"messages[{i}].content")
    plan = tools.make_plan(ctx.tokenizer, [t.model_dump(exclude_none=True) for t in body.tools]
                           if body.tools else None, "auto", None)
    messages = tools.template_messages([m.as_template_input() for m in body.messages], plan)
    try:
        text = ctx.tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt,
            tools=plan.tools if plan is not None and plan.in_template else None)
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from exc
    return ctx.tokenize(text, "messages", add_special_tokens=bool(body.add_special_tokens))

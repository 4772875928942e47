"""The official `openai` client against the real server."""

from __future__ import annotations

import openai
import pytest

PROMPT = "The three primary colors are"
MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a fruit that is yellow."}]
LONG_PROMPT = ("A KV cache keeps the keys and values of every token it has seen, so the next "
               "token attends to them without computing them again. Blocks of sixteen tokens "
               "are shared between requests that begin with the same words. ") * 2


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.ctx.model_name


def test_models_lists_the_served_model(oai, model):
    assert [m.id for m in oai.models.list().data] == [model]
    assert oai.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4o")


@pytest.mark.parametrize("stop", [None, ["."]])
def test_completion_streamed_text_equals_non_streamed(server, oai, model, stop):
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=20, temperature=0, stop=stop)
    whole = oai.completions.create(**kwargs)
    chunks = list(oai.completions.create(**kwargs, stream=True,
                                         stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text and streamed == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.prompt_tokens == len(server.ctx.tokenizer.encode(PROMPT))
    assert whole.usage.prompt_tokens_details.cached_tokens >= 0
    if stop:
        assert "." not in whole.choices[0].text and whole.choices[0].finish_reason == "stop"


def test_chat_streamed_text_equals_non_streamed(oai, model):
    kwargs = dict(model=model, messages=MESSAGES, max_tokens=16, temperature=0, seed=1)
    whole = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content and streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_prompt_forms_n_and_echo(server, oai, model):
    kwargs = dict(model=model, max_tokens=6, temperature=0)
    ids = [server.ctx.tokenizer.encode(p) for p in (PROMPT, "Water boils at")]
    alone = [oai.completions.create(prompt=p, **kwargs).choices[0].text
             for p in (PROMPT, "Water boils at")]
    many = oai.completions.create(prompt=[PROMPT, "Water boils at"], n=2, **kwargs)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text for c in many.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert many.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    assert many.usage.completion_tokens == 4 * 6
    as_ids = oai.completions.create(prompt=ids, **kwargs)
    assert [c.text for c in as_ids.choices] == alone
    assert oai.completions.create(prompt=ids[0], **kwargs).choices[0].text == alone[0]
    echoed = oai.completions.create(prompt=PROMPT, echo=True, **kwargs)
    assert echoed.choices[0].text == PROMPT + alone[0]
    streamed = oai.completions.create(prompt=PROMPT, echo=True, stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + alone[0]


def test_n_choices_are_indexed_and_distinct(oai, model):
    out = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, n=3,
                                      temperature=1.0, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) > 1  # seed + i per choice
    streamed = list(oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12,
                                                n=3, temperature=1.0, seed=7, stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in streamed
                     if c.choices[0].index == i) for i in range(3)]
    assert texts == [c.message.content for c in out.choices]


def test_completion_logprobs_shape(oai, model):
    out = oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                 logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4 and top[token] == logprob
        assert logprob == max(top.values())  # greedy: the sampled token is the likeliest
    chunks = [c.choices[0].logprobs for c in oai.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3, stream=True)]
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [o for c in chunks for o in c.text_offset] == lp.text_offset


def test_chat_logprobs_shape(oai, model):
    out = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                      temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    text = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert text.startswith(out.choices[0].message.content)  # the end may be <|im_end|>
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    streamed = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                           temperature=0, logprobs=True, top_logprobs=2,
                                           stream=True)
    entries = [e for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert entries == content


def test_openai_client_extras_are_accepted(oai, model):
    out = oai.completions.create(
        model=model, prompt=PROMPT, max_tokens=4, temperature=0, user="someone",
        presence_penalty=0, frequency_penalty=0, logit_bias=None,
        best_of=1, suffix=None,
        extra_body={"cache_salt": "tenant-a", "use_prefix_cache": False, "top_k": 5,
                    "min_p": 0.01, "ignore_eos": True, "metadata": {"team": "a"}})
    assert out.usage.completion_tokens == 4
    chat = oai.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=2, temperature=0, user="someone",
        metadata={"team": "a"}, store=False, service_tier="auto", response_format={"type": "text"},
        tool_choice="none", parallel_tool_calls=False, stream_options=None)
    assert chat.usage.completion_tokens <= 2
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(model=model, prompt=PROMPT, max_tokens=4,
                               extra_body={"something_new": [1, 2]})
    assert refused.value.body["param"] == "something_new"
    assert refused.value.body["code"] == "unknown_parameter"


def test_repeated_long_prompt_reports_cached_tokens(oai, model):
    kwargs = dict(model=model, prompt=LONG_PROMPT, max_tokens=2, temperature=0)
    first = oai.completions.create(**kwargs)
    second = oai.completions.create(**kwargs)
    assert first.usage.prompt_tokens > 2 * 16
    assert second.usage.prompt_tokens_details.cached_tokens >= 32
    assert second.choices[0].text == first.choices[0].text
    salted = oai.completions.create(**kwargs, extra_body={"cache_salt": "fresh-salt"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0

"""Constrained decoding on the real model, greedy float32: caches and batching change cost,
never the tokens a grammar allows."""

import json

import pytest

from kvserve import LLM, SamplingParams
from kvserve.sampling_params import StructuredOutputs

SYSTEM = "You are a helpful assistant for a bicycle shop. Answer in JSON when asked. "
QUESTIONS = ["Which tools fix a puncture?", "How tight should a chain be?",
             "What is a derailleur?", "Name a part of the brakes."]
SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string", "maxLength": 24},
    "tools": {"type": "array", "items": {"enum": ["pump", "lever", "wrench"]}, "maxItems": 2}},
    "required": ["answer", "tools"], "additionalProperties": False}
PARAMS = [
    SamplingParams(max_tokens=32, temperature=0, structured_outputs=StructuredOutputs(json=SCHEMA)),
    SamplingParams(max_tokens=8, temperature=0,
                   structured_outputs=StructuredOutputs(choice=("zebra", "pony", "camel"))),
    SamplingParams(max_tokens=12, temperature=0, frequency_penalty=1.0, presence_penalty=0.5,
                   structured_outputs=StructuredOutputs(regex=r"[a-z ]{4,30}\.")),
    SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3, logit_bias={28: -5.0},
                   min_tokens=4),
]
PROMPTS = [SYSTEM + q for q in QUESTIONS]


@pytest.fixture(scope="module")
def off(checkpoint):
    return LLM(model=checkpoint, device="cpu", enable_prefix_caching=False)


@pytest.fixture(scope="module")
def alone(off):
    return [off.generate(p, params)[0] for p, params in zip(PROMPTS, PARAMS)]


def ids_of(outs):
    return [o.token_ids for o in outs]


def test_constrained_outputs_follow_their_grammar(alone):
    json.loads(alone[0].text)
    assert alone[1].text in ("zebra", "pony", "camel")
    assert alone[2].text.endswith(".") and len(alone[3].token_ids) >= 4


def test_batched_with_prefix_hits_equals_alone_without_prefix_cache(llm, alone):
    llm.generate(SYSTEM + "Warm the prefix cache.", SamplingParams(max_tokens=1))
    batched = llm.generate(PROMPTS, PARAMS)
    assert all(o.num_cached_tokens > 0 for o in batched)
    assert ids_of(batched) == ids_of(alone)


def test_preempted_requests_resume_with_their_grammar(checkpoint, alone):
    small = LLM(model=checkpoint, device="cpu", kv_cache_memory=4 * 16 * 46_080)
    outs = small.generate(PROMPTS, PARAMS)
    assert any(o.num_preemptions for o in outs)
    assert ids_of(outs) == ids_of(alone)
    small.engine.check_integrity()


def test_an_exact_repeat_masks_its_kept_first_token_logits(llm, off):
    prompt = llm.tokenizer.encode(SYSTEM + "Pick an animal.")
    free = llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0))[0]
    assert free.text.strip() not in ("zebra", "pony", "camel")
    repeat = llm.generate(prompt, PARAMS[1])[0]
    assert repeat.cached_tokens_by_tier.get("exact_repeat") == len(prompt)
    assert repeat.token_ids == off.generate(prompt, PARAMS[1])[0].token_ids
    assert repeat.text in ("zebra", "pony", "camel")


def test_prompt_logprobs_are_computed_even_when_the_prefix_is_cached(llm, checkpoint):
    prompt = llm.tokenizer.encode(SYSTEM + "Which tools fix a puncture?")
    llm.generate(prompt, SamplingParams(max_tokens=1))  # its blocks are now cached
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3)
    [out] = llm.generate(prompt, params)
    assert out.num_cached_tokens == 0 and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    chunked = LLM(model=checkpoint, device="cpu", max_num_batched_tokens=7)
    in_chunks = chunked.generate(prompt, params)[0].prompt_logprobs
    assert len(in_chunks) == len(prompt)
    for got, want in zip(in_chunks[1:], out.prompt_logprobs[1:]):  # rounding differs a little
        assert got.keys() == want.keys()
        assert all(abs(got[t] - want[t]) < 1e-4 for t in want)
    for j in (1, 9, len(prompt) - 1):  # the oracle: the next-token logprobs of prompt[:j]
        [alone] = llm.generate(prompt[:j], SamplingParams(max_tokens=1, temperature=0,
                                                          logprobs=3))
        entry, want = out.prompt_logprobs[j], alone.logprobs[0]
        assert prompt[j] in entry and len(entry) in (3, 4)
        top = sorted(want.items(), key=lambda kv: -kv[1])[:3]
        for token, logprob in top:
            assert abs(entry[token] - logprob) < 1e-4


def test_a_failing_grammar_fails_its_request_only(off, alone):
    from kvserve import faults

    engine = off.engine
    for i, (prompt, params) in enumerate(zip(PROMPTS[:3], PARAMS)):
        engine.add_request(prompt, params, request_id=f"g{i}")
    faults.arm("grammar", "g0")
    finals = {}
    try:
        while engine.has_unfinished():
            finals.update({o.request_id: o for o in engine.step() if o.finished})
    finally:
        faults.disarm_all()
    assert finals["g0"].finish_reason == "error" and "grammar" in finals["g0"].error
    assert [finals["g1"].token_ids, finals["g2"].token_ids] == ids_of(alone[1:3])
    engine.check_integrity()

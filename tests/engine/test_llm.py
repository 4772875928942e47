"""The engine on the real model, greedy float32: caching and batching change cost, never tokens."""

import pytest
from prompts import PROMPTS  # tests/engine, on the path as the tests' own folder

from kvserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def token_ids(outputs):
    return [o.token_ids for o in outputs]


def assert_idle(llm: LLM) -> None:
    llm.engine.check_integrity()
    stats = llm.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert not llm.engine.has_unfinished()


@pytest.fixture(scope="module")
def one_at_a_time(llm):
    outs = [llm.generate(p, GREEDY)[0] for p in PROMPTS]
    assert_idle(llm)
    return outs


def test_kv_cache_and_no_cache_give_identical_tokens_and_exact_work(llm):
    for prompt in PROMPTS[:3]:
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        cached = llm.generate(prompt, params)[0]
        recomputed = llm.generate(prompt, SamplingParams(max_tokens=32, temperature=0,
                                                         ignore_eos=True, use_kv_cache=False))[0]
        p, n = len(cached.prompt_token_ids), 32
        assert cached.token_ids == recomputed.token_ids
        assert len(cached.token_ids) == n
        assert cached.work_tokens == p + n - 1
        assert recomputed.work_tokens == sum(p + i for i in range(n))
        assert cached.kv_bytes_peak == (p + n - 1) * 46_080
        assert_idle(llm)


def test_batched_equals_one_at_a_time(llm, one_at_a_time):
    batched = llm.generate(PROMPTS, GREEDY)
    assert token_ids(batched) == token_ids(one_at_a_time)
    assert [o.text for o in batched] == [o.text for o in one_at_a_time]
    assert_idle(llm)


def test_no_cache_batched_equals_one_at_a_time(llm, one_at_a_time):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, use_kv_cache=False)
    assert token_ids(llm.generate(PROMPTS, params)) == token_ids(one_at_a_time)
    assert_idle(llm)


def test_preemption_in_a_small_pool_keeps_tokens(checkpoint, one_at_a_time):
    block = 16 * 46_080
    small = LLM(model=checkpoint, device="cpu", kv_cache_memory=8 * block)
    outs = small.generate(PROMPTS, GREEDY)
    assert small.stats()["num_preemptions"] > 0
    assert token_ids(outs) == token_ids(one_at_a_time)
    assert any(o.num_preemptions for o in outs)
    assert_idle(small)


def test_chunked_prefill_keeps_tokens(checkpoint, one_at_a_time):
    chunked = LLM(model=checkpoint, device="cpu", max_num_batched_tokens=5)
    outs = chunked.generate(PROMPTS, GREEDY)
    assert chunked.stats()["num_chunked_prefills"] > 0
    assert token_ids(outs) == token_ids(one_at_a_time)
    assert_idle(chunked)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llm):
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    others = SamplingParams(max_tokens=16, temperature=1.0)
    alone = llm.generate(PROMPTS[1], seeded)[0]
    batch = llm.generate(PROMPTS[:4], [others, seeded, others, others])
    assert batch[1].token_ids == alone.token_ids
    reseeded = llm.generate(PROMPTS[1], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95,
                                                       top_k=50, seed=99))[0]
    assert reseeded.token_ids != alone.token_ids  # the seed matters
    assert_idle(llm)


def test_stop_string_ends_the_text_before_it(llm, one_at_a_time):
    ref = one_at_a_time[2]
    stop = ref.text[10:14]
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == ref.text[: ref.text.index(stop)]
    assert_idle(llm)


def test_outputs_carry_metrics_and_logprobs(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0, logprobs=3))[0]
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finish_time
    assert out.time_per_output_token is not None and out.time_per_output_token > 0
    assert len(out.logprobs) == len(out.token_ids)
    for token, top in zip(out.token_ids, out.logprobs):
        assert token in top and len(top) >= 3
        assert top[token] == max(top.values())  # greedy picks the most likely token


def test_chat_applies_the_template(llm):
    out = llm.chat([{"role": "user", "content": "What is 2+2?"}],
                   SamplingParams(max_tokens=8, temperature=0))[0]
    text = llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")


def test_requests_that_can_never_fit_are_rejected_up_front(llm):
    with pytest.raises(ValueError, match="exceeds the model context of 8192"):
        llm.generate("hi", SamplingParams(max_tokens=9000))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    assert_idle(llm)


def test_a_prompt_beyond_the_pool_is_rejected_with_the_limits(checkpoint):
    small = LLM(model=checkpoint, device="cpu", kv_cache_memory=2 * 16 * 46_080)
    with pytest.raises(ValueError, match="KV pool holds 32 tokens"):
        small.generate(list(range(100, 130)), SamplingParams(max_tokens=8))
    assert_idle(small)


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1), ("top_p", 0),
                                         ("top_k", -2), ("min_p", 2), ("logprobs", 50)])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})

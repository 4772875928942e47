"""Prefix caching on the real model, greedy float32: on gives the same tokens as off."""

import pytest

from kvserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0)
SYSTEM = ("You are a meticulous assistant for a bicycle repair shop. Answer briefly, name the "
          "tools needed, and warn about anything dangerous. ")


def ids_of(outs):
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def off(checkpoint):
    return LLM(model=checkpoint, device="cpu", enable_prefix_caching=False)


@pytest.fixture()
def on(checkpoint):
    return LLM(model=checkpoint, device="cpu")


def assert_idle(llm):
    llm.engine.check_integrity()
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


def test_shared_system_prompt_with_8_questions(on, off):
    questions = ["How do I fix a flat?", "Why does my chain skip?", "How tight is a stem bolt?",
                 "What oil for a chain?", "How to true a wheel?", "Why do brakes squeal?",
                 "When to replace a cassette?", "How to adjust a derailleur?"]
    prompts = [on.tokenizer.encode_chat([{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": q}]) for q in questions]
    ref = ids_of(off.generate(prompts, GREEDY))
    first = on.generate(prompts[0], GREEDY)[0]
    rest = on.generate(prompts[1:], GREEDY)
    assert ids_of([first, *rest]) == ref
    shared = min(len(p) for p in prompts)
    assert first.num_cached_tokens == 0
    assert all(o.num_cached_tokens >= (shared - 16) // 16 * 16 > 0 for o in rest)
    stats = on.cache_stats()
    assert stats["num_hits"] == 7
    assert stats["tokens_saved"] == sum(o.num_cached_tokens for o in rest)
    assert_idle(on)


def test_multi_turn_chat_where_each_turn_extends_the_last(on, off):
    messages = [{"role": "system", "content": SYSTEM}]
    for turn in ["My tyre keeps going flat.", "I replaced the tube already.", "What next?"]:
        messages.append({"role": "user", "content": turn})
        prompt = on.tokenizer.encode_chat(messages)
        out = on.generate(prompt, GREEDY)[0]
        assert out.token_ids == off.generate(prompt, GREEDY)[0].token_ids
        if len(messages) > 2:
            assert out.num_cached_tokens > 32  # the earlier turns were not recomputed
        messages.append({"role": "assistant", "content": out.text})
    assert_idle(on)


def test_prompts_that_differ_only_in_their_last_token(on, off):
    base = on.tokenizer.encode(SYSTEM * 2)
    prompts = [base + [t] for t in (1000, 2000, 3000)]
    assert ids_of([on.generate(p, GREEDY)[0] for p in prompts]) == ids_of(off.generate(prompts,
                                                                                        GREEDY))
    assert_idle(on)


@pytest.mark.parametrize("num_blocks", [1, 2, 3])
def test_prefixes_of_exactly_whole_blocks(on, off, num_blocks):
    prefix = on.tokenizer.encode(SYSTEM * 3)[: 16 * num_blocks]
    prompts = [prefix + on.tokenizer.encode(q) for q in (" Tell me more.", " Summarise.")]
    outs = [on.generate(p, GREEDY)[0] for p in prompts]
    assert ids_of(outs) == ids_of(off.generate(prompts, GREEDY))
    assert outs[1].num_cached_tokens == 16 * num_blocks
    exact = on.generate(prefix, GREEDY)[0]  # the prefix alone: its last token is computed
    assert exact.num_cached_tokens == 16 * (num_blocks - 1)
    assert exact.token_ids == off.generate(prefix, GREEDY)[0].token_ids
    assert_idle(on)


def test_exact_repeats_skip_the_forward_pass_and_sample_the_same(on, off):
    prompt = on.tokenizer.encode(SYSTEM + "Which tools fix a puncture?")
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=7)
    first = on.generate(prompt, GREEDY)[0]
    repeat = on.generate(prompt, GREEDY)[0]
    assert repeat.token_ids == first.token_ids == off.generate(prompt, GREEDY)[0].token_ids
    assert repeat.cached_tokens_by_tier["exact_repeat"] == len(prompt)
    assert on.generate(prompt, seeded)[0].token_ids == off.generate(prompt, seeded)[0].token_ids
    assert on.cache_stats()["num_exact_repeats"] == 2
    assert_idle(on)


def test_concurrent_requests_share_prefix_blocks(on, off):
    prompts = [on.tokenizer.encode(SYSTEM * 2 + q) for q in ("Q: one?", "Q: two?", "Q: three?")]
    on.generate(prompts[0], SamplingParams(max_tokens=1, temperature=0))  # warm the prefix
    for llm in (on, off):
        llm.engine.kv.pool.peak_used = 0
    assert ids_of(on.generate(prompts, GREEDY)) == ids_of(off.generate(prompts, GREEDY))
    shared_blocks = len(on.tokenizer.encode(SYSTEM * 2)) // 16
    assert on.engine.kv.pool.peak_used <= off.engine.kv.pool.peak_used - 2 * shared_blocks
    assert_idle(on)


def test_hits_from_the_host_tier_after_device_eviction(checkpoint, off):
    block = 16 * 46_080
    a = off.tokenizer.encode(SYSTEM * 2 + "Question A?")
    b = off.tokenizer.encode("A different document entirely. " * 16 + "Question B?")
    num_blocks = -(-(len(b) + 12) // 16)  # b needs the whole pool: every cached block goes
    llm = LLM(model=checkpoint, device="cpu", kv_cache_memory=num_blocks * block,
              kv_host_memory=64 * block)
    ref_a = off.generate(a, GREEDY)[0].token_ids
    assert llm.generate(a, GREEDY)[0].token_ids == ref_a
    llm.generate(b, GREEDY)  # evicts a's blocks to the host tier
    assert llm.cache_stats()["num_evictions"] > 0
    llm.engine.kv.exact.clear()  # force the blocks path, not the exact-repeat shortcut
    again = llm.generate(a, GREEDY)[0]
    assert again.token_ids == ref_a
    assert again.cached_tokens_by_tier.get("host", 0) > 0
    assert_idle(llm)


def test_hits_from_the_disk_tier_after_a_restart(checkpoint, off, tmp_path):
    prompt = off.tokenizer.encode(SYSTEM * 2 + "Question on disk?")
    ref = off.generate(prompt, GREEDY)[0].token_ids
    first = LLM(model=checkpoint, device="cpu", kv_disk_cache=str(tmp_path))
    assert first.generate(prompt, GREEDY)[0].token_ids == ref
    first.engine.kv.pool.allocate(first.engine.kv.num_free_blocks)  # evict all to disk
    first.engine.step()  # a step with nothing to run still copies the evicted blocks out
    first.close()
    assert len(first.engine.kv.tiers.disk.files) >= len(prompt) // 16
    rebuilt = LLM(model=checkpoint, device="cpu", kv_disk_cache=str(tmp_path))
    out = rebuilt.generate(prompt, GREEDY)[0]
    assert out.token_ids == ref and out.cached_tokens_by_tier.get("disk", 0) > 0
    assert_idle(rebuilt)

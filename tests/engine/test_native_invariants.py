"""The equality invariants on native quantized weights (the CPU default for a GGUF): caching,
batching, chunking, preemption and prefix hits change cost, never the tokens."""

from __future__ import annotations

import pytest
from prompts import PROMPTS  # tests/engine, on the path as the tests' own folder

from kvserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def native():
    from kvserve.model.loader import load_checkpoint

    checkpoint = load_checkpoint(quantization="gguf")
    if not checkpoint.is_quantized:
        pytest.skip("no native quantized kernel on this machine (no compiler or no AVX2)")
    return checkpoint


@pytest.fixture(scope="module")
def alone(native):
    llm = LLM(native, device="cpu", enable_prefix_caching=False)
    return [llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


def ids(outs):
    return [o.token_ids for o in outs]


def test_batched_equals_alone(native, alone):
    assert ids(LLM(native, device="cpu").generate(PROMPTS, GREEDY)) == alone


def test_no_kv_cache_equals_kv_cache(native, alone):
    llm = LLM(native, device="cpu")
    no_cache = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, use_kv_cache=False)
    assert llm.generate(PROMPTS[0], no_cache)[0].token_ids == alone[0][:8]


def test_chunked_and_preempted_equal_alone(native, alone):
    chunked = LLM(native, device="cpu", max_num_batched_tokens=5)
    assert ids(chunked.generate(PROMPTS, GREEDY)) == alone
    small = LLM(native, device="cpu", kv_cache_memory=8 * 16 * 46_080)
    assert ids(small.generate(PROMPTS, GREEDY)) == alone
    assert small.stats()["num_preemptions"] > 0


def test_prefix_hits_equal_computing(native):
    prompts = ["Here is a careful, short answer to the question below. " * 3 + p
               for p in PROMPTS[:3]]
    off = LLM(native, device="cpu", enable_prefix_caching=False)
    expected = ids(off.generate(prompts, GREEDY))
    on = LLM(native, device="cpu", num_exact_repeats=0)
    assert ids(on.generate(prompts, GREEDY)) == expected
    again = on.generate(prompts, GREEDY)
    assert ids(again) == expected and all(o.num_cached_tokens >= 32 for o in again)
    on.engine.check_integrity()

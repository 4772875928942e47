"""The equality invariants on native quantized weights (the CPU default for a GGUF): caching,
batching, chunking, preemption and prefix hits change cost, never the tokens. They hold the
same within an int8 KV cache, where each K/V row is quantized the same way however it was
computed (prefill chunk or decode), so every test runs with both caches."""

from __future__ import annotations

import pytest
from prompts import PROMPTS  # tests/engine, on the path as the tests' own folder

from kvserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint():
    from kvserve.model.loader import load_checkpoint

    checkpoint = load_checkpoint(quantization="gguf")
    if not checkpoint.is_quantized:
        pytest.skip("no native quantized kernel on this machine (no compiler or no AVX2)")
    return checkpoint


@pytest.fixture(scope="module", params=["float32", "int8"])
def kv_dtype(request):
    return request.param


@pytest.fixture(scope="module")
def native(checkpoint, kv_dtype):
    """LLM(native, ...): an engine on the native weights with this module's KV cache dtype."""
    return lambda **kwargs: LLM(checkpoint, device="cpu", kv_cache_dtype=kv_dtype, **kwargs)


@pytest.fixture(scope="module")
def alone(native):
    llm = native(enable_prefix_caching=False)
    return [llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


def ids(outs):
    return [o.token_ids for o in outs]


def test_batched_equals_alone(native, alone):
    assert ids(native().generate(PROMPTS, GREEDY)) == alone


def test_no_kv_cache_equals_kv_cache(native, alone):
    llm = native()
    no_cache = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, use_kv_cache=False)
    assert llm.generate(PROMPTS[0], no_cache)[0].token_ids == alone[0][:8]


def test_chunked_and_preempted_equal_alone(checkpoint, kv_dtype, native, alone):
    chunked = native(max_num_batched_tokens=5)
    assert ids(chunked.generate(PROMPTS, GREEDY)) == alone
    block_bytes = 16 * checkpoint.config.kv_bytes_per_token(kv_dtype)
    small = native(kv_cache_memory=8 * block_bytes)
    assert ids(small.generate(PROMPTS, GREEDY)) == alone
    assert small.stats()["num_preemptions"] > 0


def test_prefix_hits_equal_computing(native):
    prompts = ["Here is a careful, short answer to the question below. " * 3 + p
               for p in PROMPTS[:3]]
    off = native(enable_prefix_caching=False)
    expected = ids(off.generate(prompts, GREEDY))
    on = native(num_exact_repeats=0)
    assert ids(on.generate(prompts, GREEDY)) == expected
    again = on.generate(prompts, GREEDY)
    assert ids(again) == expected and all(o.num_cached_tokens >= 32 for o in again)
    on.engine.check_integrity()


def test_tier_hits_equal_computing(native):
    """Blocks evicted to the host tier and loaded back give the tokens computed ones gave."""
    prompts = ["A document of several blocks, read twice. " * 4 + p for p in PROMPTS[:2]]
    llm = native(kv_host_memory="64MiB")
    computed = llm.generate(prompts, GREEDY)
    assert all(o.num_cached_tokens == 0 for o in computed)
    kv = llm.engine.kv
    held = kv.pool.allocate(kv.num_free_blocks)  # evict every cached block to the host tier
    llm.engine.step()  # an empty step still copies the evicted blocks out
    kv.pool.release(held)
    kv.exact.clear()  # take the blocks path, not the exact-repeat shortcut
    again = llm.generate(prompts, GREEDY)
    assert ids(again) == ids(computed)
    assert all(o.cached_tokens_by_tier.get("host", 0) >= 32 for o in again)
    llm.engine.check_integrity()

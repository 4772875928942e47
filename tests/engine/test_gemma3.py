"""Gemma 3 270M through the engine: the equality invariants with prompts longer than its
512-token window, and the KV memory its sliding layers hold (bounded by the window)."""

from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.cache.manager import NULL_BLOCK, KVCacheManager
from kvserve.engine.request import Request
from kvserve.engine.scheduler import Scheduler, SchedulerConfig
from kvserve.step import RunnerOutput

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
WINDOW, BS = 512, 16


@pytest.fixture(scope="module")
def prompts(gemma3, gemma3_text) -> list[list[int]]:
    """Two prompts of 560 tokens: position 512 on sees only part of the prompt."""
    ids = gemma3.tokenizer.encode(gemma3_text)
    return [ids[:560], [ids[0], *ids[1000:1559]]]


def idle(llm: LLM) -> None:
    llm.engine.check_integrity()
    assert all(pool.num_used == 0 for pool in llm.engine.kv.pools)


@pytest.fixture(scope="module")
def cached_engine(gemma3):
    return LLM(gemma3, device="cpu", kv_cache_memory="64MiB", num_exact_repeats=0)


@pytest.fixture(scope="module")
def alone(cached_engine, prompts):
    outs = [cached_engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    idle(cached_engine)
    return outs


def test_prefix_hit_equals_computing(cached_engine, prompts, alone):
    """The sliding group released blocks 0-2 of the first prompt while computing it; a hit
    of 34 blocks needs only blocks 2-33 of it (the last window), and the full group's all."""
    again = cached_engine.generate([prompts[0]], GREEDY)[0]
    assert again.num_cached_tokens == 544
    assert again.token_ids == alone[0]
    idle(cached_engine)


def test_batched_chunked_and_preempted_equal_alone(gemma3, prompts, alone):
    # 48 blocks per group: both prompts (35 full blocks each) cannot be held at once.
    small = LLM(gemma3, device="cpu", kv_cache_memory=48 * 16 * 36_864,
                max_num_batched_tokens=128)
    outs = small.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone
    stats = small.stats()
    assert stats["num_preemptions"] > 0 and stats["num_chunked_prefills"] > 0
    idle(small)


def test_no_kv_cache_equals_kv_cache(cached_engine, prompts, alone):
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, use_kv_cache=False)
    out = cached_engine.generate([prompts[0]], params)[0]
    assert out.token_ids == alone[0][:2]
    assert out.work_tokens == 560 + 561
    idle(cached_engine)


def test_4k_request_holds_the_window_in_sliding_layers(gemma3):
    """One 4,096-token prompt, chunked by 512, and three decode steps, scheduled as the engine
    does (no forward pass: the cache's accounting is what is tested). Between steps each
    sliding layer holds at most window / block + 1 blocks; the full ones hold everything."""
    from kvserve.config import EngineConfig
    from kvserve.engine.kv_setup import group_block_counts

    config = gemma3.config
    groups = config.kv_groups()
    assert [(w, len(layers)) for w, layers in groups] == [(0, 3), (WINDOW, 15)]
    layer_block = config.kv_bytes_per_layer_token("float32") * BS  # 2 * 256 * 4 * 16
    block_bytes = [3 * layer_block, 15 * layer_block]
    engine_config = EngineConfig(kv_cache_memory=1 << 30, max_num_batched_tokens=512)
    counts = group_block_counts(engine_config, (0, WINDOW), block_bytes)
    kv = KVCacheManager(counts, BS, block_bytes=block_bytes, windows=(0, WINDOW))
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=512), kv)
    request = Request("long", list(range(10, 4106)), SamplingParams(max_tokens=4))
    scheduler.add(request)
    most_sliding = 0
    while not request.is_finished:
        out = scheduler.schedule()
        most_sliding = max(most_sliding, kv.pools[1].num_used)
        scheduler.update(out, RunnerOutput(sampled={s.request_id: 7 for s in out.scheduled
                                                    if s.sample}))
        n = request.num_computed_tokens
        sliding = [b for b in request.group_tables[0] if b != NULL_BLOCK]
        assert len(sliding) <= WINDOW // BS + 1
        assert len(request.block_table) == -(-n // BS)
        assert kv.bytes_in_use == config.kv_bytes_held(n, "float32", BS)
        if request.num_output_tokens == 4:
            scheduler.finish(request, "length")
        kv.check_integrity(scheduler.running)
    assert n == 4099
    assert len(sliding) == 33  # positions 3587-4098 (the next query's window) span 33 blocks
    assert most_sliding <= -(-(WINDOW - 1 + 512) // BS) + 1  # during a step: + its chunk
    # The most held at once: the last chunk, 4,096 positions in the full layers and, in the
    # sliding ones, blocks 192 on (from position 3,584 - 511).
    assert request.stats.kv_bytes_peak == 4096 * 3 * 2048 + (4096 - 192 * 16) * 15 * 2048
    full_attention = 4099 * config.kv_bytes_per_token("float32")
    assert config.kv_bytes_held(4099, "float32", BS) < full_attention / 3

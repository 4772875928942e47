"""Two engines sharing one real redis-server: a prefix computed by one is a hit on the other."""

from __future__ import annotations

import pytest
from redis_server import free_port, redis_server  # tests/, on the path through its conftest

from kvserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
DOC = ("The workshop manual says: clean the chain, then oil each link, then wipe the outside; "
       "check the brake pads for wear every month. ") * 2


def salted(salt: str | None) -> SamplingParams:
    return SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, cache_salt=salt)


@pytest.fixture(scope="module")
def store():
    port = free_port()
    with redis_server(port) as url:
        yield url, port


def replica(checkpoint, url: str) -> LLM:
    return LLM(checkpoint, device="cpu", kv_remote=url)


def written(llm: LLM) -> None:
    llm.engine.kv.tiers.remote.flush()


def test_a_prefix_computed_on_one_replica_is_a_remote_hit_on_the_other(checkpoint, store):
    url, _ = store
    first, second = replica(checkpoint, url), replica(checkpoint, url)
    expected = first.generate(DOC + "What comes first?", GREEDY)[0]
    written(first)
    assert first.cache_stats()["tiers"]["remote"]["blocks_written"] >= len(
        expected.prompt_token_ids) // 16
    out = second.generate(DOC + "What comes first?", GREEDY)[0]
    assert out.token_ids == expected.token_ids
    assert out.cached_tokens_by_tier.get("remote", 0) >= 16 * (len(expected.prompt_token_ids)
                                                               // 16 - 1)
    assert second.cache_stats()["hit_tokens_by_tier"]["remote"] > 0
    second.engine.check_integrity()


def test_salts_are_not_shared_across_replicas(checkpoint, store):
    url, _ = store
    first, second = replica(checkpoint, url), replica(checkpoint, url)
    prompt = DOC + "Who wrote the manual?"
    first.generate(prompt, salted("alice"))
    written(first)
    assert "remote" not in second.generate(prompt, salted("bob"))[0].cached_tokens_by_tier
    assert second.generate(prompt, salted("alice"))[0].cached_tokens_by_tier.get("remote")


def test_requests_succeed_while_the_store_is_down_and_it_comes_back(checkpoint):
    port = free_port()
    with redis_server(port) as url:
        llm = replica(checkpoint, url)
        expected = llm.generate(DOC + "How often?", GREEDY)[0].token_ids
    # The store is gone: a miss, never an error, and the tier says so.
    out = llm.generate(DOC + "How often, again?", GREEDY)[0]
    assert out.finish_reason == "length" and "remote" not in out.cached_tokens_by_tier
    assert llm.cache_stats()["tiers"]["remote"]["up"] is False
    with redis_server(port):  # back, empty; the tier retries after its backoff
        llm.engine.kv.tiers.remote._retry_at = 0.0
        llm.clear_cache()
        assert llm.generate(DOC + "How often?", GREEDY)[0].token_ids == expected
        assert llm.cache_stats()["tiers"]["remote"]["up"] is True
        written(llm)
        other = replica(checkpoint, url)
        assert other.generate(DOC + "How often?", GREEDY)[0].cached_tokens_by_tier.get("remote")

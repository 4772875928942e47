"""Scheduler decisions without a model: budgets, chunking, preemption, integrity."""

import random

from kvserve.cache.manager import KVCacheManager
from kvserve.engine.output import token_stop_reason
from kvserve.engine.request import Request, Status
from kvserve.engine.scheduler import Scheduler, SchedulerConfig
from kvserve.sampling_params import SamplingParams
from kvserve.step import RunnerOutput

EOS = 2


def make(num_blocks=100, block_size=4, max_seqs=8, budget=32):
    return Scheduler(SchedulerConfig(max_seqs, budget), KVCacheManager(num_blocks, block_size))


def req(rid, prompt_len, max_tokens=4, **kw):
    first = 100 * sum(map(ord, rid))  # distinct prompts: no prefix shared by accident
    return Request(rid, list(range(first, first + prompt_len)),
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw))


def apply(s: Scheduler, out, sampled: dict[str, int]) -> None:
    """What the engine does with a step's result: update, then decide who is finished."""
    for request in s.update(out, RunnerOutput(sampled=sampled)):
        if not request.is_finished and (reason := token_stop_reason(request, (EOS,))):
            s.finish(request, reason)


def fake_step(s: Scheduler, token=7):
    out = s.schedule()
    apply(s, out, {x.request_id: token for x in out.scheduled if x.sample})
    s.kv.check_integrity(s.running + list(s.waiting))
    return out


def plan(out):
    return [(x.request_id, x.num_new_tokens) for x in out.scheduled]


def test_prompts_are_chunked_to_the_token_budget():
    s = make(budget=8)
    s.add(req("a", 20))
    assert plan(fake_step(s)) == [("a", 8)]
    assert plan(fake_step(s)) == [("a", 8)]
    assert plan(fake_step(s)) == [("a", 4)]  # the chunk that ends the prompt samples
    a = s.running[0]
    assert a.output_token_ids == [7] and a.num_computed_tokens == 20
    assert s.stats.num_chunked_prefills == 2


def test_decodes_go_first_then_waiting_prompts_fill_the_rest():
    s = make(budget=10)
    s.add(req("a", 3))
    fake_step(s)  # a prefills
    s.add(req("b", 30))
    assert plan(fake_step(s)) == [("a", 1), ("b", 9)]
    assert plan(fake_step(s)) == [("a", 1), ("b", 9)]


def test_max_num_seqs_caps_the_running_set():
    s = make(max_seqs=2, budget=100)
    for rid in "abc":
        s.add(req(rid, 2))
    assert [r for r, _ in plan(fake_step(s))] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_newest_request_is_preempted_when_blocks_run_out():
    s = make(num_blocks=4, block_size=4, budget=100)
    s.add(req("old", 4, max_tokens=8))
    s.add(req("new", 4, max_tokens=8))
    fake_step(s)  # 2 blocks: one each, both full (4 tokens)
    out = fake_step(s)  # each decode needs a second block: 4 blocks used
    assert plan(out) == [("old", 1), ("new", 1)]
    for _ in range(3):
        fake_step(s)
    out = fake_step(s)  # old needs a third block: new is preempted
    assert ("old", 1) in plan(out)
    new = next(r for r in s.waiting)
    assert new.request_id == "new" and new.status is Status.WAITING
    assert new.num_computed_tokens == 0 and new.block_table == [] and new.stats.num_preemptions == 1
    assert s.stats.num_preemptions == 1


def test_preempted_request_resumes_by_recomputing_prompt_and_output():
    s = make(num_blocks=3, block_size=4, budget=100)
    s.add(req("a", 4, max_tokens=6))
    s.add(req("b", 4, max_tokens=6))
    while s.has_unfinished():
        fake_step(s)
    assert s.stats.num_preemptions >= 1
    # Every request still produced all its tokens.
    assert s.kv.num_free_blocks == 3


def test_no_cache_policy_recomputes_the_whole_sequence_each_step():
    s = make(budget=100)
    r = req("a", 5, max_tokens=4, use_kv_cache=False)
    s.add(r)
    computed = [fake_step(s).num_tokens for _ in range(4)]
    assert computed == [5, 6, 7, 8]  # sum of (P + i) for i in 0..n-1
    assert r.stats.work_tokens == 26 and r.finish_reason == "length"
    assert s.kv.num_free_blocks == 100


def test_a_no_cache_request_takes_at_most_half_of_a_step():
    s = make(budget=16)
    s.add(req("a", 14, max_tokens=3, use_kv_cache=False))
    s.add(req("b", 30))
    assert plan(fake_step(s)) == [("a", 8), ("b", 8)]  # a chunked to half, b the rest
    assert plan(fake_step(s)) == [("a", 6), ("b", 10)]  # a samples its first token
    assert plan(fake_step(s)) == [("a", 8), ("b", 8)]  # a recomputes all 15 tokens
    assert plan(fake_step(s)) == [("a", 7), ("b", 4)]  # both end their sequence
    assert plan(fake_step(s)) == [("b", 1), ("a", 8)]  # b decodes first, a starts again
    a = next(r for r in s.running if r.request_id == "a")
    assert a.output_token_ids == [7, 7] and a.stats.work_tokens == 14 + 15 + 8


def test_kv_cache_policy_computes_each_token_once():
    s = make(budget=100)
    r = req("a", 5, max_tokens=4)
    s.add(r)
    computed = [fake_step(s).num_tokens for _ in range(4)]
    assert computed == [5, 1, 1, 1]  # P + n - 1
    assert r.stats.kv_tokens_peak == 8


def test_eos_and_stop_token_ids_finish_with_stop():
    s = make()
    a = Request("a", [1, 2], SamplingParams(max_tokens=5))
    b = Request("b", [1, 2], SamplingParams(max_tokens=5, stop_token_ids=(9,)))
    s.add(a)
    s.add(b)
    apply(s, s.schedule(), {"a": EOS, "b": 9})
    assert a.finish_reason == "stop" and b.finish_reason == "stop"
    assert not s.has_unfinished() and s.kv.num_free_blocks == 100


def test_randomized_steps_keep_blocks_conserved():
    rng = random.Random(0)
    s = make(num_blocks=24, block_size=4, max_seqs=6, budget=16)
    requests = []
    for i in range(40):
        r = req(f"r{i}", rng.randint(1, 30), max_tokens=rng.randint(1, 20),
                use_kv_cache=rng.random() > 0.2)
        requests.append(r)
        s.add(r)
    steps = 0
    while s.has_unfinished():
        out = fake_step(s)
        assert out.num_tokens <= 16 and len(out.scheduled) <= 6
        steps += 1
        assert steps < 10_000, "scheduler made no progress"
    assert all(r.finish_reason == "length" for r in requests)
    assert all(r.num_output_tokens == r.params.max_tokens for r in requests)
    assert s.kv.num_free_blocks == 24
    assert s.stats.num_preemptions > 0


def test_lpm_serves_the_longest_cached_prefix_first():
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=100, policy="lpm"),
                  KVCacheManager(50, 4))
    warm = req("warm", 12, max_tokens=1)
    s.add(warm)
    while s.has_unfinished():
        fake_step(s)
    s.add(req("cold", 12, max_tokens=1))
    s.add(Request("hot", list(warm.prompt_token_ids) + [5], SamplingParams(max_tokens=1)))
    out = s.schedule()
    assert plan(out) == [("hot", 1)]  # 12 cached tokens: only the new last one is computed


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token():
    import torch

    from kvserve.runner.sampler import filtered_probs

    logits = torch.tensor([0.5, 3.0, 1.0])
    probs = filtered_probs(logits, SamplingParams(top_p=5e-324))  # 0 in float32
    assert probs[0] == probs[2] == 0 and probs[1] > 0  # not renormalized: sampling does it

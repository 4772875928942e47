"""One request's failure never touches another: faults injected at each stage of a step, a
tier block that cannot be loaded, and a disk folder written by another dtype."""

from __future__ import annotations

import pytest
from prompts import PROMPTS  # tests/engine, on the path as the tests' own folder

from kvserve import LLM, SamplingParams, faults

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PREFIX = ("A bicycle chain should be cleaned and oiled every few hundred kilometres, more often "
          "in the rain. Which oil is best for it?")
FILLER = "Paged attention keeps keys and values in fixed-size blocks of tokens. " * 6


@pytest.fixture(autouse=True)
def disarmed():
    yield
    faults.disarm_all()


@pytest.fixture(scope="module")
def llm(checkpoint):
    # No prefix cache: every run computes every request, so each stage is reached.
    return LLM(model=checkpoint, device="cpu", enable_prefix_caching=False)


def run_batch(llm: LLM) -> dict[str, object]:
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, GREEDY, request_id=f"r{i}")
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    engine.check_integrity()
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]
    return finals


@pytest.fixture(scope="module")
def reference(llm):
    return {rid: out.token_ids for rid, out in run_batch(llm).items()}


@pytest.mark.parametrize("stage", ["schedule", "runner", "sample", "detokenize"])
def test_a_fault_fails_one_request_and_the_other_seven_are_unchanged(llm, reference, stage):
    faults.arm(stage, "r3")
    outs = run_batch(llm)
    victim = outs.pop("r3")
    assert victim.finish_reason == "error" and stage in victim.error
    assert {rid: o.token_ids for rid, o in outs.items()} == {
        rid: ids for rid, ids in reference.items() if rid != "r3"}
    assert all(o.finish_reason == "length" for o in outs.values())


def test_the_engine_serves_on_after_the_faults(llm, reference):
    faults.arm("runner", "r0")
    run_batch(llm)
    faults.disarm_all()
    assert {rid: o.token_ids for rid, o in run_batch(llm).items()} == reference


def test_a_runner_that_raises_as_a_whole_fails_only_the_culprit(llm, reference, monkeypatch):
    execute = llm.engine.runner.execute

    def fragile(out):
        if any(s.request_id == "r5" for s in out.scheduled):
            raise RuntimeError("boom")
        return execute(out)

    monkeypatch.setattr(llm.engine.runner, "execute", fragile)
    outs = run_batch(llm)
    assert outs.pop("r5").finish_reason == "error"
    assert {rid: o.token_ids for rid, o in outs.items()} == {
        rid: ids for rid, ids in reference.items() if rid != "r5"}


def pool_of(checkpoint, dtype: str, num_blocks: int) -> int:
    return checkpoint.config.kv_bytes_per_token(dtype) * 16 * num_blocks


def evict_prefix(llm: LLM) -> list[int]:
    """Run PREFIX, then FILLER, which needs every block: PREFIX's blocks go to the tiers."""
    ids = llm.generate(PREFIX, GREEDY)[0].token_ids
    llm.generate(FILLER, GREEDY)
    return ids


def test_a_failed_tier_load_is_computed_and_leaves_no_stale_hit(checkpoint):
    llm = LLM(checkpoint, device="cpu", kv_cache_memory=pool_of(checkpoint, "float32", 7),
              kv_host_memory="64MiB")
    expected = evict_prefix(llm)
    assert llm.cache_stats()["tiers"]["host"]["blocks_cached"] >= 2
    faults.arm("load", "victim")
    llm.engine.add_request(PREFIX, GREEDY, request_id="victim")
    out = [o for o in llm._run(1, False) if o.finished][0]
    faults.disarm_all()
    assert out.token_ids == expected and out.finish_reason == "length"
    assert out.num_cached_tokens == 0 and out.cached_tokens_by_tier.get("host", 0) == 0
    assert llm.cache_stats()["hit_tokens_by_tier"]["host"] == 0
    llm.engine.check_integrity()
    again = llm.generate(PREFIX, GREEDY)[0]  # the recomputed blocks are the ones indexed now
    assert again.token_ids == expected and again.num_cached_tokens > 0
    evict_prefix(llm)
    from_host = llm.generate(PREFIX, GREEDY)[0]  # and a clean load works as before
    assert from_host.token_ids == expected and from_host.cached_tokens_by_tier.get("host")


def test_a_disk_folder_reopened_with_another_dtype(tiny_checkpoint, tmp_path):
    """The tiny model: this is about the folder, and float16 is slow on a CPU."""
    def engine(dtype: str, disk: bool = True) -> LLM:
        return LLM(tiny_checkpoint, device="cpu", dtype=dtype,
                   kv_disk_cache=str(tmp_path) if disk else None,
                   kv_cache_memory=pool_of(tiny_checkpoint, dtype, 7))

    with engine("float32") as first:
        expected = evict_prefix(first)
    with engine("float32") as restarted:  # a restart hits the disk tier
        out = restarted.generate(PREFIX, GREEDY)[0]
        assert out.token_ids == expected and out.cached_tokens_by_tier.get("disk", 0) > 0
    for dtype in ("bfloat16", "float16"):
        fresh = engine(dtype, disk=False).generate(PREFIX, GREEDY)[0].token_ids
        with engine(dtype) as other:
            out = other.generate(PREFIX, GREEDY)[0]
            assert out.token_ids == fresh and "disk" not in out.cached_tokens_by_tier
            evict_prefix(other)  # now this dtype's own records are in the folder too
    with engine("float16") as reopened:  # same element size as bfloat16: never reinterpreted
        out = reopened.generate(PREFIX, GREEDY)[0]
        assert out.token_ids == fresh and out.cached_tokens_by_tier.get("disk", 0) > 0

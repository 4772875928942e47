"""KV cache groups for sliding windows, without a model: which blocks a window still needs,
what is released, and which prefix hits every group can serve."""

from kvserve.cache.manager import NULL_BLOCK, KVCacheManager
from kvserve.cache.window import first_seen_block, longest_hit
from kvserve.engine.request import Request
from kvserve.sampling_params import SamplingParams

BS, WINDOW = 4, 8  # a query at p sees p - 7 .. p: at most 8 positions, 3 blocks


def req(tokens, rid="r"):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4))


def groups(full=64, sliding=64, **kw):
    """Group 0: full attention over 1 layer; group 1: the window over 5 layers."""
    return KVCacheManager([full, sliding], BS, block_bytes=[100, 500], windows=(0, WINDOW),
                          num_exact_repeats=0, **kw)


def step(kv, request, num_new):
    assert kv.allocate_slots(request, num_new)
    request.num_computed_tokens += num_new
    kv.commit(request)


def held(table):
    return [b for b in table if b != NULL_BLOCK]


def test_first_seen_block():
    assert [first_seen_block(n, WINDOW, BS) for n in (0, 7, 8, 11, 12, 15, 100)] == \
        [0, 0, 0, 1, 1, 2, 23]
    assert first_seen_block(100, 0, BS) == 0  # full attention sees everything


def test_longest_hit_needs_only_the_window_of_a_sliding_group():
    every = [True] * 6
    assert longest_hit([every, every], (0, WINDOW), BS) == 6
    # Sliding blocks 0-2 gone: a hit at 5 blocks (20 tokens) needs blocks 3 and 4 only.
    assert longest_hit([every, [False] * 3 + [True] * 3], (0, WINDOW), BS) == 6
    assert longest_hit([every, [False] * 3 + [True, False, True]], (0, WINDOW), BS) == 0
    assert longest_hit([every[:4] + [False, True], every], (0, WINDOW), BS) == 4
    assert longest_hit([[True] * 6, [True, True, False, False, False, True]], (0, WINDOW),
                       BS) == 2


def test_sliding_group_holds_only_its_window_and_full_group_everything():
    kv = groups()
    r = req(range(1, 101))
    for chunk in (10, 30, 40, 20):  # a chunked prompt of 100 tokens
        step(kv, r, chunk)
        assert len(held(r.block_table)) == -(-r.num_computed_tokens // BS)
        first = first_seen_block(r.num_computed_tokens, WINDOW, BS)
        assert r.group_tables[0][:first] == [NULL_BLOCK] * first
        assert len(held(r.group_tables[0])) <= WINDOW // BS + 1
        kv.check_integrity([r])
    # Positions 92-99 (blocks 23 and 24) are all the next query sees.
    assert kv.pools[1].num_used == 2 and kv.pools[0].num_used == 25
    # Released blocks stay cached (hashed), so a later prefix hit can take them back.
    assert kv.pools[1].num_cached == 23
    assert kv.bytes_in_use == 25 * 100 + 2 * 500
    assert kv.bytes_held(r, 100) == 100 * 25 + (100 - 23 * BS) * 125
    kv.free(r)
    kv.check_integrity([])
    assert kv.pools[0].num_used == kv.pools[1].num_used == 0


def test_decode_steps_release_blocks_as_the_window_moves():
    kv = groups()
    r = req(range(1, 13))
    step(kv, r, 12)
    for _ in range(20):
        r.output_token_ids.append(7)
        step(kv, r, 1)
        assert len(held(r.group_tables[0])) <= WINDOW // BS + 1
    assert r.num_computed_tokens == 32 and len(held(r.block_table)) == 8
    kv.check_integrity([r])


def test_prefix_hit_provides_what_each_group_needs():
    kv = groups()
    a = req(range(1, 30), "a")
    step(kv, a, 29)
    kv.free(a)
    again = req(range(1, 30), "again")
    hit = kv.lookup(again)
    assert hit.num_tokens == 28  # 7 full blocks; the last token is computed
    assert hit.tables[0] == list(range(7))
    assert hit.tables[1][:first_seen_block(28, WINDOW, BS)] == [NULL_BLOCK] * 5
    assert kv.allocate_slots(again, 1, hit)
    assert len(held(again.group_tables[0])) == 3  # blocks 5, 6 and one for the new token
    kv.check_integrity([again])


def test_no_hit_when_the_sliding_blocks_were_evicted():
    kv = groups(sliding=6)
    a = req(range(1, 30), "a")
    for chunk in (8, 8, 8, 5):
        step(kv, a, chunk)
    kv.free(a)
    assert kv.lookup(req(range(1, 30))).num_tokens == 28
    b = req(range(100, 124), "b")  # takes every sliding block back: a's are evicted
    for chunk in (8, 8, 8):
        step(kv, b, chunk)
    assert kv.pools[0].num_cached == 7  # the full group still has all of a's blocks
    assert kv.lookup(req(range(1, 30))).num_tokens == 0  # but that alone is not enough
    kv.free(b)
    kv.check_integrity([])


def test_allocation_fails_without_change_when_a_group_is_full():
    kv = groups(full=64, sliding=4)
    r = req(range(1, 41))
    assert not kv.allocate_slots(r, 40)  # 10 sliding blocks for the chunk: only 4
    assert r.block_table == [] and kv.pools[0].num_used == 0
    assert kv.allocate_slots(r, 12)
    kv.check_integrity([r])

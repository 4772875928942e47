"""Prefix caching without a model: hash chain, verification, eviction order, sharing, tiers."""

import pytest

from kvserve.cache.hashing import hash_block, root_hash
from kvserve.cache.manager import KVCacheManager
from kvserve.cache.tiers import DiskTier, Entry, HostTier
from kvserve.engine.request import Request
from kvserve.sampling_params import SamplingParams

BS = 4


def req(tokens, salt=None, rid="r"):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4, cache_salt=salt))


def run_prompt(kv: KVCacheManager, request: Request):
    """Admit a request as the scheduler would: lookup, allocate, compute the rest, commit."""
    hit = kv.lookup(request)
    assert kv.allocate_slots(request, request.num_tokens - hit.num_tokens, hit)
    request.num_computed_tokens = request.num_tokens
    kv.commit(request)
    return hit


def test_hash_chain_depends_on_parent_tokens_salt_and_model():
    root = root_hash("model-a", BS)
    h1 = hash_block(root, [1, 2, 3, 4])
    assert h1 == hash_block(root, [1, 2, 3, 4])
    assert hash_block(h1, [5, 6, 7, 8]) != hash_block(hash_block(root, [1, 2, 3, 9]), [5, 6, 7, 8])
    assert hash_block(root, [1, 2, 3, 4], b"tenant") != h1
    assert hash_block(root_hash("model-b", BS), [1, 2, 3, 4]) != h1


def test_hit_covers_full_blocks_and_never_the_last_token():
    kv = KVCacheManager(16, BS)
    run_prompt(kv, req(range(100, 112)))  # 3 full blocks
    kv.free(kv_req := req(range(100, 112)))  # noqa: F841 (a request holding nothing)
    same = req(range(100, 112), rid="same")
    assert kv.lookup(same).num_tokens == 8  # 12 tokens: 2 blocks, the last token computed
    longer = req(list(range(100, 112)) + [5], rid="longer")
    assert kv.lookup(longer).num_tokens == 12
    other_last = req(list(range(100, 111)) + [7], rid="x")
    assert kv.lookup(other_last).num_tokens == 8


def test_a_hash_collision_never_serves_foreign_blocks():
    kv = KVCacheManager(16, BS, hash_fn=lambda parent, tokens, extra: b"same-hash-always")
    run_prompt(kv, req([1, 2, 3, 4, 5]))
    assert kv.lookup(req([9, 9, 9, 9, 5], rid="b")).num_tokens == 0
    assert kv.lookup(req([1, 2, 3, 4, 6], rid="c")).num_tokens == 4


def test_concurrent_requests_share_blocks_by_reference_count():
    kv = KVCacheManager(16, BS)
    a = req(range(100, 110), rid="a")
    run_prompt(kv, a)
    b = req(list(range(100, 108)) + [1, 2], rid="b")
    hit = run_prompt(kv, b)
    assert hit.num_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert [kv.pool.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    assert kv.pool.num_used == 4  # 3 + 1 instead of 6
    kv.free(a)
    assert [kv.pool.ref_counts[x] for x in b.block_table] == [1, 1, 1]
    kv.check_integrity([b])
    kv.free(b)
    kv.check_integrity([])


def test_salts_isolate_tenants():
    kv = KVCacheManager(16, BS)
    run_prompt(kv, req(range(100, 110), salt="alice"))
    assert kv.lookup(req(range(100, 110), salt="bob", rid="b")).num_tokens == 0
    assert kv.lookup(req(range(100, 110), rid="none")).num_tokens == 0
    assert kv.lookup(req(range(100, 110), salt="alice", rid="a2")).num_tokens == 8


def test_eviction_is_lru_and_deepest_block_first():
    kv = KVCacheManager(6, BS)
    a = req(range(100, 113), rid="a")  # blocks 0, 1, 2 full + block 3 partial
    run_prompt(kv, a)
    assert a.block_table == [0, 1, 2, 3]
    b = req(range(200, 209), rid="b")  # blocks 4, 5 full + needs a third
    kv.free(a)  # 3 (unhashed) to the front; then 2, 1, 0 at the back, deepest first
    assert list(kv.pool.queue) == [3, 4, 5, 2, 1, 0]
    run_prompt(kv, b)
    assert b.block_table == [3, 4, 5]  # the unhashed block went first, then never-used ones
    kv.free(b)  # b's partial block 5 to the front; its full blocks 4, 3 most recently used
    assert list(kv.pool.queue) == [5, 2, 1, 0, 4, 3]
    c = req(range(300, 309), rid="c")
    run_prompt(kv, c)
    assert c.block_table == [5, 2, 1]  # a's tail evicted before its head, b untouched
    assert kv.lookup(req(range(100, 113), rid="a2")).num_tokens == 4  # a's first block left
    assert kv.lookup(req(range(200, 209), rid="b2")).num_tokens == 8
    assert kv.pool.num_evictions == 2


def test_clear_drops_only_unreferenced_cached_blocks():
    kv = KVCacheManager(8, BS)
    a, b = req(range(100, 109), rid="a"), req(range(200, 209), rid="b")
    run_prompt(kv, a)
    run_prompt(kv, b)
    kv.free(a)
    assert kv.clear() == 2  # a's two full blocks; b's are in use
    assert kv.lookup(req(range(100, 109), rid="a2")).num_tokens == 0
    assert kv.lookup(req(range(200, 209), rid="b2")).num_tokens == 8
    kv.check_integrity([b])


def test_evicted_blocks_move_to_the_host_tier_and_load_back():
    host = HostTier(capacity_bytes=10 * 64)
    kv = KVCacheManager(3, BS, block_bytes=64, host=host)
    a = req(range(100, 109), rid="a")
    run_prompt(kv, a)
    kv.free(a)
    b = req(range(200, 209), rid="b")
    run_prompt(kv, b)  # needs all 3 blocks: a's two cached blocks are evicted
    saves, loads = kv.take_transfers()
    assert [s[0] for s in saves] == [1, 0] and loads == []
    for block_id, h, tokens in saves:  # the runner copies the content out
        kv.store_evicted(h, tokens, f"kv-of-block-{block_id}")
    kv.free(b)
    a2 = req(range(100, 109), rid="a2")
    hit = kv.lookup(a2)
    assert hit.num_tokens == 8 and hit.tokens_by_tier(BS) == {"host": 8}
    assert kv.allocate_slots(a2, 1, hit)
    _, loads = kv.take_transfers()
    assert [payload for _, payload in loads] == ["kv-of-block-0", "kv-of-block-1"]
    assert a2.num_cached_tokens == 8 and kv.stats.hit_tokens_by_tier["host"] == 8


def codec():
    return (lambda s: s.encode()), (lambda b: b.decode())


def disk_with_block(tmp_path, fingerprint="fp-one"):
    disk = DiskTier(tmp_path, 1 << 20, fingerprint, *codec())
    h = hash_block(root_hash(fingerprint, BS), [1, 2, 3, 4])
    disk.put(h, Entry((1, 2, 3, 4), "payload", 7))
    disk.flush()
    return disk, h


def test_disk_tier_survives_a_restart(tmp_path):
    disk, h = disk_with_block(tmp_path)
    disk.close()
    again = DiskTier(tmp_path, 1 << 20, "fp-one", *codec())
    assert again.get(h, (1, 2, 3, 4)) == "payload"
    assert again.get(h, (1, 2, 3, 5)) is None  # tokens verified, not just the hash


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_disk_files_are_detected_and_removed(tmp_path, damage):
    disk, h = disk_with_block(tmp_path)
    path = disk.path(h)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-20] ^= 0xFF
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else
                     b"" if damage == "empty" else bytes(raw))
    assert disk.get(h, (1, 2, 3, 4)) is None
    assert not path.exists() and h not in disk.files


def test_a_file_from_another_model_is_never_loaded(tmp_path):
    disk, h = disk_with_block(tmp_path, "fp-one")
    other = DiskTier(tmp_path, 1 << 20, "fp-two", *codec())
    foreign = other.path(h)
    foreign.write_bytes(disk.path(h).read_bytes())  # same name, other model's folder
    other.files[h] = foreign.stat().st_size
    assert other.get(h, (1, 2, 3, 4)) is None and not foreign.exists()


def test_a_disk_write_error_disables_the_tier_without_raising(tmp_path):
    def full_disk(payload):
        raise OSError(28, "No space left on device")

    disk = DiskTier(tmp_path, 1 << 20, "fp", full_disk, lambda b: b)
    disk.put(b"x" * 16, Entry((1,), "p", 4))
    disk.flush()
    assert not disk.enabled and disk.files == {}
    disk.put(b"y" * 16, Entry((1,), "p", 4))  # ignored from now on
    assert disk.pending == {} and disk.get(b"y" * 16, (1,)) is None

"""Prefix caching without a model: hash chain, verification, eviction order, sharing, tiers."""

import pytest

from kvserve.cache.disk_tier import DiskTier
from kvserve.cache.hashing import hash_block, root_hash
from kvserve.cache.manager import KVCacheManager
from kvserve.cache.tiers import HostTier, TierStore
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
    tiers = TierStore(HostTier(capacity_bytes=10 * 64), block_bytes=64)
    kv = KVCacheManager(3, BS, block_bytes=64, tiers=tiers)
    a = req(range(100, 109), rid="a")
    run_prompt(kv, a)
    kv.free(a)
    b = req(range(200, 209), rid="b")
    run_prompt(kv, b)  # needs all 3 blocks: a's two cached blocks are evicted
    saves = kv.take_saves()
    assert [s[0] for s in saves] == [1, 0] and all(s[3] for s in saves)  # both evicted
    for block_id, h, tokens, _ in saves:  # the runner copies the content out
        kv.store_block(h, tokens, f"kv-of-block-{block_id}")
    kv.free(b)
    a2 = req(range(100, 109), rid="a2")
    hit = kv.lookup(a2)
    assert hit.num_tokens == 8 and hit.tokens_by_tier() == {"host": 8} and hit.loads == []
    assert kv.allocate_slots(a2, 1, hit)
    assert [payload for _, payload in hit.loads] == ["kv-of-block-0", "kv-of-block-1"]
    assert kv.stats.hit_tokens_by_tier["host"] == 8
    # Loaded blocks enter the prefix index only once their K/V are in place (commit).
    assert kv.pool.index == {} and a2.num_committed_blocks == 0
    a2.num_computed_tokens = a2.num_tokens
    kv.commit(a2)
    assert kv.lookup(req(range(100, 109), rid="a3")).tokens_by_tier() == {"device": 8}


def codec():
    return (lambda s: s.encode()), (lambda b: b.decode())


def disk_with_block(tmp_path, fingerprint="fp-one", kv_format="float32;v1"):
    disk = DiskTier(tmp_path, 1 << 20, fingerprint, *codec(), kv_format=kv_format)
    h = hash_block(root_hash(fingerprint, BS), [1, 2, 3, 4])
    disk.put(h, (1, 2, 3, 4), "payload")
    disk.flush()
    return disk, h


def test_disk_tier_survives_a_restart(tmp_path):
    disk, h = disk_with_block(tmp_path)
    disk.close()
    again = DiskTier(tmp_path, 1 << 20, "fp-one", *codec(), kv_format="float32;v1")
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
    disk.put(b"x" * 16, (1,), "p")
    disk.flush()
    assert not disk.enabled and disk.files == {}
    disk.put(b"y" * 16, (1,), "p")  # ignored from now on
    assert disk.pending == {} and disk.get(b"y" * 16, (1,)) is None


def test_a_record_of_another_kv_format_is_skipped_and_left_alone(tmp_path):
    disk, h = disk_with_block(tmp_path, kv_format="float32;v1")
    disk.close()
    bf16 = DiskTier(tmp_path, 1 << 20, "fp-one", *codec(), kv_format="bfloat16;v1")
    assert bf16.contains(h)  # same name (a test sharing the hash): only the header tells
    assert bf16.get(h, (1, 2, 3, 4)) is None and bf16.num_skipped == 1
    assert disk.path(h).exists()  # the float32 engine's record is still there for it
    again = DiskTier(tmp_path, 1 << 20, "fp-one", *codec(), kv_format="float32;v1")
    assert again.get(h, (1, 2, 3, 4)) == "payload"


def test_the_kv_format_is_part_of_every_hash():
    assert root_hash("fp", BS, "float32;v1") != root_hash("fp", BS, "bfloat16;v1")
    assert root_hash("fp", BS, "float32;v1") != root_hash("fp", BS, "float32;v2")


def test_a_payload_of_the_wrong_size_is_a_miss(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20, "fp", *codec(), kv_format="f", payload_bytes=8)
    disk.put(b"h" * 16, (1, 2), "seven b")
    disk.flush()
    assert disk.get(b"h" * 16, (1, 2)) is None and not disk.path(b"h" * 16).exists()


def test_odd_files_in_a_shared_folder_never_fail_startup_or_a_lookup(tmp_path):
    disk, h = disk_with_block(tmp_path)
    disk.close()
    folder = disk.folder
    (folder / f"{'ab' * 16}.kvb").symlink_to(folder / "nowhere.kvb")  # dangling link
    (folder / f"{'cd' * 16}.kvb.123.tmp").write_bytes(b"half a write")  # orphan temp file
    (folder / "not-hex.kvb").write_bytes(b"x")
    again = DiskTier(tmp_path, 1 << 20, "fp-one", *codec(), kv_format="float32;v1")
    assert list(again.files) == [h]
    again.path(h).unlink()  # removed by another process sharing the folder
    assert again.get(h, (1, 2, 3, 4)) is None and h not in again.files


def test_a_waiting_request_does_not_read_the_disk_until_it_gets_blocks(tmp_path):
    reads = []
    disk = DiskTier(tmp_path, 1 << 20, "fp", lambda s: s.encode(),
                    lambda b: reads.append(b) or b.decode())
    kv = KVCacheManager(3, BS, tiers=TierStore(disk=disk), fingerprint="fp")
    a = req(range(100, 109), rid="a")
    run_prompt(kv, a)
    kv.free(a)
    kv.clear()  # only the disk has a's blocks now
    for i, h in enumerate(a.block_hashes[:2]):
        disk.put(h, tuple(range(100 + 4 * i, 104 + 4 * i)), f"block-{i}")
    disk.flush()
    disk.pending.clear()
    hog = req(range(500, 509), rid="hog")
    run_prompt(kv, hog)  # holds all 3 blocks
    a2 = req(range(100, 109), rid="a2")
    for _ in range(5):  # the scheduler retries every step while the pool is full
        hit = kv.lookup(a2)
        assert hit.tokens_by_tier() == {"disk": 8}
        assert not kv.allocate_slots(a2, 1, hit)
    assert reads == []
    kv.free(hog)
    hit = kv.lookup(a2)
    assert kv.allocate_slots(a2, 1, hit) and len(reads) == 2
    assert [p for _, p in hit.loads] == ["block-0", "block-1"]


def test_an_unreadable_tier_block_ends_the_hit_before_it(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20, "fp", *codec())
    kv = KVCacheManager(8, BS, tiers=TierStore(disk=disk), fingerprint="fp")
    a = req(range(100, 113), rid="a")
    run_prompt(kv, a)
    kv.free(a)
    kv.clear()
    for i, h in enumerate(a.block_hashes[:3]):
        disk.put(h, tuple(range(100 + 4 * i, 104 + 4 * i)), f"block-{i}")
    disk.flush()
    disk.path(a.block_hashes[1]).write_bytes(b"garbage")
    a2 = req(range(100, 113), rid="a2")
    hit = kv.lookup(a2)
    assert hit.num_tokens == 12
    assert kv.allocate_slots(a2, 1, hit)
    assert hit.num_tokens == 4 and [p for _, p in hit.loads] == ["block-0"]
    assert a2.num_computed_tokens == 4 and len(a2.block_table) == 2


def test_dropping_a_failed_load_releases_its_blocks_unindexed():
    tiers = TierStore(HostTier(capacity_bytes=10 * 64), block_bytes=64)
    kv = KVCacheManager(4, BS, block_bytes=64, tiers=tiers)
    a = req(range(100, 109), rid="a")
    run_prompt(kv, a)
    kv.free(a)
    kv.clear()  # the device copies are gone; the host tier gets both blocks
    for i, h in enumerate(a.block_hashes[:2]):
        kv.store_block(h, tuple(range(100 + 4 * i, 104 + 4 * i)), f"kv-{i}")
    a2 = req(range(100, 109), rid="a2")
    hit = kv.lookup(a2)
    assert kv.allocate_slots(a2, 1, hit) and a2.num_computed_tokens == 8
    kv.drop_blocks(a2, 1, ["host"])  # the copy into block 1 failed
    assert a2.num_computed_tokens == 4 and len(a2.block_table) == 1
    assert kv.stats.hit_tokens_by_tier["host"] == 4
    assert kv.allocate_slots(a2, 5)  # the rest is computed, into fresh blocks
    a2.num_computed_tokens = 9
    kv.commit(a2)
    kv.check_integrity([a2])
    assert kv.lookup(req(range(100, 109), rid="a3")).num_tokens == 8

import pytest

from kvserve.cache.block_pool import BlockPool
from kvserve.cache.manager import KVCacheManager


class Holder:
    def __init__(self, num_computed_tokens: int = 0) -> None:
        self.num_computed_tokens = num_computed_tokens
        self.block_table: list[int] = []


def test_allocate_gives_lowest_free_ids_with_count_one():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.ref_counts == [1, 1, 1, 0]
    assert pool.num_free == 1 and pool.num_used == 3


def test_blocks_without_a_hash_are_reused_first():
    pool = BlockPool(4)
    ids = pool.allocate(4)
    pool.release(reversed(ids))
    assert list(pool.queue) == [0, 1, 2, 3]
    assert pool.allocate(1) == [0]


def test_over_allocation_raises_and_changes_nothing():
    pool = BlockPool(2)
    pool.allocate(1)
    with pytest.raises(MemoryError):
        pool.allocate(2)
    assert pool.num_free == 1


def test_double_release_is_an_error():
    pool = BlockPool(2)
    ids = pool.allocate(1)
    pool.release(ids)
    with pytest.raises(RuntimeError):
        pool.release(ids)


def test_integrity_detects_a_count_that_differs_from_the_tables():
    pool = BlockPool(3)
    table = pool.allocate(2)
    pool.check_integrity([table])
    with pytest.raises(AssertionError):
        pool.check_integrity([table[:1]])


def test_manager_allocates_only_the_missing_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r = Holder()
    assert kv.allocate_slots(r, 5)  # positions 0..4 -> 2 blocks
    assert r.block_table == [0, 1]
    r.num_computed_tokens = 5
    assert kv.allocate_slots(r, 3)  # 0..7 still fits 2 blocks
    assert r.block_table == [0, 1]
    r.num_computed_tokens = 8
    assert kv.allocate_slots(r, 1)
    assert r.block_table == [0, 1, 2]
    assert kv.usage == pytest.approx(0.3)


def test_manager_refuses_without_partial_allocation():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a, b = Holder(), Holder()
    assert kv.allocate_slots(a, 8)
    assert not kv.allocate_slots(b, 8)
    assert b.block_table == [] and kv.num_free_blocks == 1
    kv.free(a)
    assert a.block_table == [] and kv.num_free_blocks == 3
    kv.check_integrity([a, b])

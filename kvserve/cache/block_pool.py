"""Fixed-size KV blocks: who holds which, which are free, and which hold a known prefix.

A block is in exactly one of three states:

- held: ``ref_count > 0``, in one or more block tables;
- cached: ``ref_count == 0`` but its tokens are registered in the prefix index, so a later
  request with the same prefix can take it back instead of recomputing it;
- free: ``ref_count == 0`` and no hash.

Cached and free blocks wait together in one queue, the next to be reused at the front.
Eviction order, written down because tests pin it: a block without a hash goes to the front
(reused first); a cached block goes to the back when its last holder lets go, so the least
recently used prefix is evicted first. Holders release a table tail first, so the deepest
block of a chain is evicted before its parents.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

EvictHook = Callable[[int, bytes, tuple[int, ...]], None]  # (block_id, hash, token ids)


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.index: dict[bytes, int] = {}  # hash -> the one block holding that prefix
        self.queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_cached = 0  # unreferenced blocks that still hold a registered prefix
        self.on_evict: EvictHook | None = None
        self.peak_used = 0
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or cached)."""
        return len(self.queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.queue)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.queue):
            raise MemoryError(f"asked for {n} KV blocks, {len(self.queue)} free")
        ids = []
        for _ in range(n):
            block_id, _ = self.queue.popitem(last=False)
            if self.block_hash[block_id] is not None:
                self.num_cached -= 1
                self._evict(block_id)
            self.ref_counts[block_id] = 1
            ids.append(block_id)
        self.peak_used = max(self.peak_used, self.num_used)
        return ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take another reference on blocks found in the prefix index."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.queue[block_id]
                self.num_cached -= self.block_hash[block_id] is not None
            self.ref_counts[block_id] += 1
        self.peak_used = max(self.peak_used, self.num_used)

    def release(self, block_ids: Iterable[int]) -> None:
        for block_id in block_ids:
            if self.ref_counts[block_id] <= 0:
                raise RuntimeError(f"block {block_id} released more often than it was held")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.queue[block_id] = None
                if self.block_hash[block_id] is None:
                    self.queue.move_to_end(block_id, last=False)
                else:
                    self.num_cached += 1

    def cache(self, block_id: int, block_hash: bytes, tokens: tuple[int, ...]) -> None:
        """Register a full block under its prefix hash (first writer wins)."""
        if block_hash in self.index or self.block_hash[block_id] is not None:
            return
        self.index[block_hash] = block_id
        self.block_hash[block_id] = block_hash
        self.block_tokens[block_id] = tokens
        self.num_cached += self.ref_counts[block_id] == 0

    def lookup(self, block_hash: bytes, tokens: Sequence[int]) -> int | None:
        """The block holding exactly these tokens under this hash; a hash alone is not trusted."""
        block_id = self.index.get(block_hash)
        if block_id is None or self.block_tokens[block_id] != tuple(tokens):
            return None
        return block_id

    def drop_cached(self) -> int:
        """Forget every unreferenced cached block (never one in use); returns how many."""
        dropped = [b for b in self.queue if self.block_hash[b] is not None]
        self.num_cached -= len(dropped)
        for block_id in dropped:
            self._forget(block_id)
            self.queue.move_to_end(block_id, last=False)
        return len(dropped)

    def _evict(self, block_id: int) -> None:
        block_hash, tokens = self.block_hash[block_id], self.block_tokens[block_id]
        assert block_hash is not None and tokens is not None
        self._forget(block_id)
        self.num_evictions += 1
        if self.on_evict is not None:
            self.on_evict(block_id, block_hash, tokens)

    def _forget(self, block_id: int) -> None:
        block_hash = self.block_hash[block_id]
        assert block_hash is not None
        del self.index[block_hash]
        self.block_hash[block_id] = None
        self.block_tokens[block_id] = None

    def check_integrity(self, block_tables: Iterable[list[int]]) -> None:
        """free + cached + held == total, counts match the tables, the index matches blocks."""
        held = [0] * self.num_blocks
        for table in block_tables:
            for block_id in table:
                held[block_id] += 1
        assert held == self.ref_counts, "ref counts differ from the block tables"
        assert set(self.queue) == {b for b in range(self.num_blocks) if held[b] == 0}, \
            "the free queue is not exactly the unreferenced blocks"
        for block_hash, block_id in self.index.items():
            assert self.block_hash[block_id] == block_hash, f"index entry of {block_id} is stale"
        assert len(self.index) == sum(h is not None for h in self.block_hash), "unindexed hash"
        assert self.num_cached == sum(self.block_hash[b] is not None for b in self.queue), \
            "the count of cached blocks drifted"

"""Fixed-size KV blocks: who holds which, and which are free."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class BlockPool:
    """Reference-counted block ids. A block is free exactly when its count is zero."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise MemoryError(f"asked for {n} KV blocks, {len(self.free_ids)} free")
        ids = [self.free_ids.popleft() for _ in range(n)]
        for block_id in ids:
            self.ref_counts[block_id] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return ids

    def release(self, block_ids: Iterable[int]) -> None:
        for block_id in block_ids:
            if self.ref_counts[block_id] <= 0:
                raise RuntimeError(f"block {block_id} released more often than it was held")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_ids.append(block_id)

    def check_integrity(self, block_tables: Iterable[list[int]]) -> None:
        """Every block is free or held; each count equals the number of tables holding it."""
        held = [0] * self.num_blocks
        for table in block_tables:
            for block_id in table:
                held[block_id] += 1
        assert held == self.ref_counts, "ref counts differ from the block tables"
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "a block is in the free queue twice"
        assert free == {b for b in range(self.num_blocks) if held[b] == 0}, "free set is wrong"

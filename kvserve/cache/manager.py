"""The scheduler's view of KV memory: blocks for a request's tokens, given and taken back."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from kvserve.cache.block_pool import BlockPool


class HoldsBlocks(Protocol):
    num_computed_tokens: int
    block_table: list[int]


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: HoldsBlocks, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` more K/V positions; False (and no change) if full.

        ``| computed (has blocks) | new (may need blocks) |``
        """
        needed = self.blocks_for(request.num_computed_tokens + num_new_tokens)
        missing = needed - len(request.block_table)
        if missing <= 0:
            return True
        if missing > self.pool.num_free:
            return False
        request.block_table.extend(self.pool.allocate(missing))
        return True

    def free(self, request: HoldsBlocks) -> None:
        # Tails first: when prefix caching keeps freed blocks, the deepest go first.
        self.pool.release(reversed(request.block_table))
        request.block_table = []

    def check_integrity(self, requests: Iterable[HoldsBlocks]) -> None:
        self.pool.check_integrity(r.block_table for r in requests)

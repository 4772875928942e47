"""What the cache manager reads of a request, and what a prefix lookup finds (manager.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol


class Params(Protocol):
    use_kv_cache: bool
    use_prefix_cache: bool
    cache_salt: str | None


class CachedRequest(Protocol):
    params: Params
    num_computed_tokens: int
    block_table: list[int]
    group_tables: list[list[int]]  # groups 1.. of a model with several KV cache groups
    block_hashes: list[bytes]
    num_committed_blocks: int
    num_output_tokens: int

    @property
    def num_tokens(self) -> int: ...
    def token_ids_slice(self, start: int, end: int) -> list[int]: ...


class HitBlock(NamedTuple):
    block_id: int | None  # a device block, or None: read from ``tier`` into a fresh block
    block_hash: bytes
    token_ids: tuple[int, ...]
    tier: str  # "device", "host" or "disk"


@dataclass
class CacheHit:
    """A found prefix: ``blocks[i]`` is block i of the request's chain."""

    block_size: int
    blocks: list[HitBlock] = field(default_factory=list)
    logits: Any = None  # exact repeat: the kept last-position logits of this very prompt
    loads: list[tuple[int, Any]] = field(default_factory=list)  # set by allocate_slots
    tables: list[list[int]] | None = None  # several groups: each group's hit blocks

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size

    def tokens_by_tier(self) -> dict[str, int]:
        by_tier: dict[str, int] = {}
        for block in self.blocks:
            by_tier[block.tier] = by_tier.get(block.tier, 0) + self.block_size
        return by_tier

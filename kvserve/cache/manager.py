"""The scheduler's view of KV memory, through four verbs: lookup, allocate, commit, free.

``lookup`` finds how much of a request's prefix is already cached (device pool, then host
and disk tiers), ``allocate_slots`` gives it blocks for that hit plus its new tokens,
``commit`` registers blocks that became full so later requests can reuse them, and ``free``
gives the blocks back (they stay cached until their memory is needed).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvserve.cache.block_pool import BlockPool
from kvserve.cache.hashing import hash_block, root_hash, salt_bytes
from kvserve.cache.stats import CacheStats
from kvserve.cache.tiers import DiskTier, Entry, HostTier


class Params(Protocol):
    use_kv_cache: bool
    use_prefix_cache: bool
    cache_salt: str | None


class CachedRequest(Protocol):
    params: Params
    num_computed_tokens: int
    block_table: list[int]
    block_hashes: list[bytes]
    num_committed_blocks: int
    num_cached_tokens: int
    cached_tokens_by_tier: dict[str, int]
    num_output_tokens: int

    @property
    def num_tokens(self) -> int: ...
    def token_ids_slice(self, start: int, end: int) -> list[int]: ...


@dataclass
class CacheHit:
    """A found prefix. ``found[i]`` is block i of the chain: (device block id, or None with a
    tier payload to load into a fresh block; hash; token ids; payload; tier name)."""

    num_tokens: int = 0
    found: list[tuple[int | None, bytes, tuple[int, ...], Any, str]] = field(
        default_factory=list)
    logits: Any = None  # exact repeat: the stored last-position logits of this very prompt

    def tokens_by_tier(self, block_size: int) -> dict[str, int]:
        by_tier: dict[str, int] = {}
        for *_, tier in self.found:
            by_tier[tier] = by_tier.get(tier, 0) + block_size
        return by_tier


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 fingerprint: str = "", block_bytes: int = 0, host: HostTier | None = None,
                 disk: DiskTier | None = None, num_exact_repeats: int = 64,
                 hash_fn=hash_block) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enabled = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.root = root_hash(fingerprint, block_size)
        self.block_bytes = block_bytes
        self.host, self.disk = host, disk
        self.hash_fn = hash_fn
        self.stats = CacheStats()
        self.exact: OrderedDict[bytes, Any] = OrderedDict()
        self.num_exact_repeats = num_exact_repeats
        # Copies for the runner to make before the next forward pass: evicted blocks out to a
        # tier first, then tier hits into their new blocks.
        self.saves: list[tuple[int, bytes, tuple[int, ...]]] = []
        self.loads: list[tuple[int, Any]] = []
        if host is not None or disk is not None:
            self.pool.on_evict = lambda b, h, t: self.saves.append((b, h, t))

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

    def caches(self, request: CachedRequest) -> bool:
        p = request.params
        return self.enabled and p.use_prefix_cache and p.use_kv_cache

    def lookup(self, request: CachedRequest) -> CacheHit:
        """The longest cached prefix of a request that has computed nothing yet.

        ``| hit: full blocks, at most num_tokens - 1 tokens | to compute (>= 1 token) |``

        The last token is always computed, since its logits give the next token; the
        deliberate exception is an exact repeat of a prompt whose last logits were kept.
        """
        hit = CacheHit()
        if not self.caches(request):
            return hit
        bs, n = self.block_size, request.num_tokens
        hashes = self._hashes(request, n // bs)
        for i, h in enumerate(hashes):
            tokens = tuple(request.token_ids_slice(i * bs, (i + 1) * bs))
            if (block_id := self.pool.lookup(h, tokens)) is not None:
                hit.found.append((block_id, h, tokens, None, "device"))
            elif found := self._tier_get(h, tokens):
                hit.found.append((None, h, tokens, *found))
            else:
                break
        logits = None
        if len(hit.found) == len(hashes) and request.num_output_tokens == 0:
            logits = self.exact.get(self._exact_key(request))
        if logits is None:
            del hit.found[(n - 1) // bs :]
        hit.logits = logits
        hit.num_tokens = len(hit.found) * bs
        return hit

    def num_cached_blocks(self, request: CachedRequest) -> int:
        """Leading blocks of the request already in the device pool (a cheap probe)."""
        if not self.caches(request):
            return 0
        bs, n = self.block_size, 0
        for i, h in enumerate(self._hashes(request, request.num_tokens // bs)):
            if self.pool.lookup(h, request.token_ids_slice(i * bs, (i + 1) * bs)) is None:
                break
            n += 1
        return n

    def _tier_get(self, h: bytes, tokens: tuple[int, ...]) -> tuple[Any, str] | None:
        for name, tier in (("host", self.host), ("disk", self.disk)):
            if tier is not None and (payload := tier.get(h, tokens)) is not None:
                return payload, name
        return None

    def allocate_slots(self, request: CachedRequest, num_new_tokens: int,
                       hit: CacheHit | None = None) -> bool:
        """Blocks for a hit plus ``num_new_tokens`` more; False (and no change) if full.

        ``| computed or hit (has blocks) | new (may need blocks) |``
        """
        if hit is not None and hit.found:
            return self._allocate_with_hit(request, num_new_tokens, hit)
        needed = self.blocks_for(request.num_computed_tokens + num_new_tokens)
        missing = needed - len(request.block_table)
        if missing > self.pool.num_free:
            return False
        if missing > 0:
            request.block_table.extend(self.pool.allocate(missing))
        if hit is not None:
            self._count(request, hit)
        return True

    def _allocate_with_hit(self, request: CachedRequest, num_new: int, hit: CacheHit) -> bool:
        device = [found[0] for found in hit.found if found[0] is not None]
        reclaimed = sum(1 for b in device if self.pool.ref_counts[b] == 0)
        num_alloc = self.blocks_for(hit.num_tokens + num_new) - len(device)
        if num_alloc + reclaimed > self.pool.num_free:
            return False
        self.pool.touch(device)
        fresh = iter(self.pool.allocate(num_alloc))
        table = []
        for block_id, h, tokens, payload, _ in hit.found:
            if block_id is None:
                block_id = next(fresh)
                self.pool.cache(block_id, h, tokens)
                self.loads.append((block_id, payload))
            table.append(block_id)
        request.block_table = table + list(fresh)
        request.num_computed_tokens = hit.num_tokens
        request.num_committed_blocks = len(hit.found)
        self._count(request, hit)
        return True

    def _count(self, request: CachedRequest, hit: CacheHit) -> None:
        if not self.caches(request):
            return
        s = self.stats
        s.num_queries += 1
        s.num_query_tokens += request.num_tokens
        by_tier = hit.tokens_by_tier(self.block_size)
        if hit.logits is not None:  # the whole prompt needed no forward pass for token one
            by_tier["exact_repeat"] = request.num_tokens
            s.num_exact_repeats += 1
        request.num_cached_tokens = hit.num_tokens
        request.cached_tokens_by_tier = by_tier
        if hit.num_tokens or hit.logits is not None:
            s.num_hits += 1
            s.num_hit_tokens += hit.num_tokens
        for tier, num in by_tier.items():
            s.hit_tokens_by_tier[tier] += num

    def commit(self, request: CachedRequest) -> None:
        """Register the request's blocks that became full, so later requests can hit them."""
        bs = self.block_size
        num_full = request.num_computed_tokens // bs
        if num_full <= request.num_committed_blocks or not self.caches(request):
            return  # most decode steps fill no block
        hashes = self._hashes(request, num_full)
        for i in range(request.num_committed_blocks, num_full):
            tokens = tuple(request.token_ids_slice(i * bs, (i + 1) * bs))
            self.pool.cache(request.block_table[i], hashes[i], tokens)
        request.num_committed_blocks = num_full

    def free(self, request: CachedRequest) -> None:
        # Tails first: the deepest block of a chain is evicted before its parents.
        self.pool.release(reversed(request.block_table))
        request.block_table = []
        request.num_committed_blocks = 0

    def remember_logits(self, request: CachedRequest, logits: Any) -> None:
        """Keep a prompt's last logits so an exact repeat skips its forward pass."""
        if not self.caches(request) or self.num_exact_repeats == 0:
            return
        key = self._exact_key(request)
        self.exact[key] = logits
        self.exact.move_to_end(key)
        while len(self.exact) > self.num_exact_repeats:
            self.exact.popitem(last=False)

    def store_evicted(self, block_hash: bytes, tokens: tuple[int, ...], payload: Any) -> None:
        """The runner hands back an evicted block's content for the host or disk tier."""
        entry = Entry(tokens, payload, self.block_bytes)
        if self.host is not None:
            self.host.put(block_hash, entry)
        elif self.disk is not None:
            self.disk.put(block_hash, entry)

    def take_transfers(self):
        saves, loads = self.saves, self.loads
        self.saves, self.loads = [], []
        return saves, loads

    def clear(self) -> int:
        """Drop every unreferenced cached block in every tier; returns how many."""
        self.exact.clear()
        dropped = self.pool.drop_cached()
        for tier in (self.host, self.disk):
            if tier is not None:
                dropped += tier.clear()
        return dropped

    def _hashes(self, request: CachedRequest, num_blocks: int) -> list[bytes]:
        """The request's block hashes, extended as far as ``num_blocks`` full blocks."""
        hashes, bs = request.block_hashes, self.block_size
        salt = salt_bytes(request.params.cache_salt)
        for i in range(len(hashes), num_blocks):
            parent = hashes[-1] if hashes else self.root
            tokens = request.token_ids_slice(i * bs, (i + 1) * bs)
            hashes.append(self.hash_fn(parent, tokens, salt if i == 0 else b""))
        return hashes[:num_blocks]

    def _exact_key(self, request: CachedRequest) -> bytes:
        bs, n = self.block_size, request.num_tokens
        hashes = self._hashes(request, n // bs)
        parent = hashes[-1] if hashes else self.root
        tail = request.token_ids_slice(len(hashes) * bs, n)
        return hash_block(parent, tail, b"exact:" + salt_bytes(request.params.cache_salt))

    def check_integrity(self, requests: Iterable[CachedRequest]) -> None:
        self.pool.check_integrity(r.block_table for r in requests)

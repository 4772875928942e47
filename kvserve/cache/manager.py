"""The scheduler's view of KV memory, through four verbs: lookup, allocate, commit, free.

``lookup`` finds how much of a request's prefix is already cached (device pool, then the
tiers below it), ``allocate_slots`` gives it blocks for that hit plus its new tokens and
plans the tier loads, ``commit`` registers blocks that became full (and loaded blocks once
their K/V are in place) so later requests can reuse them, and ``free`` gives the blocks back
(they stay cached until their memory is needed). It composes three parts that know nothing
of each other: the block pool with its prefix index, the tier store, and the exact-repeat
logits. Plain Python: no torch.

A model whose layers have sliding windows has one KV cache group per window (full attention
first): each group is its own block pool over its own layers' K/V, and a request holds one
block table per group, all indexed by the same positions and block hashes. A sliding group
releases the blocks its window no longer sees (window.py) to the cached side, where a later
prefix hit can still take them; a hit is the longest prefix for which every group has the
blocks its layers will read. The host/disk/remote tiers are for one full-attention group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from kvserve.cache.block_pool import BlockPool
from kvserve.cache.exact import ExactRepeatCache
from kvserve.cache.hashing import hash_block, root_hash, salt_bytes
from kvserve.cache.hit import CachedRequest, CacheHit, HitBlock
from kvserve.cache.stats import CacheStats
from kvserve.cache.tiers import TierStore
from kvserve.cache.window import first_seen_block, longest_hit, release_unseen

NULL_BLOCK = -1  # a table entry its group will not read again (kvserve.step.NULL_BLOCK)


class KVCacheManager:
    def __init__(self, num_blocks: int | Sequence[int], block_size: int,
                 enable_prefix_caching: bool = True, fingerprint: str = "",
                 block_bytes: int | Sequence[int] = 0, tiers: TierStore | None = None,
                 num_exact_repeats: int = 64, kv_format: str = "", hash_fn=hash_block,
                 windows: Sequence[int] = (0,)) -> None:
        """``num_blocks``, ``block_bytes``, ``windows``: one per KV cache group (an int for
        one group); a window of 0 is full attention."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enabled = enable_prefix_caching
        counts = [num_blocks] if isinstance(num_blocks, int) else list(num_blocks)
        sizes = [block_bytes] if isinstance(block_bytes, int) else list(block_bytes)
        self.windows = tuple(windows)
        if not len(counts) == len(sizes) == len(self.windows):
            raise ValueError("one block count, block size in bytes and window per KV group")
        self.pools = [BlockPool(n) for n in counts]
        self.pool = self.pools[0]
        self.group_block_bytes = sizes
        self.windowed = len(self.pools) > 1 or any(self.windows)
        self.root = root_hash(fingerprint, block_size, kv_format)
        self.block_bytes = sum(sizes)  # one block in every group
        self.tiers = tiers or TierStore()
        if self.windowed and self.tiers.enabled:
            raise ValueError("the KV tiers hold blocks of one full-attention group only")
        self.exact = ExactRepeatCache(num_exact_repeats)
        self.hash_fn = hash_fn
        self.stats = CacheStats()
        # Blocks for the runner to copy out before the next forward pass can overwrite them:
        # (block id, hash, token ids, evicted), evicted or new for the remote tier.
        self.saves: list[tuple[int, bytes, tuple[int, ...], bool]] = []
        if self.tiers.enabled:
            self.pool.on_evict = lambda b, h, t: self.saves.append((b, h, t, True))

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Share of the pool held by requests (of its bytes, over every group)."""
        if len(self.pools) == 1:
            return self.pool.num_used / self.pool.num_blocks
        return self.bytes_in_use / self.bytes_total

    @property
    def bytes_total(self) -> int:
        return sum(p.num_blocks * b for p, b in zip(self.pools, self.group_block_bytes)) or 1

    @property
    def bytes_in_use(self) -> int:
        return sum(p.num_used * b for p, b in zip(self.pools, self.group_block_bytes))

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
        Nothing is read from a tier here: a request that waits for blocks looks up again.
        """
        hit = CacheHit(self.block_size)
        if not self.caches(request):
            return hit
        bs, n = self.block_size, request.num_tokens
        hashes = self._hashes(request, n // bs)
        tokens = [tuple(request.token_ids_slice(i * bs, (i + 1) * bs)) for i in range(len(hashes))]
        if self.windowed:
            return self._lookup_groups(request, hit, hashes, tokens)
        in_tiers: list[str | None] = []
        for i, h in enumerate(hashes):
            if (block_id := self.pool.lookup(h, tokens[i])) is not None:
                hit.blocks.append(HitBlock(block_id, h, tokens[i], "device"))
                continue
            if not in_tiers and self.tiers.enabled:  # the rest of the chain, asked at once
                in_tiers = [None] * i + self.tiers.find_chain(hashes[i:], tokens[i:])
            if not in_tiers or in_tiers[i] is None:
                break
            hit.blocks.append(HitBlock(None, h, tokens[i], in_tiers[i]))
        if len(hit.blocks) == len(hashes) and request.num_output_tokens == 0:
            hit.logits = self.exact.get(self._exact_key(request))
        if hit.logits is None:
            del hit.blocks[(n - 1) // bs :]
        return hit

    def _lookup_groups(self, request: CachedRequest, hit: CacheHit, hashes: list[bytes],
                       tokens: list[tuple[int, ...]]) -> CacheHit:
        """The longest prefix every group can serve (window.longest_hit), device only.

        ``| not needed by a sliding group (NULL) | seen by its window | <- hit point``
        """
        bs, n = self.block_size, request.num_tokens
        found = [[pool.lookup(h, t) for h, t in zip(hashes, tokens)] for pool in self.pools]

        def take(limit: int) -> None:
            k = longest_hit([[b is not None for b in row[:limit]] for row in found],
                            self.windows, bs)
            hit.tables = [[row[i] if i >= first_seen_block(k * bs, w, bs) else NULL_BLOCK
                           for i in range(k)] for row, w in zip(found, self.windows)]
            hit.blocks = [HitBlock(hit.tables[0][i], hashes[i], tokens[i], "device")
                          for i in range(k)]

        take(len(hashes))
        if len(hit.blocks) == len(hashes) and request.num_output_tokens == 0:
            hit.logits = self.exact.get(self._exact_key(request))
        if hit.logits is None:
            take(min(len(hashes), (n - 1) // bs))
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

    def allocate_slots(self, request: CachedRequest, num_new_tokens: int,
                       hit: CacheHit | None = None) -> bool:
        """Blocks for a hit plus ``num_new_tokens`` more; False (and no change) if full.

        ``| computed or hit (has blocks) | new (may need blocks) |``
        """
        if self.windowed:
            return self._allocate_groups(request, num_new_tokens, hit)
        if hit is not None and hit.blocks:
            return self._allocate_with_hit(request, num_new_tokens, hit)
        missing = self.blocks_for(request.num_computed_tokens + num_new_tokens) - len(
            request.block_table)
        if missing > self.pool.num_free:
            return False
        if missing > 0:
            request.block_table.extend(self.pool.allocate(missing))
        if hit is not None:
            self._count(request, hit)
        return True

    def _allocate_with_hit(self, request: CachedRequest, num_new: int, hit: CacheHit) -> bool:
        if not self._fits(hit, num_new):
            return False
        payloads = self._read_tier_blocks(hit)  # only now that blocks are sure to be there
        if not self._fits(hit, num_new):  # the hit got shorter: it may need other blocks
            return False
        device = [b.block_id for b in hit.blocks if b.block_id is not None]
        self.pool.touch(device)
        fresh = iter(self.pool.allocate(self.blocks_for(hit.num_tokens + num_new) - len(device)))
        table = []
        for block in hit.blocks:
            block_id = block.block_id
            if block_id is None:  # indexed by commit() once the runner has copied it in
                block_id = next(fresh)
                hit.loads.append((block_id, payloads.pop(0)))
            table.append(block_id)
        request.block_table = table + list(fresh)
        request.num_computed_tokens = hit.num_tokens
        request.num_committed_blocks = next(  # the leading blocks that are indexed already
            (i for i, b in enumerate(hit.blocks) if b.block_id is None), len(hit.blocks))
        self._count(request, hit)
        return True

    def _allocate_groups(self, request: CachedRequest, num_new: int,
                         hit: CacheHit | None) -> bool:
        """allocate_slots with several groups: a hit's blocks (each group's own), or first
        the release of what the windows no longer see, then new blocks in every group."""
        with_hit = hit is not None and bool(hit.blocks)
        if with_hit:
            assert hit is not None and hit.tables is not None
            tables, start = hit.tables, hit.num_tokens
        else:
            self._release_unseen(request)
            tables, start = self._tables(request), request.num_computed_tokens
        num_needed = self.blocks_for(start + num_new)
        for table, pool in zip(tables, self.pools):
            reclaimed = sum(1 for b in table if b != NULL_BLOCK and pool.ref_counts[b] == 0)
            if max(0, num_needed - len(table)) + reclaimed * with_hit > pool.num_free:
                return False
        if with_hit:
            assert hit is not None and hit.tables is not None
            for table, pool in zip(hit.tables, self.pools):
                pool.touch(b for b in table if b != NULL_BLOCK)
            request.block_table = list(hit.tables[0])
            request.group_tables = [list(t) for t in hit.tables[1:]]
            request.num_computed_tokens = hit.num_tokens
            request.num_committed_blocks = len(hit.blocks)
        for table, pool in zip(self._tables(request), self.pools):
            table.extend(pool.allocate(max(0, num_needed - len(table))))
        if hit is not None:
            self._count(request, hit)
        return True

    def _tables(self, request: CachedRequest) -> list[list[int]]:
        """The request's block table of each group (the lists themselves)."""
        if len(self.pools) == 1:
            return [request.block_table]
        if len(request.group_tables) != len(self.pools) - 1:
            request.group_tables = [[] for _ in self.pools[1:]]
        return [request.block_table, *request.group_tables]

    def _release_unseen(self, request: CachedRequest) -> None:
        """Release the blocks no sliding window of the request sees now (window.py)."""
        for table, pool, window in zip(self._tables(request), self.pools, self.windows):
            pool.release(release_unseen(table, request.num_computed_tokens, window,
                                        self.block_size, NULL_BLOCK))

    def bytes_held(self, request: CachedRequest, num_tokens: int) -> int:
        """Bytes of K/V the request's blocks hold for its first ``num_tokens`` positions: a
        sliding group's from its first block still held (the rest were released)."""
        bs, total = self.block_size, 0
        for table, block_bytes in zip(self._tables(request), self.group_block_bytes):
            first = next((i for i, b in enumerate(table) if b != NULL_BLOCK), len(table))
            total += max(0, num_tokens - first * bs) * block_bytes // bs
        return total

    def _fits(self, hit: CacheHit, num_new: int) -> bool:
        device = [b.block_id for b in hit.blocks if b.block_id is not None]
        reclaimed = sum(1 for b in device if self.pool.ref_counts[b] == 0)
        num_alloc = self.blocks_for(hit.num_tokens + num_new) - len(device)
        return num_alloc + reclaimed <= self.pool.num_free

    def _read_tier_blocks(self, hit: CacheHit) -> list[Any]:
        """Payloads of the hit's tier blocks; the hit ends before the first unreadable one."""
        wanted = [i for i, b in enumerate(hit.blocks) if b.block_id is None]
        got = self.tiers.read_many([hit.blocks[i][1:] for i in wanted])  # (hash, tokens, tier)
        payloads = []
        for i, payload in zip(wanted, got):
            if payload is None:
                del hit.blocks[i:]
                break
            payloads.append(payload)
        return payloads

    def _count(self, request: CachedRequest, hit: CacheHit) -> None:
        if not self.caches(request):
            return
        s = self.stats
        s.num_queries += 1
        s.num_query_tokens += request.num_tokens
        if hit.logits is not None:
            s.num_exact_repeats += 1
        if hit.num_tokens or hit.logits is not None:
            s.num_hits += 1
            s.num_hit_tokens += hit.num_tokens
        for tier, num in self.tokens_by_tier(request, hit).items():
            s.hit_tokens_by_tier[tier] += num

    def tokens_by_tier(self, request: CachedRequest, hit: CacheHit) -> dict[str, int]:
        """Where a request's cached tokens came from; an exact repeat covers the whole prompt."""
        by_tier = hit.tokens_by_tier()
        if hit.logits is not None:
            by_tier["exact_repeat"] = request.num_tokens
        return by_tier

    def drop_blocks(self, request: CachedRequest, first: int, lost_tiers: Iterable[str]) -> None:
        """A tier load failed: release blocks ``first`` onward, unindexed, to be computed again.

        ``| kept blocks (K/V in place) | first ... (released; recomputed later) |``
        """
        self.pool.release(reversed(request.block_table[first:]))
        del request.block_table[first:]
        request.num_computed_tokens = min(request.num_computed_tokens, first * self.block_size)
        request.num_committed_blocks = min(request.num_committed_blocks, first)
        for tier in lost_tiers:
            self.stats.hit_tokens_by_tier[tier] -= self.block_size
            self.stats.num_hit_tokens -= self.block_size

    def commit(self, request: CachedRequest) -> None:
        """Register the request's blocks that became full, so later requests can hit them."""
        bs = self.block_size
        num_full = request.num_computed_tokens // bs
        if num_full > request.num_committed_blocks and self.caches(request):
            hashes = self._hashes(request, num_full)  # most decode steps fill no block
            for i in range(request.num_committed_blocks, num_full):
                tokens = tuple(request.token_ids_slice(i * bs, (i + 1) * bs))
                block_id = request.block_table[i]
                for table, pool in zip(self._tables(request), self.pools):
                    pool.cache(table[i], hashes[i], tokens)
                if self.tiers.wants_write_through(hashes[i]):  # copied out before it changes
                    self.saves.append((block_id, hashes[i], tokens, False))
            request.num_committed_blocks = num_full
        if self.windowed:  # now cached, the blocks out of every window can go
            self._release_unseen(request)

    def free(self, request: CachedRequest) -> None:
        # Tails first: the deepest block of a chain is evicted before its parents.
        for table, pool in zip(self._tables(request), self.pools):
            pool.release(b for b in reversed(table) if b != NULL_BLOCK)
        request.block_table = []
        if len(self.pools) > 1:
            request.group_tables = []
        request.num_committed_blocks = 0

    def remember_logits(self, request: CachedRequest, logits: Any) -> None:
        """Keep a prompt's last logits so an exact repeat skips its forward pass."""
        if self.caches(request):
            self.exact.put(self._exact_key(request), logits)

    def wants_logits(self, request: CachedRequest) -> bool:
        return self.caches(request) and self.exact.capacity > 0

    def store_block(self, block_hash: bytes, tokens: tuple[int, ...], payload: Any,
                    evicted: bool = True) -> None:
        """The runner hands back a saved block's content: evicted, or new for the remote."""
        if evicted:
            self.tiers.store(block_hash, tokens, payload)
        else:
            self.tiers.write_through(block_hash, tokens, payload)

    def take_saves(self) -> list[tuple[int, bytes, tuple[int, ...], bool]]:
        saves, self.saves = self.saves, []
        return saves

    def clear(self) -> int:
        """Drop every unreferenced cached block in every tier; returns how many."""
        self.exact.clear()
        return sum(pool.drop_cached() for pool in self.pools) + self.tiers.clear()

    def close(self) -> None:
        self.tiers.close()

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
        requests = list(requests)
        for g, pool in enumerate(self.pools):
            pool.check_integrity([b for b in self._tables(r)[g] if b != NULL_BLOCK]
                                 for r in requests)

"""Prefix-cache figures: what was asked, what was found, and what each tier holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvserve.cache.block_pool import BlockPool
    from kvserve.cache.manager import KVCacheManager

TIERS = ("device", "host", "disk", "remote", "exact_repeat")


@dataclass
class CacheStats:
    num_queries: int = 0  # requests looked up
    num_hits: int = 0  # requests with at least one cached token
    num_query_tokens: int = 0
    num_hit_tokens: int = 0
    hit_tokens_by_tier: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    num_exact_repeats: int = 0


def cache_report(kv: KVCacheManager) -> dict:
    """Aggregate prefix-cache figures, and blocks and bytes per tier."""
    s, pool = kv.stats, kv.pool
    groups = [_pool_report(p, b) | {"window": w}
              for p, b, w in zip(kv.pools, kv.group_block_bytes, kv.windows)]
    device = _pool_report(pool, kv.group_block_bytes[0])  # blocks: of the first group
    device["bytes"] = sum(g["bytes"] for g in groups)  # bytes: of every group
    device["bytes_used"] = sum(g["bytes_used"] for g in groups)
    if len(groups) > 1:  # a model with sliding windows: one entry per KV cache group
        device["groups"] = groups
    tiers: dict[str, dict] = {"device": device}
    tiers.update(kv.tiers.report())
    return {
        "enabled": kv.enabled,
        "num_queries": s.num_queries, "num_hits": s.num_hits,
        "hit_rate": s.num_hits / s.num_queries if s.num_queries else 0.0,
        "num_query_tokens": s.num_query_tokens, "num_hit_tokens": s.num_hit_tokens,
        "token_hit_rate": s.num_hit_tokens / s.num_query_tokens if s.num_query_tokens else 0.0,
        "tokens_saved": s.num_hit_tokens,
        "hit_tokens_by_tier": dict(s.hit_tokens_by_tier),
        "num_exact_repeats": s.num_exact_repeats,
        "num_evictions": sum(p.num_evictions for p in kv.pools),
        "tiers": tiers,
    }


def _pool_report(pool: BlockPool, block_bytes: int) -> dict:
    num_cached = pool.num_cached
    return {"blocks_total": pool.num_blocks, "blocks_used": pool.num_used,
            "blocks_cached": num_cached, "blocks_free": pool.num_free - num_cached,
            "bytes": pool.num_blocks * block_bytes,
            "bytes_used": (pool.num_used + num_cached) * block_bytes}

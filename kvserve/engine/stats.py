"""A snapshot of the engine's figures, for the server's routes and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

from kvserve.engine.scheduler import SchedulerStats


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int  # free or cached: can be handed out now
    num_used_blocks: int  # held by requests
    num_cached_blocks: int  # unreferenced, holding a known prefix
    peak_used_blocks: int
    block_size: int
    block_bytes: int
    kv_bytes_per_token: int
    scheduler: SchedulerStats
    # Bytes of K/V over every KV cache group (sliding-window models have several; the block
    # counts above are of the first group).
    kv_bytes_total: int = 0
    kv_bytes_used: int = 0  # held by requests
    kv_bytes_peak: int = 0  # the most held at once, each group at its own peak

    @property
    def kv_usage(self) -> float:
        if self.kv_bytes_total:
            return self.kv_bytes_used / self.kv_bytes_total
        return self.num_used_blocks / self.num_blocks

    @property
    def num_pool_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def as_dict(self) -> dict:
        return {
            **vars(self.scheduler),
            "num_running": self.num_running, "num_waiting": self.num_waiting,
            "kv_blocks_total": self.num_blocks, "kv_blocks_free": self.num_free_blocks,
            "kv_blocks_used": self.num_used_blocks, "kv_blocks_cached": self.num_cached_blocks,
            "kv_blocks_peak": self.peak_used_blocks, "block_size": self.block_size,
            "kv_block_bytes": self.block_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_usage": self.kv_usage, "kv_bytes_total": self.kv_bytes_total,
            "kv_bytes_used": self.kv_bytes_used, "kv_bytes_peak": self.kv_bytes_peak,
        }

"""The tiers below the device pool: host memory (LRU by bytes), then disk.

A block evicted from the device pool is offered to the host tier; what the host tier evicts
goes to disk (or straight to disk when there is no host tier). Payloads are opaque here: the
runner copies them out of and into the pool, the disk tier turns them into bytes.

``TierStore`` is what the cache manager talks to: ``find`` answers whether a tier has a
block (cheap, no read), ``read`` fetches and verifies its payload once blocks are allocated
for it, ``store`` takes an evicted block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvserve.cache.disk_tier import DiskTier


@dataclass
class Entry:
    tokens: tuple[int, ...]
    payload: Any
    num_bytes: int


class HostTier:
    def __init__(self, capacity_bytes: int,
                 spill: Callable[[bytes, tuple[int, ...], Any], None] | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.num_bytes = 0
        self.spill = spill  # where evicted entries go (the disk tier), if anywhere

    def contains(self, block_hash: bytes, tokens: tuple[int, ...]) -> bool:
        entry = self.entries.get(block_hash)
        return entry is not None and entry.tokens == tokens

    def get(self, block_hash: bytes, tokens: tuple[int, ...]) -> Any | None:
        if not self.contains(block_hash, tokens):
            return None
        self.entries.move_to_end(block_hash)
        return self.entries[block_hash].payload

    def put(self, block_hash: bytes, entry: Entry) -> None:
        if entry.num_bytes > self.capacity_bytes or block_hash in self.entries:
            return
        while self.num_bytes + entry.num_bytes > self.capacity_bytes:
            old_hash, old = self.entries.popitem(last=False)
            self.num_bytes -= old.num_bytes
            if self.spill is not None:
                self.spill(old_hash, old.tokens, old.payload)
        self.entries[block_hash] = entry
        self.num_bytes += entry.num_bytes

    def clear(self) -> int:
        n = len(self.entries)
        self.entries.clear()
        self.num_bytes = 0
        return n


class TierStore:
    """Host then disk, searched in that order."""

    def __init__(self, host: HostTier | None = None, disk: DiskTier | None = None,
                 block_bytes: int = 0) -> None:
        self.host, self.disk = host, disk
        self.block_bytes = block_bytes
        if host is not None and disk is not None:
            host.spill = disk.put

    @property
    def enabled(self) -> bool:
        return self.host is not None or self.disk is not None

    def find(self, block_hash: bytes, tokens: tuple[int, ...]) -> str | None:
        """The first tier that has this block, without reading it."""
        if self.host is not None and self.host.contains(block_hash, tokens):
            return "host"
        if self.disk is not None and self.disk.contains(block_hash):
            return "disk"
        return None

    def read(self, block_hash: bytes, tokens: tuple[int, ...], tier: str) -> Any | None:
        """The verified payload, or None (unreadable, foreign or gone: a miss)."""
        source = self.host if tier == "host" else self.disk
        return None if source is None else source.get(block_hash, tokens)

    def store(self, block_hash: bytes, tokens: tuple[int, ...], payload: Any) -> None:
        if self.host is not None:
            self.host.put(block_hash, Entry(tokens, payload, self.block_bytes))
        elif self.disk is not None:
            self.disk.put(block_hash, tokens, payload)

    def clear(self) -> int:
        return sum(t.clear() for t in (self.host, self.disk) if t is not None)

    def close(self) -> None:
        """Flush the disk tier's queued writes and stop its writer."""
        if self.disk is not None:
            self.disk.close()

    def report(self) -> dict[str, dict]:
        tiers: dict[str, dict] = {}
        if self.host is not None:
            tiers["host"] = {"blocks_cached": len(self.host.entries),
                             "bytes": self.host.capacity_bytes, "bytes_used": self.host.num_bytes}
        if self.disk is not None:
            d = self.disk
            tiers["disk"] = {"blocks_cached": len(d.files), "bytes": d.capacity_bytes,
                             "bytes_used": d.num_bytes, "enabled": d.enabled,
                             "records_skipped": d.num_skipped}
        return tiers

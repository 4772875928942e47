"""The tiers below the device pool: host memory (LRU by bytes), disk, and a remote store.

A block evicted from the device pool is offered to the host tier; what the host tier evicts
goes to disk (or straight to disk when there is no host tier). The remote tier (Redis or
Valkey, shared by replicas) gets every full block as it is committed, and evicted blocks it
does not have yet. Payloads are opaque here: the runner copies them out of and into the
pool, the disk and remote tiers turn them into bytes.

``TierStore`` is what the cache manager talks to: ``find_chain`` answers which tier has each
block of a chain (no payload read; one round trip to the remote store), ``read_many``
fetches and verifies the payloads once blocks are allocated for them, ``store`` takes an
evicted block and ``write_through`` a newly committed one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvserve.cache.disk_tier import DiskTier
from kvserve.cache.remote_tier import RemoteTier


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
    """Host, then disk, then remote, searched in that order."""

    def __init__(self, host: HostTier | None = None, disk: DiskTier | None = None,
                 block_bytes: int = 0, remote: RemoteTier | None = None) -> None:
        self.host, self.disk, self.remote = host, disk, remote
        self.block_bytes = block_bytes
        if host is not None and disk is not None:
            host.spill = disk.put

    @property
    def enabled(self) -> bool:
        return any(t is not None for t in (self.host, self.disk, self.remote))

    def find_chain(self, hashes: list[bytes], tokens: list[tuple[int, ...]]) -> list[str | None]:
        """The first tier that has each block, without reading any."""
        found: list[str | None] = []
        for h, t in zip(hashes, tokens):
            if self.host is not None and self.host.contains(h, t):
                found.append("host")
            elif self.disk is not None and self.disk.contains(h):
                found.append("disk")
            else:
                found.append(None)
        if self.remote is not None:
            ask = [i for i, tier in enumerate(found) if tier is None]
            for i, ok in zip(ask, self.remote.contains_many([hashes[i] for i in ask])):
                found[i] = "remote" if ok else None
        return found

    def read_many(self, blocks: list[tuple[bytes, tuple[int, ...], str]]) -> list[Any | None]:
        """The verified payload of each block, or None (unreadable, foreign or gone)."""
        payloads: list[Any | None] = [None] * len(blocks)
        remote = []
        for i, (h, tokens, tier) in enumerate(blocks):
            if tier == "remote":
                remote.append(i)
            else:
                source = self.host if tier == "host" else self.disk
                payloads[i] = None if source is None else source.get(h, tokens)
        if remote and self.remote is not None:
            got = self.remote.get_many([blocks[i][:2] for i in remote])
            for i, payload in zip(remote, got):
                payloads[i] = payload
        return payloads

    def wants_write_through(self, block_hash: bytes) -> bool:
        return self.remote is not None and self.remote.wants(block_hash)

    def write_through(self, block_hash: bytes, tokens: tuple[int, ...], payload: Any) -> None:
        if self.remote is not None:
            self.remote.put(block_hash, tokens, payload)

    def store(self, block_hash: bytes, tokens: tuple[int, ...], payload: Any) -> None:
        if self.host is not None:
            self.host.put(block_hash, Entry(tokens, payload, self.block_bytes))
        elif self.disk is not None:
            self.disk.put(block_hash, tokens, payload)
        self.write_through(block_hash, tokens, payload)

    def clear(self) -> int:
        """Drop what the host and disk tiers hold (the remote store is shared: left alone)."""
        return sum(t.clear() for t in (self.host, self.disk) if t is not None)

    def close(self) -> None:
        """Send the disk and remote tiers' queued writes and stop their writers."""
        for tier in (self.disk, self.remote):
            if tier is not None:
                tier.close()

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
        if self.remote is not None:
            tiers["remote"] = self.remote.report()
        return tiers

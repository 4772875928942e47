"""Where evicted blocks go: a host-memory tier (LRU by bytes) and a disk tier.

A block evicted from the device pool is offered to the host tier; what the host tier
evicts goes to disk (or straight to disk when there is no host tier). Payloads are opaque
here (the runner copies tensors in and out); the disk tier turns them into bytes with the
``encode``/``decode`` pair it is given.

Disk files are named by block hash, live in a folder named by the model fingerprint, and
carry a header (magic, fingerprint, hash, token ids) and a checksum: a corrupt, truncated
or foreign file is detected, deleted and treated as a miss. Writes happen behind, on a
thread; an error (a full disk) disables the tier with a warning, it never fails a request.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("kvserve.cache")
MAGIC = b"KVSVBLK1"
_HEAD = struct.Struct("<8s16s16sI")  # magic, fingerprint, block hash, number of tokens


@dataclass
class Entry:
    tokens: tuple[int, ...]
    payload: Any
    num_bytes: int


class HostTier:
    def __init__(self, capacity_bytes: int, spill: Callable[[bytes, Entry], None] | None = None):
        self.capacity_bytes = capacity_bytes
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.num_bytes = 0
        self.spill = spill  # where evicted entries go (the disk tier), if anywhere

    def get(self, block_hash: bytes, tokens: tuple[int, ...]) -> Any | None:
        entry = self.entries.get(block_hash)
        if entry is None or entry.tokens != tokens:
            return None
        self.entries.move_to_end(block_hash)
        return entry.payload

    def put(self, block_hash: bytes, entry: Entry) -> None:
        if entry.num_bytes > self.capacity_bytes or block_hash in self.entries:
            return
        while self.num_bytes + entry.num_bytes > self.capacity_bytes:
            old_hash, old = self.entries.popitem(last=False)
            self.num_bytes -= old.num_bytes
            if self.spill is not None:
                self.spill(old_hash, old)
        self.entries[block_hash] = entry
        self.num_bytes += entry.num_bytes

    def clear(self) -> int:
        n = len(self.entries)
        self.entries.clear()
        self.num_bytes = 0
        return n


class DiskTier:
    def __init__(self, folder: str | Path, capacity_bytes: int, fingerprint: str,
                 encode: Callable[[Any], bytes], decode: Callable[[bytes], Any]) -> None:
        self.folder = Path(folder) / fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.fingerprint = fingerprint.encode()[:16].ljust(16, b"\0")
        self.encode, self.decode = encode, decode
        self.enabled = True
        self.lock = threading.Lock()
        self.files: OrderedDict[bytes, int] = OrderedDict()  # hash -> file size, oldest first
        for path in sorted(self.folder.glob("*.kvb"), key=lambda p: p.stat().st_mtime):
            try:
                self.files[bytes.fromhex(path.stem)] = path.stat().st_size
            except ValueError:
                continue
        self.pending: dict[bytes, Entry] = {}
        self.queue: queue.Queue[bytes | None] = queue.Queue()
        self.writer = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self.writer.start()

    @property
    def num_bytes(self) -> int:
        with self.lock:
            return sum(self.files.values())

    def path(self, block_hash: bytes) -> Path:
        return self.folder / f"{block_hash.hex()}.kvb"

    def put(self, block_hash: bytes, entry: Entry) -> None:
        """Queue a block to be written behind; returns at once."""
        with self.lock:
            if not self.enabled or block_hash in self.files or block_hash in self.pending:
                return
            self.pending[block_hash] = entry
        self.queue.put(block_hash)

    def get(self, block_hash: bytes, tokens: tuple[int, ...]) -> Any | None:
        with self.lock:
            entry = self.pending.get(block_hash)
            known = block_hash in self.files
        if entry is not None:
            return entry.payload if entry.tokens == tokens else None
        if not known:
            return None
        data = self._read(block_hash)
        if data is None:
            self._remove(block_hash)
            return None
        file_tokens, payload = data
        return payload if file_tokens == tokens else None

    def _read(self, block_hash: bytes) -> tuple[tuple[int, ...], Any] | None:
        try:
            raw = self.path(block_hash).read_bytes()
            magic, fingerprint, file_hash, n = _HEAD.unpack_from(raw)
            body = raw[_HEAD.size : len(raw) - 16]
            if (magic != MAGIC or fingerprint != self.fingerprint or file_hash != block_hash
                    or hashlib.blake2b(raw[:-16], digest_size=16).digest() != raw[-16:]):
                raise ValueError("bad header or checksum")
            tokens = struct.unpack_from(f"<{n}I", body)
            return tokens, self.decode(body[4 * n :])
        except (OSError, ValueError, struct.error) as e:
            log.warning("kv disk tier: dropping unreadable block file %s (%s)",
                        self.path(block_hash).name, e)
            return None

    def _write_loop(self) -> None:
        while (block_hash := self.queue.get()) is not None:
            with self.lock:
                entry = self.pending.get(block_hash)
            if entry is None:
                continue
            try:
                self._write(block_hash, entry)
            except Exception as e:  # a full disk, a permission, a bad payload: never the step
                log.warning("kv disk tier disabled: cannot write %s (%s)", self.folder, e)
                with self.lock:
                    self.enabled = False
            finally:
                with self.lock:
                    self.pending.pop(block_hash, None)

    def _write(self, block_hash: bytes, entry: Entry) -> None:
        n = len(entry.tokens)
        data = (_HEAD.pack(MAGIC, self.fingerprint, block_hash, n)
                + struct.pack(f"<{n}I", *entry.tokens) + self.encode(entry.payload))
        data += hashlib.blake2b(data, digest_size=16).digest()
        tmp = self.path(block_hash).with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(self.path(block_hash))  # atomic: a reader never sees half a file
        with self.lock:
            self.files[block_hash] = len(data)
            total = sum(self.files.values())
            while total > self.capacity_bytes and self.files:
                old, size = self.files.popitem(last=False)
                self.path(old).unlink(missing_ok=True)
                total -= size

    def _remove(self, block_hash: bytes) -> None:
        with self.lock:
            self.files.pop(block_hash, None)
        self.path(block_hash).unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait until every queued write is on disk (tests, shutdown)."""
        while True:
            with self.lock:
                if not self.pending:
                    return
            time.sleep(0.005)

    def clear(self) -> int:
        with self.lock:
            hashes = list(self.files)
            self.files.clear()
        for h in hashes:
            self.path(h).unlink(missing_ok=True)
        return len(hashes)

    def close(self) -> None:
        self.flush()
        self.queue.put(None)

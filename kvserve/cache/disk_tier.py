"""The disk tier: one self-checking file per evicted block, written behind, kept across runs.

Each file is one self-checking record (record.py): a corrupt, truncated or foreign file is
deleted and treated as a miss; a record of another KV format is skipped (never loaded, never
reinterpreted) and left for the engine that wrote it.

Files are named by block hash in a folder named by the model fingerprint. The folder may be
shared or tidied by others: a dangling link, an orphan temporary file or a file that vanished
is a miss, never an error. Writes happen on a thread; a write error (a full disk) disables
the tier with a warning and never fails a request.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvserve.cache import record

log = logging.getLogger("kvserve.cache")


class DiskTier:
    def __init__(self, folder: str | Path, capacity_bytes: int, fingerprint: str,
                 encode: Callable[[Any], bytes], decode: Callable[[bytes], Any],
                 kv_format: str = "", payload_bytes: int | None = None) -> None:
        """``kv_format``: dtype and layout of a payload; ``payload_bytes``: its exact size
        (None: any size, for payloads that are not K/V blocks)."""
        self.folder = Path(folder) / fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self.fingerprint = record.fingerprint_bytes(fingerprint)
        self.kv_format = kv_format.encode()
        self.payload_bytes = payload_bytes
        self.encode, self.decode = encode, decode
        self.enabled = True
        self.lock = threading.Lock()
        self.files: OrderedDict[bytes, int] = self._index()  # hash -> size, oldest first
        self.pending: dict[bytes, tuple[tuple[int, ...], Any]] = {}
        self.num_skipped = 0  # records of another KV format met on lookup
        self.queue: queue.Queue[bytes | None] = queue.Queue()
        self.writer = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self.writer.start()

    def _index(self) -> OrderedDict[bytes, int]:
        found = []
        for path in self.folder.glob("*.kvb"):
            try:
                block_hash = bytes.fromhex(path.stem)
                stat = path.stat()  # a dangling link or a file just removed raises here
            except (ValueError, OSError):
                continue
            found.append((stat.st_mtime, block_hash, stat.st_size))
        return OrderedDict((h, size) for _, h, size in sorted(found))

    @property
    def num_bytes(self) -> int:
        with self.lock:
            return sum(self.files.values())

    def path(self, block_hash: bytes) -> Path:
        return self.folder / f"{block_hash.hex()}.kvb"

    def contains(self, block_hash: bytes) -> bool:
        """Whether a record may be there (cheap: no read; ``get`` verifies it)."""
        with self.lock:
            return block_hash in self.files or block_hash in self.pending

    def put(self, block_hash: bytes, tokens: tuple[int, ...], payload: Any) -> None:
        """Queue a block to be written behind; returns at once."""
        with self.lock:
            if not self.enabled or block_hash in self.files or block_hash in self.pending:
                return
            self.pending[block_hash] = (tokens, payload)
        self.queue.put(block_hash)

    def get(self, block_hash: bytes, tokens: tuple[int, ...]) -> Any | None:
        with self.lock:
            entry = self.pending.get(block_hash)
            known = block_hash in self.files
        if entry is not None:
            return entry[1] if entry[0] == tokens else None
        if not known:
            return None
        record = self._read(block_hash)
        if record is None:
            return None
        file_tokens, payload = record
        return payload if file_tokens == tokens else None

    def _read(self, block_hash: bytes) -> tuple[tuple[int, ...], Any] | None:
        path = self.path(block_hash)
        try:
            tokens, body = record.unpack(path.read_bytes(), self.fingerprint, block_hash,
                                         self.kv_format, self.payload_bytes)
            return tokens, self.decode(body)
        except record.ForeignFormat:
            self.num_skipped += 1
            self._forget(block_hash)  # another engine's format: leave its file alone
        except FileNotFoundError:  # removed by another process sharing the folder
            self._forget(block_hash)
        except (OSError, ValueError) as e:
            log.warning("kv disk tier: dropping unreadable block file %s (%s)", path.name, e)
            self._forget(block_hash)
            path.unlink(missing_ok=True)
        return None

    def _forget(self, block_hash: bytes) -> None:
        with self.lock:
            self.files.pop(block_hash, None)

    def _write_loop(self) -> None:
        while (block_hash := self.queue.get()) is not None:
            with self.lock:
                entry = self.pending.get(block_hash)
            if entry is None:
                continue
            try:
                self._write(block_hash, *entry)
            except Exception as e:  # a full disk, a permission, a bad payload: never the step
                log.warning("kv disk tier disabled: cannot write %s (%s)", self.folder, e)
                with self.lock:
                    self.enabled = False
            finally:
                with self.lock:
                    self.pending.pop(block_hash, None)

    def _write(self, block_hash: bytes, tokens: tuple[int, ...], payload: Any) -> None:
        data = record.pack(self.fingerprint, block_hash, self.kv_format, tokens,
                           self.encode(payload))
        path = self.path(block_hash)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per writer process
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: a reader never sees half a file
        with self.lock:
            self.files[block_hash] = len(data)
            total = sum(self.files.values())
            while total > self.capacity_bytes and self.files:
                old, size = self.files.popitem(last=False)
                self.path(old).unlink(missing_ok=True)
                total -= size

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
        """Write what is queued, then take no more writes (reads still work)."""
        self.flush()
        with self.lock:
            self.enabled = False
        self.queue.put(None)
        self.writer.join(timeout=5)

"""The remote tier: blocks in Redis or Valkey, shared by every replica that uses the store.

Keys are ``kvserve:<block hash>``; the hash already covers the model fingerprint, block
size, KV format and salt, so replicas of one model share blocks and nothing else does.
Values are the self-checking records of record.py, verified before use; a bad or foreign
value is ignored and counted. A lookup asks about a whole chain in one round trip
(pipelined EXISTS) and a hit reads only the blocks it will use, in one MGET. Full blocks are
written through when they are committed, by a thread (pipelined ``SET NX``, so a block
already there is never rewritten; optional TTL). Eviction is the store's: run it with
``maxmemory`` and ``maxmemory-policy allkeys-lru``.

The store going away (down, slow, full, a wrong password) never fails or stalls a request:
the tier is marked down with one warning, every call is a miss, and it tries again after a
backoff (1 s, doubling up to 30 s).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from kvserve.cache import record

log = logging.getLogger("kvserve.cache")
SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
MAX_KNOWN = 1 << 16  # hashes remembered as present in the store


def make_client(url: str, timeout: float) -> Any:
    import redis  # the maintained client; only needed when a remote tier is configured

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"kv_remote must look like redis://HOST:PORT[/DB] (also rediss://, "
                         f"valkey://); got {url!r}")
    return redis.Redis.from_url(f"{SCHEMES[scheme]}://{rest}", socket_timeout=timeout,
                                socket_connect_timeout=timeout)


class RemoteTier:
    def __init__(self, url: str, fingerprint: str, encode: Callable[[Any], bytes],
                 decode: Callable[[bytes], Any], kv_format: str = "",
                 payload_bytes: int | None = None, ttl: int | None = None,
                 timeout: float = 0.25, client: Any = None) -> None:
        self.url = url
        self.client = client if client is not None else make_client(url, timeout)
        self.fingerprint = record.fingerprint_bytes(fingerprint)
        self.kv_format = kv_format.encode()
        self.payload_bytes = payload_bytes
        self.encode, self.decode = encode, decode
        self.ttl = ttl
        self.known: OrderedDict[bytes, None] = OrderedDict()
        self.is_up = True
        self._retry_at = 0.0
        self._backoff = 1.0
        self.lock = threading.Lock()
        self.stats = {"blocks_read": 0, "bytes_read": 0, "blocks_written": 0,
                      "bytes_written": 0, "bad_records": 0, "foreign_records": 0,
                      "load_seconds": 0.0, "errors": 0}
        self.queue: queue.Queue[tuple[bytes, tuple[int, ...], Any] | None] = queue.Queue()
        self.pending = 0
        self.writer = threading.Thread(target=self._write_loop, name="kv-remote-writer",
                                       daemon=True)
        self.writer.start()

    @staticmethod
    def key(block_hash: bytes) -> bytes:
        return b"kvserve:" + block_hash.hex().encode()

    def contains_many(self, hashes: Sequence[bytes]) -> list[bool]:
        """Which of these blocks the store has, in one round trip (all False when down)."""
        def ask() -> list[bool]:
            pipe = self.client.pipeline(transaction=False)
            for h in hashes:
                pipe.exists(self.key(h))
            return [bool(n) for n in pipe.execute()]

        found = self._call(ask) if hashes else None
        if found is None:
            return [False] * len(hashes)
        self._remember(h for h, ok in zip(hashes, found) if ok)
        return found

    def get_many(self, blocks: Sequence[tuple[bytes, tuple[int, ...]]]) -> list[Any | None]:
        """Verified payloads of these blocks, in one round trip; None for each one missing,
        bad, foreign or not matching its token ids."""
        start = time.perf_counter()
        values = self._call(lambda: self.client.mget([self.key(h) for h, _ in blocks]))
        if values is None:
            return [None] * len(blocks)
        payloads = [self._verify(h, tokens, raw) for (h, tokens), raw in zip(blocks, values)]
        with self.lock:
            self.stats["load_seconds"] += time.perf_counter() - start
        return payloads

    def _verify(self, block_hash: bytes, tokens: tuple[int, ...], raw: bytes | None) -> Any:
        if raw is None:
            return None
        try:
            found, body = record.unpack(raw, self.fingerprint, block_hash, self.kv_format,
                                        self.payload_bytes)
        except record.ForeignFormat:
            self._count("foreign_records")
            return None
        except record.BadRecord:
            self._count("bad_records")
            return None
        if found != tokens:
            return None
        with self.lock:
            self.stats["blocks_read"] += 1
            self.stats["bytes_read"] += len(raw)
        return self.decode(body)

    def wants(self, block_hash: bytes) -> bool:
        """Whether writing this block through is worth a copy: not known to be there."""
        return self.is_up and block_hash not in self.known

    def put(self, block_hash: bytes, tokens: tuple[int, ...], payload: Any) -> None:
        """Queue a block to be written behind; returns at once."""
        if not self.wants(block_hash):
            return
        self._remember([block_hash])
        with self.lock:
            self.pending += 1
        self.queue.put((block_hash, tokens, payload))

    def _write_loop(self) -> None:
        while (item := self.queue.get()) is not None:
            batch = [item]
            while not self.queue.empty() and len(batch) < 64:
                if (more := self.queue.get()) is None:
                    self.queue.put(None)
                    break
                batch.append(more)
            try:
                self._write(batch)
            finally:
                with self.lock:
                    self.pending -= len(batch)

    def _write(self, batch: list[tuple[bytes, tuple[int, ...], Any]]) -> None:
        values = [(h, record.pack(self.fingerprint, h, self.kv_format, tokens,
                                  self.encode(payload))) for h, tokens, payload in batch]

        def send() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for h, value in values:
                pipe.set(self.key(h), value, nx=True, ex=self.ttl)
            return pipe.execute()

        if self._call(send) is None:
            with self.lock:
                for h, _ in values:
                    self.known.pop(h, None)  # not written: offer it again later
            return
        with self.lock:
            self.stats["blocks_written"] += len(values)
            self.stats["bytes_written"] += sum(len(v) for _, v in values)

    def _call(self, fn: Callable[[], Any]) -> Any | None:
        """``fn()``, or None while the store is down or when it fails (then it is down)."""
        if not self.is_up and time.monotonic() < self._retry_at:
            return None
        try:
            result = fn()
        except Exception as exc:  # redis errors, timeouts, a full store: never the request
            self._down(exc)
            return None
        if not self.is_up:
            log.warning("kv remote tier %s is back", self.url)
            self.is_up, self._backoff = True, 1.0
            with self.lock:
                self.known.clear()  # it may have come back empty
        return result

    def _down(self, exc: Exception) -> None:
        self._count("errors")
        if self.is_up:
            log.warning("kv remote tier %s is down (%s); computing instead, retrying in %.0f s",
                        self.url, exc, self._backoff)
        else:
            self._backoff = min(self._backoff * 2, 30.0)
        self.is_up = False
        self._retry_at = time.monotonic() + self._backoff

    def _remember(self, hashes) -> None:
        with self.lock:
            for h in hashes:
                self.known[h] = None
                self.known.move_to_end(h)
            while len(self.known) > MAX_KNOWN:
                self.known.popitem(last=False)

    def _count(self, name: str) -> None:
        with self.lock:
            self.stats[name] += 1

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued write has been sent (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.pending == 0:
                    return
            time.sleep(0.005)

    def close(self) -> None:
        self.flush()
        self.queue.put(None)
        self.writer.join(timeout=5)

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {"url": self.url, "up": self.is_up, **self.stats}

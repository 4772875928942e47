"""The self-checking record a block is stored as outside the device pool (disk, remote).

``header | KV format | token ids | payload | checksum``. The header names the model
fingerprint, the block hash and the number of tokens; a record is used only if all of them,
and the KV format (dtype and layout), match the reader's, its payload has exactly the
expected size and the blake2b checksum of everything before it is right.
"""

from __future__ import annotations

import hashlib
import struct

MAGIC = b"KVSVBLK2"
_HEAD = struct.Struct("<8s16s16sIH")  # magic, fingerprint, block hash, tokens, format length
_SUM = 16


class BadRecord(ValueError):
    """Corrupt, truncated or of another model: drop it."""


class ForeignFormat(ValueError):
    """A sound record of another KV format: skip it, never reinterpret it."""


def fingerprint_bytes(fingerprint: str) -> bytes:
    return fingerprint.encode()[:16].ljust(16, b"\0")


def pack(fingerprint: bytes, block_hash: bytes, kv_format: bytes, tokens: tuple[int, ...],
         payload: bytes) -> bytes:
    n = len(tokens)
    data = (_HEAD.pack(MAGIC, fingerprint, block_hash, n, len(kv_format)) + kv_format
            + struct.pack(f"<{n}I", *tokens) + payload)
    return data + hashlib.blake2b(data, digest_size=_SUM).digest()


def unpack(raw: bytes, fingerprint: bytes, block_hash: bytes, kv_format: bytes,
           payload_bytes: int | None) -> tuple[tuple[int, ...], bytes]:
    """(token ids, payload bytes) of a verified record; raises BadRecord or ForeignFormat."""
    try:
        magic, file_fingerprint, file_hash, n, format_len = _HEAD.unpack_from(raw)
        at = _HEAD.size + format_len
        tokens = struct.unpack_from(f"<{n}I", raw, at)
    except struct.error as exc:
        raise BadRecord(f"truncated ({len(raw)} B)") from exc
    if (magic != MAGIC or file_fingerprint != fingerprint or file_hash != block_hash
            or hashlib.blake2b(raw[:-_SUM], digest_size=_SUM).digest() != raw[-_SUM:]):
        raise BadRecord("bad header or checksum")
    if raw[_HEAD.size : at] != kv_format:
        raise ForeignFormat(raw[_HEAD.size : at].decode(errors="replace"))
    body = raw[at + 4 * n : -_SUM]
    if payload_bytes is not None and len(body) != payload_bytes:
        raise BadRecord(f"payload of {len(body)} B, expected {payload_bytes} B")
    return tokens, body

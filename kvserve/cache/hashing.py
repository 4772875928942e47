"""Prefix hashes: each full block is named by its parent's hash and its own token ids.

``hash(block i) = H(hash(block i-1) or root, extra, tokens of block i)``. The root is seeded
with the model fingerprint, the block size and the KV format (dtype and layout), so blocks
never match across models or cache formats; a request's ``cache_salt`` goes into the first
block's extra bytes, so tenants with different salts never share a block. A stable hash
(blake2b, not Python's ``hash``) keys the disk tier across runs.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

HASH_BYTES = 16


def root_hash(fingerprint: str, block_size: int, kv_format: str = "") -> bytes:
    return hashlib.blake2b(f"kvserve:{fingerprint}:{block_size}:{kv_format}".encode(),
                           digest_size=HASH_BYTES).digest()


def hash_block(parent: bytes, tokens: Sequence[int], extra: bytes = b"") -> bytes:
    h = hashlib.blake2b(parent, digest_size=HASH_BYTES)
    h.update(struct.pack("<I", len(extra)) + extra)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()


def salt_bytes(cache_salt: str | None) -> bytes:
    """The salt's bytes; SamplingParams already refused a salt that is not valid Unicode."""
    return cache_salt.encode() if cache_salt else b""

"""Sliding windows in block terms: which blocks a window still sees, and which prefix hits
give every KV cache group what it needs.

A query at position p of a layer with window W sees positions p - W + 1 .. p. Once a
request has computed n tokens, its next query is at n, so its sliding layers will never
again read a block that ends before n - W + 1:

``| released (cached, evictable) | first_seen_block(n) ... | being computed |``
"""

from __future__ import annotations

from collections.abc import Sequence


def first_seen_block(num_tokens: int, window: int, block_size: int) -> int:
    """The first block the query at position ``num_tokens`` still sees (0 without a window)."""
    return max(0, num_tokens - window + 1) // block_size if window else 0


def longest_hit(present: Sequence[Sequence[bool]], windows: Sequence[int], block_size: int
                ) -> int:
    """The most leading blocks k such that, in every group, the blocks a query at position
    k * block_size sees are all present: every block for full attention, and for a window
    only the blocks from first_seen_block(k * block_size) to k.

    ``present[g][i]``: group g holds block i of the chain (any length, the same for all)."""
    num = len(present[0]) if present else 0
    last_missing = []  # [g][k]: the last missing block before k, or -1
    for row in present:
        before, last = [-1], -1
        for i, ok in enumerate(row):
            last = last if ok else i
            before.append(last)
        last_missing.append(before)
    for k in range(num, 0, -1):
        if all(last_missing[g][k] < first_seen_block(k * block_size, w, block_size)
               for g, w in enumerate(windows)):
            return k
    return 0


def release_unseen(table: list[int], num_tokens: int, window: int, block_size: int,
                   null: int) -> list[int]:
    """Set to ``null``, deepest first, the entries of ``table`` that the query at position
    ``num_tokens`` no longer sees, and return their blocks (to release to their pool).
    Everything before an entry already ``null`` was released earlier."""
    gone = []
    for i in range(min(first_seen_block(num_tokens, window, block_size), len(table)) - 1, -1, -1):
        if table[i] == null:
            break
        gone.append(table[i])
        table[i] = null
    return gone

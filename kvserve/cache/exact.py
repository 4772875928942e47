"""Exact repeats: a prompt's last-position logits, kept so that the same prompt sent again
samples its first token without a forward pass. Logits are opaque here (a tensor)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class ExactRepeatCache:
    """The last logits of up to ``capacity`` prompts, least recently used dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[bytes, Any] = OrderedDict()

    def get(self, key: bytes) -> Any | None:
        logits = self.entries.get(key)
        if logits is not None:
            self.entries.move_to_end(key)
        return logits

    def put(self, key: bytes, logits: Any) -> None:
        if self.capacity == 0:
            return
        self.entries[key] = logits
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()

"""The two contracts of a step: what the scheduler asks the runner to do, and what came back.

Plain values only. The runner never sees a ``Request`` or the cache; the scheduler applies a
``RunnerOutput`` itself. Tensors (kept logits, block payloads) pass through as opaque values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvserve.sampling_params import SamplingParams

NULL_BLOCK = -1  # a block-table entry no layer of its group will read again (out of window)


@dataclass(frozen=True)
class BlockSave:
    """A block whose K/V must be copied out before anything overwrites it: evicted from the
    pool, or newly full and wanted by the remote tier."""

    block_id: int
    block_hash: bytes
    token_ids: tuple[int, ...]
    evicted: bool = True


@dataclass(frozen=True)
class BlockLoad:
    """A tier hit: copy ``payload`` into ``block_id`` before the request's K/V are read."""

    block_id: int
    payload: Any


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's part of a step.

    ``| start positions: K/V already in blocks | token_ids: computed now |``

    The last position is sampled when ``sample`` is set (it ends the sequence as known so
    far); a mid-prompt chunk samples nothing. An exact repeat computes nothing and samples
    its first token from ``replay_logits``. Requests whose sampling reads the tokens so far
    (penalties, min_tokens) or that want prompt logprobs carry their prompt and output ids
    (read only).
    """

    request_id: str
    token_ids: list[int]
    start: int
    block_table: list[int]  # read only: the runner never changes it
    params: SamplingParams
    sample: bool
    keep_logits: bool = False  # hand back the sampled position's logits (exact repeats)
    replay_logits: Any = None
    loads: tuple[BlockLoad, ...] = ()
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    # The tables of KV cache groups 1.. (a model with sliding and full layers); a block a
    # sliding window no longer sees is NULL_BLOCK.
    group_tables: tuple[list[int], ...] = ()

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    def table(self, group: int) -> list[int]:
        return self.block_table if group == 0 else self.group_tables[group - 1]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    saves: list[BlockSave] = field(default_factory=list)  # done first, before any load
    finished_request_ids: list[str] = field(default_factory=list)  # drop per-request state
    # Grammar-constrained requests that sample this step: request id -> the allowed tokens,
    # a [ceil(vocab / 32)] int32 row of bits (filled by the engine from each request's grammar).
    token_bitmasks: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)
    kept_logits: dict[str, Any] = field(default_factory=dict)
    # request id -> (index of the first prompt token scored, each one's top-k logprobs)
    prompt_logprobs: dict[str, tuple[int, list[dict[int, float]]]] = field(default_factory=dict)
    saved: list[tuple[BlockSave, Any]] = field(default_factory=list)  # with their payloads
    failed_loads: dict[str, int] = field(default_factory=dict)  # request id -> first block id
    errors: dict[str, str] = field(default_factory=dict)  # request id -> what went wrong

    def merge(self, other: RunnerOutput) -> None:
        for name in ("sampled", "logprobs", "kept_logits", "prompt_logprobs", "failed_loads",
                     "errors"):
            getattr(self, name).update(getattr(other, name))
        self.saved += other.saved

"""A request's state as the scheduler sees it: tokens, progress, blocks, and its figures."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from kvserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestStats:
    """What a request cost and where its tokens came from, counted by the scheduler."""

    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    cache_lookup_time: float = 0.0  # seconds spent finding the cached prefix
    # Work meter: K/V positions computed, summed over forward passes (recomputation counts).
    work_tokens: int = 0
    prompt_work_tokens: int = 0
    kv_tokens_peak: int = 0
    kv_bytes_peak: int = 0  # K/V bytes its blocks held at most (sliding windows: only those)
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    hit_tiers: list[str] = field(default_factory=list)  # the tier of each hit block


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Positions whose K/V are in the cache: | computed | to compute |
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    group_tables: list[list[int]] = field(default_factory=list)  # KV cache groups 1..
    block_hashes: list[bytes] = field(default_factory=list)  # of full blocks, in chain order
    num_committed_blocks: int = 0  # leading blocks registered in the prefix index
    replay_logits: Any = None  # an exact repeat: sample the first token from these
    finish_reason: str | None = None
    error: str | None = None  # what went wrong, when finish_reason is "error"
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    grammar: Any = None  # a GrammarState, for a request with structured_outputs
    stats: RequestStats = field(default_factory=RequestStats)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

"""Which requests run this step, and how many tokens each computes.

There are no prefill and decode phases: a request computes tokens until
``num_computed_tokens`` catches up with ``num_tokens``. Running requests go first (those
decoding before those still in their prompt), then waiting prompts fill what is left of
the token budget, chunked to fit. When KV blocks run out, the newest request is preempted:
its blocks are freed and it waits at the front of the queue to be recomputed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvserve.cache.manager import KVCacheManager
from kvserve.engine.request import Request, Status

# Longest-prefix-match ordering pays a lookup per waiting request per step; past this many
# waiting requests it falls back to first come, first served, so nothing starves.
LPM_MAX_WAITING = 32


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    policy: str = "fcfs"  # or "lpm": waiting requests with the longest cached prefix first

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "lpm"):
            raise ValueError(f"schedule policy must be 'fcfs' or 'lpm', got {self.policy!r}")


@dataclass
class SchedulerOutput:
    """``scheduled[i] = (request, num_new_tokens)``; positions
    ``[num_computed_tokens, num_computed_tokens + num_new_tokens)`` are computed."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


@dataclass
class SchedulerStats:
    num_steps: int = 0
    num_tokens_computed: int = 0
    num_prompt_tokens_computed: int = 0
    num_tokens_generated: int = 0
    num_preemptions: int = 0
    num_chunked_prefills: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order: the last is the newest
        self.stats = SchedulerStats()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        decoding_first = sorted(self.running,
                                key=lambda r: r.num_computed_tokens < r.num_prompt_tokens)
        for request in decoding_first:
            if budget == 0:
                break
            if request.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._allocate_or_preempt(request, num_new, out):
                out.scheduled.append((request, num_new))
                budget -= num_new
        if self.config.policy == "lpm" and 1 < len(self.waiting) <= LPM_MAX_WAITING:
            self.waiting = deque(sorted(self.waiting, key=lambda r: -self.kv.num_cached_blocks(r)))
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            start = time.perf_counter()
            hit = self.kv.lookup(request)
            request.cache_lookup_time += time.perf_counter() - start
            # An exact repeat samples its first token from kept logits: nothing to compute yet.
            num_new = 0 if hit.logits is not None else min(
                request.num_tokens - hit.num_tokens, budget)
            if not self.kv.allocate_slots(request, num_new, hit):
                break
            self.waiting.popleft()
            request.status = Status.RUNNING
            request.cached_logits = hit.logits
            self.running.append(request)
            out.scheduled.append((request, num_new))
            budget -= num_new
        return out

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Preempt the newest request not yet scheduled this step until ``request`` fits."""
        scheduled = {id(r) for r, _ in out.scheduled}
        while not self.kv.allocate_slots(request, num_new):
            victim = next(r for r in reversed(self.running)
                          if id(r) not in scheduled or r is request)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.running.remove(request)
        self.waiting.appendleft(request)

    def update(self, out: SchedulerOutput, sampled: dict[str, int], eos_ids: tuple[int, ...]
               ) -> list[Request]:
        """Record the step's work and sampled tokens; returns the requests that got a token."""
        now = time.perf_counter()
        self.stats.num_steps += 1
        progressed = []
        for request, num_new in out.scheduled:
            self._count_work(request, num_new)
            request.num_computed_tokens += num_new
            self.kv.commit(request)
            token = sampled.get(request.request_id)
            if token is None:  # mid-prompt chunk: nothing sampled yet
                self.stats.num_chunked_prefills += 1
                continue
            request.output_token_ids.append(token)
            self.stats.num_tokens_generated += 1
            if request.first_token_time is None:
                request.first_token_time = now
            progressed.append(request)
            reason = stop_reason(request, token, eos_ids)
            if reason:
                self.finish(request, reason)
            elif not request.params.use_kv_cache:
                # The no-cache baseline: forget every K/V, recompute all of it next step.
                self.kv.free(request)
                request.num_computed_tokens = 0
        return progressed

    def _count_work(self, request: Request, num_new: int) -> None:
        prompt_part = max(0, min(request.num_prompt_tokens - request.num_computed_tokens, num_new))
        request.num_tokens_computed += num_new
        request.num_prompt_tokens_computed += prompt_part
        request.num_kv_tokens_peak = max(request.num_kv_tokens_peak,
                                         request.num_computed_tokens + num_new)
        self.stats.num_tokens_computed += num_new
        self.stats.num_prompt_tokens_computed += prompt_part

    def finish(self, request: Request, reason: str) -> None:
        """End a request wherever it is (running, waiting) and give back its blocks."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
        request.finish_time = time.perf_counter()


def stop_reason(request: Request, token: int, eos_ids: tuple[int, ...]) -> str | None:
    params = request.params
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_ids):
        return "stop"
    if request.num_output_tokens >= params.max_tokens:
        return "length"
    return None

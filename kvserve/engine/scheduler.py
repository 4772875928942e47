"""Which requests run this step, and how many tokens each computes.

There are no prefill and decode phases: a request computes tokens until
``num_computed_tokens`` catches up with ``num_tokens``. Running requests go first (those
decoding before those still in their prompt), then waiting prompts fill what is left of
the token budget, chunked to fit. When KV blocks run out, the newest request is preempted:
its blocks are freed and it waits at the front of the queue to be recomputed.

``schedule()`` returns a ``SchedulerOutput`` for the runner; ``update()`` applies the
``RunnerOutput`` that comes back. Whether a request is finished is decided by the engine
(engine/output.py), which calls ``finish()``. A request whose scheduling raises finishes
alone with ``error``; the others are scheduled as if it had never been there.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from kvserve import faults
from kvserve.cache.hit import CacheHit
from kvserve.cache.manager import KVCacheManager
from kvserve.engine.request import Request, Status
from kvserve.step import BlockLoad, BlockSave, RunnerOutput, ScheduledRequest, SchedulerOutput

log = logging.getLogger("kvserve")

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
class SchedulerStats:
    num_steps: int = 0
    work_tokens: int = 0
    prompt_work_tokens: int = 0
    num_tokens_generated: int = 0
    num_preemptions: int = 0
    num_chunked_prefills: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order: the last is the newest
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.stats = SchedulerStats()
        self._finished_ids: list[str] = []  # for the runner to drop their state
        self._failed: list[Request] = []  # failed while scheduling; reported by update()

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        decoding_first = sorted(self.running,
                                key=lambda r: r.num_computed_tokens < r.num_prompt_tokens)
        for request in decoding_first:
            if budget == 0:
                break
            if request.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens,
                          self._budget_for(request, budget))
            if self._guarded(request, self._allocate_or_preempt, request, num_new, out):
                out.scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
        if self.config.policy == "lpm" and 1 < len(self.waiting) <= LPM_MAX_WAITING:
            self.waiting = deque(sorted(self.waiting, key=lambda r: -self.kv.num_cached_blocks(r)))
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            admitted = self._guarded(request, self._admit, request, budget)
            if request.is_finished:  # it failed: the next one may still fit
                continue
            if not admitted:
                break
            num_new, loads = admitted
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            out.scheduled.append(self._scheduled(request, num_new, loads))
            budget -= num_new
        out.saves = self.take_saves()
        return out

    def _budget_for(self, request: Request, budget: int) -> int:
        """The tokens ``request`` may compute of what is left of this step's budget. A request
        without a KV cache recomputes its whole sequence for every token, so it takes at most
        half of a step (chunked over several if longer): the others always get the rest."""
        if request.params.use_kv_cache:
            return budget
        return min(budget, max(1, self.config.max_num_batched_tokens // 2))

    def _guarded(self, request: Request, fn, *args):
        """``fn(*args)``, or None after finishing ``request`` alone with ``error``."""
        try:
            faults.check("schedule", request.request_id)
            return fn(*args)
        except Exception as exc:
            log.exception("scheduling request %s failed; it ends with an error alone",
                          request.request_id)
            self.finish(request, "error", f"scheduling failed: {exc!r}")
            self._failed.append(request)
            return None

    def _admit(self, request: Request, budget: int) -> tuple[int, list[BlockLoad]] | None:
        """Look up a waiting request's cached prefix and give it blocks; None if full."""
        start = time.perf_counter()
        hit = self.kv.lookup(request)
        request.stats.cache_lookup_time += time.perf_counter() - start
        # An exact repeat samples its first token from kept logits: nothing to compute yet.
        num_new = 0 if hit.logits is not None else min(request.num_tokens - hit.num_tokens,
                                                       self._budget_for(request, budget))
        if not self.kv.allocate_slots(request, num_new, hit):
            return None
        self._record_hit(request, hit)
        request.replay_logits = hit.logits
        return num_new, [BlockLoad(block_id, payload) for block_id, payload in hit.loads]

    def _record_hit(self, request: Request, hit: CacheHit) -> None:
        stats = request.stats
        stats.num_cached_tokens = hit.num_tokens
        stats.hit_tiers = [b.tier for b in hit.blocks]
        stats.cached_tokens_by_tier = (self.kv.tokens_by_tier(request, hit)
                                       if self.kv.caches(request) else {})

    def _scheduled(self, request: Request, num_new: int,
                   loads: list[BlockLoad] | None = None) -> ScheduledRequest:
        start = request.num_computed_tokens
        replay, request.replay_logits = request.replay_logits, None
        sample = replay is not None or start + num_new == request.num_tokens
        keep = (sample and replay is None and request.num_output_tokens == 0
                and self.kv.wants_logits(request))
        history = request.params.needs_history or request.params.prompt_logprobs is not None
        return ScheduledRequest(
            request.request_id, request.token_ids_slice(start, start + num_new), start,
            request.block_table, request.params, sample, keep, replay, tuple(loads or ()),
            prompt_token_ids=request.prompt_token_ids if history else (),
            output_token_ids=request.output_token_ids if history else (),
            group_tables=tuple(request.group_tables))

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Preempt the newest request not yet scheduled this step until ``request`` fits."""
        scheduled = {s.request_id for s in out.scheduled}
        while not self.kv.allocate_slots(request, num_new):
            victim = next(r for r in reversed(self.running)
                          if r.request_id not in scheduled or r is request)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = Status.WAITING
        request.stats.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.running.remove(request)
        self.waiting.appendleft(request)

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Apply what the runner did; returns the requests with news (a token, or an error)."""
        now = time.perf_counter()
        self.stats.num_steps += 1
        news, self._failed = self._failed, []
        self.store_saved(result)
        for s in out.scheduled:
            request = self.requests.get(s.request_id)
            if request is None:
                continue
            if s.request_id in result.errors:
                self.finish(request, "error", result.errors[s.request_id])
                news.append(request)
                continue
            if s.request_id in result.failed_loads:  # its positions were not computed
                self._drop_failed_load(request, result.failed_loads[s.request_id])
            else:
                self._count_work(request, s.num_new_tokens)
                request.num_computed_tokens += s.num_new_tokens
                self.kv.commit(request)
            if s.request_id in result.prompt_logprobs:
                _add_prompt_logprobs(request, *result.prompt_logprobs[s.request_id])
            if s.request_id in result.kept_logits:
                self.kv.remember_logits(request, result.kept_logits[s.request_id])
            token = result.sampled.get(s.request_id)
            if token is None:  # mid-prompt chunk: nothing sampled yet
                self.stats.num_chunked_prefills += not s.sample
                continue
            self._append_token(request, token, result.logprobs.get(s.request_id), now)
            news.append(request)
        return news

    def take_saves(self) -> list[BlockSave]:
        return [BlockSave(*save) for save in self.kv.take_saves()]

    def store_saved(self, result: RunnerOutput) -> None:
        for save, payload in result.saved:
            self.kv.store_block(save.block_hash, save.token_ids, payload, save.evicted)

    def _append_token(self, request: Request, token: int, logprobs: dict | None,
                      now: float) -> None:
        request.output_token_ids.append(token)
        if logprobs is not None:
            request.logprobs.append(logprobs)
        self.stats.num_tokens_generated += 1
        if request.stats.first_token_time is None:
            request.stats.first_token_time = now
        if not request.params.use_kv_cache:
            # The no-cache baseline: forget every K/V, recompute all of it next step.
            self.kv.free(request)
            request.num_computed_tokens = 0

    def _drop_failed_load(self, request: Request, block_id: int) -> None:
        """A tier block could not be copied in: that block and the rest of the hit are
        released unindexed and their tokens computed instead."""
        first = request.block_table.index(block_id)
        stats = request.stats
        lost = stats.hit_tiers[first:]
        self.kv.drop_blocks(request, first, lost)
        del stats.hit_tiers[first:]
        stats.num_cached_tokens = len(stats.hit_tiers) * self.kv.block_size
        for tier in lost:
            stats.cached_tokens_by_tier[tier] -= self.kv.block_size

    def _count_work(self, request: Request, num_new: int) -> None:
        prompt_part = max(0, min(request.num_prompt_tokens - request.num_computed_tokens, num_new))
        stats = request.stats
        stats.work_tokens += num_new
        stats.prompt_work_tokens += prompt_part
        num_tokens = request.num_computed_tokens + num_new
        stats.kv_tokens_peak = max(stats.kv_tokens_peak, num_tokens)
        stats.kv_bytes_peak = max(stats.kv_bytes_peak, self.kv.bytes_held(request, num_tokens))
        self.stats.work_tokens += num_new
        self.stats.prompt_work_tokens += prompt_part

    def finish(self, request: Request, reason: str, error: str | None = None) -> None:
        """End a request wherever it is (running, waiting) and give back its blocks."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.requests.pop(request.request_id, None)
        self.kv.free(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
        request.error = error
        request.stats.finish_time = time.perf_counter()
        self._finished_ids.append(request.request_id)


def _add_prompt_logprobs(request: Request, first: int, entries: list[dict[int, float]]) -> None:
    """Prompt token ``first + j`` gets ``entries[j]``; positions recomputed after a
    preemption are already there and are skipped. Token 0 has none (nothing precedes it)."""
    scored = request.prompt_logprobs
    if not scored:
        scored.append(None)
    for j, entry in enumerate(entries):
        if first + j == len(scored):
            scored.append(entry)

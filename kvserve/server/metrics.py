"""Prometheus metrics of one server, in their own registry (two apps in a process never mix)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvserve.engine.output import RequestOutput

log = logging.getLogger("kvserve.server")

FINISH_REASONS = ("stop", "length", "abort", "error")
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class RequestTimes:
    """What the engine thread remembers of one request to time its tokens (perf_counter)."""

    submit_time: float  # when the HTTP side queued it
    ttft: float | None = None
    last_token_time: float = 0.0
    num_tokens: int = 0


class ServerMetrics:
    """Written by the engine thread (prometheus_client is thread-safe), read by ``/metrics``;
    the request hit counts are read on the engine thread too (``/cache/stats``)."""

    def __init__(self) -> None:
        self.num_requests_hit = 0  # requests that found a cached prefix
        self.num_requests_missed = 0
        self.registry = r = CollectorRegistry()
        self.requests = Counter("kvserve_requests_finished", "Finished requests by reason",
                                ["finish_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.requests.labels(finish_reason=reason)
        self.running = Gauge("kvserve_requests_running", "Requests in the running batch",
                             registry=r)
        self.waiting = Gauge("kvserve_requests_waiting", "Requests queued in the scheduler",
                             registry=r)
        self.kv_blocks_used = Gauge("kvserve_kv_blocks_used", "KV blocks not free", registry=r)
        self.kv_usage = Gauge("kvserve_kv_usage_ratio", "Used / total KV blocks", registry=r)
        self.prefix_queried = Counter("kvserve_prefix_cache_queried_tokens",
                                      "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hit = Counter("kvserve_prefix_cache_hit_tokens",
                                  "Prompt tokens found in the prefix cache", registry=r)
        self.tier_hit = Counter("kvserve_prefix_cache_tier_hit_tokens",
                                "Prompt tokens found in the prefix cache, by where they were",
                                ["tier"], registry=r)
        self.prompt_tokens = Counter("kvserve_prompt_tokens", "Prompt tokens of started requests",
                                     registry=r)
        self.generation_tokens = Counter("kvserve_generation_tokens", "Tokens generated",
                                         registry=r)
        self.ttft = Histogram("kvserve_time_to_first_token_seconds", "Submit to first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("kvserve_inter_token_latency_seconds", "Between two tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("kvserve_e2e_request_latency_seconds", "Submit to finish",
                             buckets=_E2E_BUCKETS, registry=r)

    def observe(self, out: RequestOutput, times: RequestTimes, now: float) -> None:
        """Count one output of a request; log a line when it has finished."""
        num_new = len(out.token_ids) - times.num_tokens
        if num_new > 0:
            if times.num_tokens == 0:
                times.ttft = now - times.submit_time
                self._first_token(out, times.ttft)
            else:
                for _ in range(num_new):
                    self.itl.observe((now - times.last_token_time) / num_new)
            self.generation_tokens.inc(num_new)
            times.num_tokens, times.last_token_time = len(out.token_ids), now
        if out.finished:
            self.requests.labels(finish_reason=out.finish_reason).inc()
            self.e2e.observe(now - times.submit_time)
            _log_finished(out, times, now)

    def _first_token(self, out: RequestOutput, ttft: float) -> None:
        num_prompt_tokens = len(out.prompt_token_ids)
        self.prompt_tokens.inc(num_prompt_tokens)
        self.prefix_queried.inc(num_prompt_tokens)
        self.prefix_hit.inc(out.num_cached_tokens)
        for tier, num in out.cached_tokens_by_tier.items():
            if tier != "exact_repeat":
                self.tier_hit.labels(tier=tier).inc(num)
        self.ttft.observe(ttft)
        if out.num_cached_tokens:
            self.num_requests_hit += 1
        else:
            self.num_requests_missed += 1

    def engine_state(self, num_running: int, num_waiting: int, num_blocks_used: int,
                     usage: float) -> None:
        self.running.set(num_running)
        self.waiting.set(num_waiting)
        self.kv_blocks_used.set(num_blocks_used)
        self.kv_usage.set(usage)

    def watch_remote_tier(self, report: Callable[[], dict[str, Any]]) -> None:
        """Export the remote tier's own figures (``report`` is thread-safe)."""
        self.registry.register(_RemoteTierCollector(report))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _log_finished(out: RequestOutput, times: RequestTimes, now: float) -> None:
    ttft = "-" if times.ttft is None else f"{times.ttft * 1000:.0f} ms"
    log.info("%s: %d prompt tokens (%d cached), %d generated, TTFT %s, total %.0f ms, %s",
             out.request_id, len(out.prompt_token_ids), out.num_cached_tokens,
             len(out.token_ids), ttft, (now - times.submit_time) * 1000, out.finish_reason)


class _RemoteTierCollector:
    def __init__(self, report: Callable[[], dict[str, Any]]) -> None:
        self.report = report

    def collect(self):
        figures = self.report()
        yield GaugeMetricFamily("kvserve_kv_remote_up", "1 while the remote KV store answers",
                                value=int(figures["up"]))
        for name, help_text in (("blocks_read", "Blocks loaded from the remote store"),
                                ("bytes_read", "Bytes loaded from the remote store"),
                                ("blocks_written", "Blocks written to the remote store"),
                                ("bytes_written", "Bytes written to the remote store"),
                                ("bad_records", "Remote values ignored: corrupt or foreign"),
                                ("errors", "Failed calls to the remote store"),
                                ("load_seconds", "Time spent loading from the remote store")):
            yield CounterMetricFamily(f"kvserve_kv_remote_{name}", help_text,
                                      value=figures[name])

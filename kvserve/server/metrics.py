"""Prometheus metrics of one server, in their own registry (two apps in a process never mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FINISH_REASONS = ("stop", "length", "abort", "error")
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    """Written by the engine thread (prometheus_client is thread-safe), read by ``/metrics``."""

    def __init__(self) -> None:
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

    def first_token(self, num_prompt_tokens: int, num_cached_tokens: int, ttft: float) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)
        self.prefix_queried.inc(num_prompt_tokens)
        self.prefix_hit.inc(num_cached_tokens)
        self.ttft.observe(ttft)

    def new_tokens(self, num_tokens: int, since_last: float | None) -> None:
        """``since_last``: seconds since this request's previous tokens (None: its first)."""
        self.generation_tokens.inc(num_tokens)
        if since_last is not None:
            for _ in range(num_tokens):
                self.itl.observe(since_last / num_tokens)

    def finished(self, finish_reason: str, e2e: float) -> None:
        self.requests.labels(finish_reason=finish_reason).inc()
        self.e2e.observe(e2e)

    def engine_state(self, num_running: int, num_waiting: int, num_blocks_used: int,
                     usage: float) -> None:
        self.running.set(num_running)
        self.waiting.set(num_waiting)
        self.kv_blocks_used.set(num_blocks_used)
        self.kv_usage.set(usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)

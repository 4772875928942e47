"""What a request hands back (its text as it grows, stop strings cut out, and its figures),
and the one place that decides a request is finished."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvserve.engine.request import Request


class TextStream:
    """Incremental text of one request, holding back what may still become a stop string."""

    def __init__(self, decoder, stop: tuple[str, ...]) -> None:
        self.decoder = decoder
        self.stop = stop
        self.text = ""
        self.num_emitted = 0
        self._holdback = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int, is_last: bool) -> bool:
        """Append a token's text; True when a stop string was found (text is cut before it)."""
        before = len(self.text)
        self.text += self.decoder.step(token_id)
        if is_last:
            self.text += self.decoder.flush()
        for s in self.stop:
            at = self.text.find(s, max(0, before - len(s) + 1))
            if at != -1:
                self.text = self.text[:at]
                return True
        return False

    def take(self, finished: bool) -> str:
        """The text not handed out yet; unfinished, keep back a possible stop-string start."""
        end = len(self.text) if finished else max(self.num_emitted, len(self.text) - self._holdback)
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta


def finish_reason(request: Request, stream: TextStream, eos_ids: tuple[int, ...]) -> str | None:
    """Add the request's newest token to its text; why it is now finished, or None.

    A stop token (or EOS, unless ignored) and the length limit end it at this token; a stop
    string ends it with the text cut before the string.
    """
    reason = token_stop_reason(request, eos_ids)
    if stream.add(request.output_token_ids[-1], is_last=reason is not None) and reason is None:
        reason = "stop"
    return reason


def token_stop_reason(request: Request, eos_ids: tuple[int, ...]) -> str | None:
    """The part of ``finish_reason`` that needs no text."""
    params, token = request.params, request.output_token_ids[-1]
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_ids):
        return "stop"
    if request.num_output_tokens >= params.max_tokens:
        return "length"
    return None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    cache_lookup_time: float = 0.0  # seconds spent finding the cached prefix

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_cached_tokens: int
    metrics: RequestMetrics
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    work_tokens: int = 0  # K/V positions computed, summed over all forward passes
    kv_bytes_peak: int = 0
    num_preemptions: int = 0
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    delta: str = ""  # text new since the last output of this request
    error: str | None = None  # what went wrong, when finish_reason is "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def time_per_output_token(self) -> float | None:
        m, n = self.metrics, len(self.token_ids)
        if m.first_token_time is None or m.finish_time is None or n < 2:
            return None
        return (m.finish_time - m.first_token_time) / (n - 1)


def make_output(request: Request, prompt: str | None, stream: TextStream,
                delta: str) -> RequestOutput:
    stats = request.stats
    return RequestOutput(
        request_id=request.request_id,
        prompt=prompt,
        prompt_token_ids=request.prompt_token_ids,
        text=stream.text,
        token_ids=list(request.output_token_ids),
        finish_reason=request.finish_reason,
        num_cached_tokens=stats.num_cached_tokens,
        cached_tokens_by_tier=dict(stats.cached_tokens_by_tier),
        metrics=RequestMetrics(stats.arrival_time, stats.first_token_time, stats.finish_time,
                               stats.cache_lookup_time),
        work_tokens=stats.work_tokens,
        kv_bytes_peak=stats.kv_bytes_peak,
        num_preemptions=stats.num_preemptions,
        logprobs=list(request.logprobs) if request.params.logprobs is not None else None,
        prompt_logprobs=(list(request.prompt_logprobs)
                         if request.params.prompt_logprobs is not None else None),
        delta=delta,
        error=request.error,
    )

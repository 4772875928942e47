"""How to pick each next token, and when to stop."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs of each sampled token
    use_kv_cache: bool = True
    use_prefix_cache: bool = True
    cache_salt: str | None = None  # requests share cached blocks only with the same salt

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, "top_k", f"must be -1, 0 (off) or >= 1, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(all(self.stop), "stop", "stop strings must not be empty")
        _check(self.cache_salt is None or _is_unicode(self.cache_salt), "cache_salt",
               "must be valid Unicode text (it has a lone surrogate)")
        _check(all(map(_is_unicode, self.stop)), "stop",
               "strings must be valid Unicode text (one has a lone surrogate)")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
               f"must be between 0 and 20, got {self.logprobs}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True

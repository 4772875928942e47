"""How to pick each next token, and when to stop."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StructuredOutputs:
    """Constrain the output to a language; exactly one of these is set.

    ``json``: a JSON schema (dict or text); ``json_object``: any JSON object; ``regex``: a
    regular expression; ``choice``: one of these strings; ``grammar``: a Lark grammar, or
    llama.cpp's GBNF (told apart by its ``::=``). Compiled by llguidance (kvserve.structured).
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
            _check(bool(self.choice) and all(isinstance(c, str) for c in self.choice),
                   "structured_outputs.choice", "must be a non-empty list of strings")
        if isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", json.loads(self.json))
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        kinds = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        _check(len(kinds) == 1, "structured_outputs",
               f"must set exactly one of json, json_object, regex, choice, grammar (got "
               f"{', '.join(kinds) or 'none'})")

    @property
    def key(self) -> str:
        """The same constraint gives the same key: the grammar cache's key."""
        return json.dumps([self.json, self.json_object, self.regex, self.choice, self.grammar],
                          sort_keys=True)


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
    structured_outputs: StructuredOutputs | None = None
    # Penalties on tokens already seen (OpenAI's and transformers' definitions):
    presence_penalty: float = 0.0  # minus this once for every token in the output so far
    frequency_penalty: float = 0.0  # minus this times the token's count in the output so far
    repetition_penalty: float = 1.0  # prompt and output tokens: logit / p if > 0, else * p
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the token's logit
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many are generated
    prompt_logprobs: int | None = None  # top-k logprobs of each prompt token (and its own)

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
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
               "prompt_logprobs", f"must be between 0 and 20, got {self.prompt_logprobs}")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty",
               f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(0 < self.repetition_penalty <= 2, "repetition_penalty",
               f"must be in (0, 2], got {self.repetition_penalty}")
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be in [0, max_tokens], got {self.min_tokens}")
        if self.prompt_logprobs is not None:
            # A cached prefix has no logits: such a request computes its whole prompt (it
            # neither reads nor writes the prefix cache).
            object.__setattr__(self, "use_prefix_cache", False)
        object.__setattr__(self, "logit_bias", {int(k): float(v)
                                                for k, v in dict(self.logit_bias).items()})
        _check(all(-100 <= v <= 100 for v in self.logit_bias.values()), "logit_bias",
               "values must be in [-100, 100]")

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the tokens so far (penalties, min_tokens)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1 or self.min_tokens > 0)

    @property
    def processes_logits(self) -> bool:
        return self.needs_history or bool(self.logit_bias)

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

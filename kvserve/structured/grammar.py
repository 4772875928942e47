"""Grammars from ``StructuredOutputs``, compiled once per distinct constraint and cached.

llguidance compiles a JSON schema, regex or Lark grammar against the model's vocabulary
(chosen over xgrammar for its plain wheel and its compile times: docs/BENCHMARKS.md). A
compiled grammar is kept as a fresh matcher; each request gets its own copy of it. Compiling
is thread-safe, so the server compiles on a worker thread before a request is queued and the
engine thread only copies.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import llguidance

from kvserve.model.tokenizer import Tokenizer
from kvserve.sampling_params import StructuredOutputs

# JSON as json.dumps writes it, one space after "," and ":", and no other whitespace: a
# small model cannot wander into endless newlines, and its replies read as usual.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256


class GrammarError(ValueError):
    """A constraint that does not compile; ``param`` names the field it came from."""


def to_grammar(spec: StructuredOutputs) -> str:
    """The llguidance grammar (its JSON form) of a constraint; nothing is checked yet."""
    matcher = llguidance.LLMatcher
    if spec.json is not None or spec.json_object:
        schema = spec.json if spec.json is not None else {"type": "object"}
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be a JSON object")
        return matcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    if spec.regex is not None:
        return matcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return matcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in spec.choice))
    assert spec.grammar is not None
    text = spec.grammar
    if "::=" in text:  # GBNF (llama.cpp's EBNF): llguidance translates it to Lark
        from llguidance.gbnf_to_lark import gbnf_to_lark
        try:
            text = gbnf_to_lark(text)
        except Exception as exc:
            raise GrammarError(f"the GBNF grammar does not parse: {exc}") from None
    return matcher.grammar_from_lark(text)


class GrammarCompiler:
    """Constraint -> compiled matcher, cached (LRU); ``matcher()`` hands out fresh copies."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltokenizer: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0

    @property
    def lltokenizer(self) -> Any:
        """Built on first use (about half a second for a 49k vocabulary)."""
        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                    eos_token=list(self._tokenizer.eos_token_ids))
            return self._lltokenizer

    def compile(self, spec: StructuredOutputs) -> Any:
        """The cached fresh matcher of ``spec``; raises GrammarError when it does not compile."""
        key = spec.key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            grammar = to_grammar(spec)
        except GrammarError:
            raise
        except Exception as exc:  # llguidance raises ValueError on a schema it cannot read
            raise GrammarError(str(exc)) from None
        template = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(template.get_error())
        with self._lock:
            self._cache[key] = template
            self.num_compiled += 1
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return template

    def matcher(self, spec: StructuredOutputs) -> GrammarState:
        return GrammarState(self.compile(spec).deep_copy())


class GrammarState:
    """One request's place in its grammar: advanced by each token it keeps.

    A preempted request keeps its output tokens, so its state stays valid while its K/V are
    recomputed; ``sync`` feeds whatever tokens were appended since the last call."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.num_consumed = 0

    def sync(self, output_token_ids: list[int]) -> None:
        """Consume the tokens after ``num_consumed``; raises ValueError on a token the
        grammar refuses (only a bug can sample one: masked tokens have -inf logits)."""
        new = output_token_ids[self.num_consumed:]
        if not new:
            return
        if self.matcher.is_stopped():  # the grammar ended: only EOS could follow
            self.num_consumed = len(output_token_ids)
            return
        if not self.matcher.consume_tokens(new):
            raise ValueError(f"the grammar refused token(s) {new}: "
                             f"{self.matcher.get_error()}")
        self.num_consumed = len(output_token_ids)

    def fill(self, bitmask: Any, row: int) -> None:
        """The allowed next tokens into ``bitmask[row]`` (int32 words, bit i = token i)."""
        v = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

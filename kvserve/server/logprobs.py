"""Token log-probabilities in the two OpenAI shapes: completions and chat."""

from __future__ import annotations

import functools
from typing import Any

from kvserve.model.tokenizer import Tokenizer


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """The bytes and the text of single tokens, as logprobs show them; cached per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._bytes: dict[int, bytes] = {}

    def bytes_of(self, token_id: int) -> bytes:
        """A byte-level token's exact bytes (half a UTF-8 character included); else its text."""
        if token_id not in self._bytes:
            piece = self._tokenizer.id_to_token(token_id) or ""
            alphabet = _byte_level_alphabet()
            if piece and all(c in alphabet for c in piece):
                self._bytes[token_id] = bytes(alphabet[c] for c in piece)
            else:
                text = self._tokenizer.decode([token_id], skip_special_tokens=False)
                self._bytes[token_id] = text.encode()
        return self._bytes[token_id]

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")


def completion_logprobs(tokens: TokenText, token_ids: list[int],
                        logprobs: list[dict[int, float] | None],
                        text_offset: int) -> dict[str, Any]:
    """OpenAI completions shape; ``text_offset`` is where the first token's text starts. A
    prompt's first token has no logprob (None): nothing precedes it."""
    texts = [tokens.text_of(t) for t in token_ids]
    offsets = []
    for text in texts:
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [None if lp is None else lp[t] for t, lp in zip(token_ids, logprobs)],
        "top_logprobs": [None if lp is None else {tokens.text_of(t): v for t, v in _ranked(lp)}
                         for lp in logprobs],
        "text_offset": offsets,
    }


def chat_logprobs(tokens: TokenText, token_ids: list[int], logprobs: list[dict[int, float]],
                  num_top: int) -> dict[str, Any]:
    """OpenAI chat shape: ``{"content": [{token, logprob, bytes, top_logprobs}, ...]}``."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tokens.text_of(token_id), "logprob": logprob,
                "bytes": list(tokens.bytes_of(token_id))}

    return {"content": [
        {**entry(t, lp[t]), "top_logprobs": [entry(i, v) for i, v in _ranked(lp)[:num_top]]}
        for t, lp in zip(token_ids, logprobs)
    ]}


def vllm_prompt_logprobs(tokens: TokenText, logprobs: list[dict[int, float] | None]
                         ) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token, None for the first, else token id ->
    ``{"logprob", "rank", "decoded_token"}`` for the token itself and the top k (rank: its
    place among these, 1 = most likely)."""
    return [None if lp is None else {
        str(t): {"logprob": v, "rank": rank, "decoded_token": tokens.text_of(t)}
        for rank, (t, v) in enumerate(_ranked(lp), 1)} for lp in logprobs]


def _ranked(logprobs: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda item: -item[1])

"""What a request must pass before it is queued: the server's limits, its token ids, and the
cache salt of its tenant. Everything here runs in a worker thread (``prepare`` of each route),
never on the event loop: it tokenizes and scans token ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Sequence

from kvserve.model.tokenizer import Tokenizer
from kvserve.sampling_params import SamplingParams
from kvserve.server.config import ServerConfig
from kvserve.server.errors import APIError


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """``Tokenizer.encode``, letting go of the GIL while the Rust side works (its
    ``encode_batch`` does; ``encode`` holds it), so a long prompt tokenized in a worker thread
    does not stall the event loop. Same ids (tests/server/test_limits.py checks)."""
    [encoding] = tokenizer.backend.encode_batch([text], add_special_tokens=False)
    ids = encoding.ids
    bos = tokenizer.bos_token_id
    if add_special_tokens and tokenizer.add_bos_token and bos is not None:
        return [bos, *ids]
    return ids


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """The most characters one token stands for: a text longer than this times the context
    cannot fit, so it is refused without tokenizing it."""
    return max(len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.vocab_size)) or 1


def tenant_salt(api_key: str) -> str:
    """A keyed hash of the API key: stable across restarts (the disk tier stays useful), and
    no client can choose it; every cache salt of an isolated tenant starts with it."""
    return hmac.new(api_key.encode(), b"kvserve tenant cache salt", hashlib.sha256).hexdigest()


def salted(params: SamplingParams, tenant: str | None) -> SamplingParams:
    """The params with the tenant's salt before the client's own (if any): the tenant part has
    a fixed length, so no client salt can name another tenant's blocks."""
    if tenant is None:
        return params
    salt = tenant if params.cache_salt is None else f"{tenant}:{params.cache_salt}"
    return dataclasses.replace(params, cache_salt=salt)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """Before anything detokenizes them (echo) or queues them."""
    if any(not 0 <= t < vocab_size for t in ids):
        raise APIError(400, f"{param} token ids must be in [0, {vocab_size})", param)


def check_shape(config: ServerConfig, n: int, stop: Sequence[str] | None,
                num_prompts: int = 1) -> None:
    """The limits that need no tokens: n, stop strings, prompts per request."""
    if n > config.max_n:
        raise APIError(400, f"n is {n}; this server gives at most {config.max_n} choices per "
                            f"request (--max-n)", "n")
    stop = stop or ()
    if len(stop) > config.max_stop_strings:
        raise APIError(400, f"stop has {len(stop)} strings; this server takes at most "
                            f"{config.max_stop_strings} (--max-stop-strings)", "stop")
    longest = max(map(len, stop), default=0)
    if longest > config.max_stop_length:
        raise APIError(400, f"stop has a string of {longest} characters; this server takes at "
                            f"most {config.max_stop_length} (--max-stop-length)", "stop")
    if num_prompts > config.max_prompts:
        raise APIError(400, f"prompt holds {num_prompts} prompts; this server takes at most "
                            f"{config.max_prompts} per request (--max-prompts)", "prompt")


def check_cost(config: ServerConfig, prompts: list[list[int]], params: list[SamplingParams],
               n: int, max_tokens_param: str, no_cache_param: str) -> None:
    """The limits on the work a request asks for: tokens generated, and the quadratic work
    of a request without a KV cache."""
    total = n * sum(p.max_tokens for p in params)
    if total > config.max_request_tokens:
        biggest = max(p.max_tokens for p in params)
        raise APIError(
            400, f"{len(prompts)} prompt(s) x n ({n}) x {max_tokens_param} (up to {biggest}) = "
                 f"{total} tokens is more than this server generates for one request "
                 f"({config.max_request_tokens}, --max-request-tokens); lower n or "
                 f"{max_tokens_param}", max_tokens_param)
    for ids, p in zip(prompts, params):
        length = len(ids) + p.max_tokens
        if not p.use_kv_cache and length > config.max_no_cache_tokens:
            raise APIError(
                400, f"without a KV cache every token recomputes the whole sequence, so prompt "
                     f"({len(ids)} tokens) + {max_tokens_param} ({p.max_tokens}) = {length} is "
                     f"limited to {config.max_no_cache_tokens} (--max-no-cache-tokens); "
                     f"shorten it or use the KV cache", no_cache_param)


def default_max_tokens(config: ServerConfig, room: int, num_prompt_tokens: int,
                       num_choices: int, use_kv_cache: bool) -> int:
    """``max_tokens`` when a request sets none: what is left of the context (``room``),
    within the server's limits."""
    most = min(room, config.max_request_tokens // num_choices)
    if not use_kv_cache:
        most = min(most, config.max_no_cache_tokens - num_prompt_tokens)
    return max(1, most)

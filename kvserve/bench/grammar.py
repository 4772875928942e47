"""`kvserve bench grammar`: what a grammar engine costs on this CPU and this vocabulary.

For a JSON schema with nested objects, arrays, enums, a number range and a pattern: the time
to compile it (and, once, to index the vocabulary), and the time to compute each token's
mask while walking a valid document token by token. llguidance is what kvserve uses;
xgrammar is measured beside it when it is importable (it is not a dependency).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from kvserve.bench.common import console, environment, write_json

NAME = "grammar"
HELP = "grammar engines: compile time and per-token mask time on a JSON schema"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {
        "street": {"type": "string"}, "city": {"type": "string"},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "city"]},
    "status": {"enum": ["active", "inactive", "banned"]}, "score": {"type": "number"}},
    "required": ["name", "age", "tags", "address", "status"], "additionalProperties": False}
DOC = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com",
       "tags": ["math", "engines", "poetry"],
       "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"},
       "status": "active", "score": 9.5}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result to this JSON file")


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def llguidance_run(tokenizer, vocab_size: int, ids: list[int]) -> dict:
    import llguidance
    import torch

    from kvserve.structured.grammar import JSON_OPTIONS

    lltok, index_s = _timed(lambda: llguidance.LLTokenizer(
        tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(tokenizer.eos_token_ids)))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                            defaults=JSON_OPTIONS)
    matcher, compile_s = _timed(lambda: llguidance.LLMatcher(lltok, grammar))
    bitmask = torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    times = []
    for token in [*ids, None]:
        _, s = _timed(lambda: matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(),
                                                              bitmask.numel() * 4))
        times.append(s)
        if token is not None and not matcher.consume_token(token):
            raise RuntimeError(matcher.get_error())
    return {"vocab_index_s": index_s, "compile_s": compile_s, **_mask_figures(times)}


def xgrammar_run(tokenizer, vocab_size: int, ids: list[int]) -> dict | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    vocab = [tokenizer.backend.id_to_token(i) or "" for i in range(vocab_size)]
    info, index_s = _timed(lambda: xgr.TokenizerInfo(
        vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
        stop_token_ids=list(tokenizer.eos_token_ids)))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiled, compile_s = _timed(lambda: compiler.compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    times = []
    for token in [*ids, None]:
        _, s = _timed(lambda: matcher.fill_next_token_bitmask(bitmask, 0))
        times.append(s)
        if token is not None and not matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}")
    return {"vocab_index_s": index_s, "compile_s": compile_s, **_mask_figures(times)}


def _mask_figures(times: list[float]) -> dict:
    return {"mask_ms_median": 1000 * statistics.median(times),
            "mask_ms_mean": 1000 * statistics.mean(times), "mask_ms_max": 1000 * max(times)}


def run(args: argparse.Namespace) -> dict:
    from kvserve.model.loader import load_checkpoint

    checkpoint = load_checkpoint(args.model)
    tokenizer, vocab_size = checkpoint.tokenizer, checkpoint.config.vocab_size
    ids = tokenizer.encode(json.dumps(DOC), add_special_tokens=False)
    result = {"vocab_size": vocab_size, "doc_tokens": len(ids),
              "llguidance": llguidance_run(tokenizer, vocab_size, ids),
              "xgrammar": xgrammar_run(tokenizer, vocab_size, ids), "env": environment(args)}
    for engine in ("llguidance", "xgrammar"):
        r = result[engine]
        if r is None:
            console.print(f"{engine}: not installed")
            continue
        console.print(f"{engine}: vocabulary index {r['vocab_index_s']:.3f} s, compile "
                      f"{1000 * r['compile_s']:.1f} ms, mask per token median "
                      f"{r['mask_ms_median']:.3f} ms, mean {r['mask_ms_mean']:.3f} ms, max "
                      f"{r['mask_ms_max']:.2f} ms ({len(ids) + 1} masks, vocab {vocab_size})")
    write_json(args.json, result)
    return result

"""`kvserve bench kv-dtype`: what each KV cache dtype holds in the same memory, and how fast
it decodes.

Capacity: with one ``--kv-cache-memory``, distinct prefixes are prefilled one at a time, then
each is probed for how many of its blocks are still in the pool; then every prefix is asked
a question again, round robin, and the prefix-cache hit rate is read. Speed: concurrent
requests with long contexts, output tokens per second of the decode phase.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

from rich.table import Table

from kvserve.bench.common import console, environment, write_json

NAME = "kv-dtype"
HELP = "KV cache dtypes side by side: prefixes held in the same memory, hit rate, decode speed"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-dtypes", default="float32,bfloat16,int8",
                   help="KV cache dtypes of the capacity part, comma-separated")
    p.add_argument("--prefixes", type=int, default=12, help="distinct prefixes (capacity)")
    p.add_argument("--prefix-len", type=int, default=512, help="tokens per prefix")
    p.add_argument("--capacity-kv-memory", default="96MiB",
                   help="--kv-cache-memory of the capacity part: small enough that the float "
                        "caches cannot hold every prefix")
    p.add_argument("--speed-kv-dtypes", default="bfloat16,int8",
                   help="KV cache dtypes of the speed part ('' skips it)")
    p.add_argument("--speed-requests", type=int, default=16, help="concurrent requests (speed)")
    p.add_argument("--speed-context", type=int, default=2048, help="prompt tokens (speed)")
    p.add_argument("--speed-tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--speed-kv-memory", default="2GiB", help="--kv-cache-memory of the speed "
                                                             "part")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result to this JSON file")


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def capacity(llm, prefixes: list[list[int]], params) -> dict:
    """Prefill each prefix once, count the ones wholly kept, then ask each again."""
    from kvserve.engine.request import Request

    for p in prefixes:
        llm.generate([p], params, use_tqdm=False)
    kv, block_size = llm.engine.kv, llm.engine.config.block_size
    full = [len(p) // block_size for p in prefixes]
    kept = [kv.num_cached_blocks(Request(f"probe-{i}", p, params))
            for i, p in enumerate(prefixes)]
    before = llm.cache_stats()
    questions = [p + [13, 42 + i] for i, p in enumerate(prefixes)]
    for q in questions:
        llm.generate([q], params, use_tqdm=False)
    after = llm.cache_stats()
    hit_tokens = after["num_hit_tokens"] - before["num_hit_tokens"]
    query_tokens = after["num_query_tokens"] - before["num_query_tokens"]
    stats = llm.stats()
    return {"kv_bytes_per_token": stats["kv_bytes_per_token"],
            "pool_tokens": stats["kv_blocks_total"] * block_size,
            "prefixes_kept": sum(k == f for k, f in zip(kept, full)),
            "hit_rate_second_pass": hit_tokens / query_tokens}


def speed(llm, prompts: list[list[int]], params) -> dict:
    """Output tokens per second once every request has its first token (the decode phase),
    and over the whole run."""
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)  # a progress bar: this part is long
    total = time.perf_counter() - start
    first = max(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.finish_time for o in outs)
    decoded = sum(len(o.token_ids) - 1 for o in outs)
    return {"decode_tok_s": decoded / (last - first),
            "output_tok_s": sum(len(o.token_ids) for o in outs) / total, "total_s": total,
            "token_ids": [o.token_ids for o in outs]}


def run(args: argparse.Namespace) -> dict:
    from kvserve.config import EngineConfig
    from kvserve.engine.llm import LLM
    from kvserve.model.loader import load_checkpoint
    from kvserve.sampling_params import SamplingParams
    from kvserve.units import parse_size

    config = EngineConfig.from_cli(args)
    checkpoint = load_checkpoint(config.model)
    vocab = checkpoint.config.vocab_size
    capacity_memory = parse_size(args.capacity_kv_memory)
    result: dict = {"env": environment(args), "kv_cache_memory": capacity_memory,
                    "prefix_len": args.prefix_len, "prefixes": args.prefixes,
                    "capacity": {}, "speed": {}}
    prefixes = random_prompts(args.prefixes, args.prefix_len, vocab, args.seed)
    one = SamplingParams(max_tokens=1, temperature=0)
    for kv_dtype in filter(None, args.kv_dtypes.split(",")):
        llm = LLM(checkpoint, config=dataclasses.replace(
            config, kv_cache_dtype=kv_dtype, num_exact_repeats=0,
            kv_cache_memory=capacity_memory))
        with console.status(f"capacity, {kv_dtype} KV..."):
            c = result["capacity"][kv_dtype] = capacity(llm, prefixes, one)
        console.print(f"capacity, {kv_dtype} KV: {c['pool_tokens']:,} tokens, "
                      f"{c['prefixes_kept']} of {args.prefixes} prefixes kept")
        del llm
    prompts = random_prompts(args.speed_requests, args.speed_context, vocab, args.seed + 1)
    params = SamplingParams(max_tokens=args.speed_tokens, temperature=0, ignore_eos=True)
    for kv_dtype in filter(None, args.speed_kv_dtypes.split(",")):
        llm = LLM(checkpoint, config=dataclasses.replace(
            config, kv_cache_dtype=kv_dtype, kv_cache_memory=parse_size(args.speed_kv_memory)))
        llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up
        console.print(f"speed, {kv_dtype} KV: {len(prompts)} requests of "
                      f"{args.speed_context} prompt tokens...")
        s = result["speed"][kv_dtype] = speed(llm, prompts, params)
        console.print(f"  decode {s['decode_tok_s']:.1f} tok/s, whole run "
                      f"{s['output_tok_s']:.1f} tok/s in {s['total_s']:.0f} s")
        del llm
    print_tables(result, args)
    for s in result["speed"].values():
        s.pop("token_ids")
    write_json(args.json, result)
    return result


def print_tables(r: dict, args: argparse.Namespace) -> None:
    cap = r["capacity"]
    if cap:
        base = next(iter(cap.values()))
        t = Table(title=f"the same --kv-cache-memory ({r['kv_cache_memory']:,} B): "
                        f"{r['prefixes']} prefixes of {r['prefix_len']} tokens")
        for col in ("KV dtype", "bytes/token", "tokens held", "vs first", "prefixes kept",
                    "hit rate, 2nd pass"):
            t.add_column(col, justify="right")
        for name, c in cap.items():
            t.add_row(name, f"{c['kv_bytes_per_token']:,}", f"{c['pool_tokens']:,}",
                      f"{c['pool_tokens'] / base['pool_tokens']:.2f}x",
                      f"{c['prefixes_kept']} / {r['prefixes']}",
                      f"{c['hit_rate_second_pass']:.0%}")
        console.print(t)
    spd = r["speed"]
    if spd:
        base = next(iter(spd.values()))
        t = Table(title=f"{args.speed_requests} concurrent requests, {args.speed_context}-token "
                        f"prompts, {args.speed_tokens} new tokens each")
        for col in ("KV dtype", "decode tok/s", "vs first", "output tok/s (whole run)",
                    "tokens equal to first"):
            t.add_column(col, justify="right")
        for name, s in spd.items():
            same = sum(a == b for a, b in zip(s["token_ids"], base["token_ids"]))
            s["requests_equal_to_first"] = same
            t.add_row(name, f"{s['decode_tok_s']:.1f}",
                      f"{s['decode_tok_s'] / base['decode_tok_s']:.2f}x",
                      f"{s['output_tok_s']:.1f}", f"{same} / {len(s['token_ids'])}")
        console.print(t)

"""`kvserve bench replicas`: two replicas, one shared prefix each time, the remote tier on vs
off. Replica A computes a prefix; replica B then gets the same prefix with another question.
With the remote tier, B loads the prefix's blocks from the store instead of computing them."""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from rich.table import Table

from kvserve.bench.client import BenchError
from kvserve.bench.common import console, environment, median, write_json

NAME = "replicas"
HELP = ("two replicas sharing a Redis/Valkey KV tier: time to first token of a prefix the "
        "other replica computed, remote tier on vs off")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-len", type=int, default=512, help="tokens per shared prefix")
    p.add_argument("--prefixes", type=int, default=8,
                   help="prefixes, each computed on one replica and then sent to the other")
    p.add_argument("--max-tokens", type=int, default=8, help="new tokens per request")
    p.add_argument("--store", default=None, metavar="URL",
                   help="the Redis or Valkey to share (default: start redis-server on a free "
                        "local port for the run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prefixes")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result to this JSON file")


@contextmanager
def local_store(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        raise BenchError("no redis-server or valkey-server found: install one, or give --store")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def run(args: argparse.Namespace) -> dict:
    from kvserve.config import EngineConfig
    from kvserve.engine.llm import LLM
    from kvserve.model.loader import load_checkpoint
    from kvserve.model.quant import resolve_quantization
    from kvserve.sampling_params import SamplingParams

    config = EngineConfig.from_cli(args)
    checkpoint = load_checkpoint(config.model, resolve_quantization(config.quantization,
                                                                    _device(config.device)))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    rng = random.Random(args.seed)
    vocab = checkpoint.config.vocab_size
    result: dict = {"prefix_len": args.prefix_len, "prefixes": args.prefixes, "modes": {},
                    "env": environment(args)}
    console.print(f"[bold]kvserve bench {NAME}[/bold]: {args.prefixes} prefixes of "
                  f"{args.prefix_len} tokens, each computed on replica A, then sent to B")
    with local_store(args.store) as url:
        for mode, remote in (("remote off", None), ("remote on", url)):
            a, b = (LLM(checkpoint, config=replace(config, kv_remote=remote)) for _ in "ab")
            cold, other, hit = [], [], []
            for _ in range(args.prefixes):
                prefix = [rng.randrange(100, vocab - 100) for _ in range(args.prefix_len)]
                first = a.generate([prefix + [13, 42]], params, use_tqdm=False)[0]
                if remote:
                    a.engine.kv.tiers.remote.flush()  # written behind; B asks a moment later
                second = b.generate([prefix + [13, 77]], params, use_tqdm=False)[0]
                cold.append(first.metrics.ttft)
                other.append(second.metrics.ttft)
                hit.append(second.cached_tokens_by_tier.get("remote", 0))
            result["modes"][mode] = {"ttft_a_ms": median(cold) * 1000,
                                     "ttft_b_ms": median(other) * 1000,
                                     "remote_hit_tokens_b": median(hit)}
    off, on = result["modes"]["remote off"], result["modes"]["remote on"]
    result["speedup_b"] = off["ttft_b_ms"] / on["ttft_b_ms"]
    table = Table(title="time to first token, p50 (ms)")
    for column in ("", "A: computes the prefix", "B: same prefix, other replica",
                   "B: tokens from the store"):
        table.add_column(column, justify="right")
    for mode, m in result["modes"].items():
        table.add_row(mode, f"{m['ttft_a_ms']:.1f}", f"{m['ttft_b_ms']:.1f}",
                      f"{m['remote_hit_tokens_b']:.0f}")
    console.print(table)
    console.print(f"B's time to first token with the remote tier: {result['speedup_b']:.1f}x "
                  f"faster")
    write_json(args.json, result)
    return result


def _device(name: str):
    from kvserve.engine.engine import resolve_device

    return resolve_device(name)

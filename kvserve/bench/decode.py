"""`kvserve bench decode`: single-stream decode speed against transformers and the memory
bandwidth limit, on the same weights and prompt in one run."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import torch
from rich.table import Table

from kvserve.bench.common import (
    console,
    environment,
    median,
    run_transformers_peer,
    transformers_model,
    write_json,
)

NAME = "decode"
HELP = "single-stream decode tokens/s and TTFT vs transformers and the bandwidth limit"
PROMPT = "Write a short story about a robot who learns to paint."


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=200, help="new tokens per run")
    p.add_argument("--runs", type=int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers run")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result to this JSON file")


def copy_bandwidth_gb_s(num_bytes: int = 1 << 28) -> float:
    """Read + write bytes per second of a large tensor copy (the best of a few)."""
    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best / 1e9


def weight_bytes_per_token(config, dtype: str) -> int:
    """Every weight is read once per decode step; the LM head reads the whole vocabulary
    matrix (tied or not), the embedding lookup a single row (ignored)."""
    from kvserve.model.config import DTYPE_BYTES
    from kvserve.model.loader import expected_tensor_shapes

    shapes = expected_tensor_shapes(config)
    shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    del shapes["model.embed_tokens.weight"]
    return sum(math.prod(s) for s in shapes.values()) * DTYPE_BYTES[dtype]


def ours(llm, ids: list[int], max_tokens: int, runs: int) -> dict:
    from kvserve.sampling_params import SamplingParams

    # Runs repeat one prompt: prefix caching would serve its prefill, so it is off here.
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                            use_prefix_cache=False)
    llm.generate([ids], SamplingParams(max_tokens=8, temperature=0, use_prefix_cache=False),
                 use_tqdm=False)
    outs = [llm.generate([ids], params, use_tqdm=False)[0] for _ in range(runs)]
    decode = [(len(o.token_ids) - 1) / (o.metrics.finish_time - o.metrics.first_token_time)
              for o in outs]
    return {"decode_tokens_per_s": median(decode), "ttft_s": median([o.metrics.ttft for o in outs])}


def transformers_run(model_path, dtype: str, ids: list[int], max_tokens: int, runs: int) -> dict:
    model = transformers_model(model_path, dtype)
    x = torch.tensor([ids])

    def timed(n: int) -> float:
        start = time.perf_counter()
        model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    with torch.inference_mode():
        timed(8)
        ttft = median([timed(1) for _ in range(runs)])
        total = median([timed(max_tokens) for _ in range(runs)])
    return {"decode_tokens_per_s": (max_tokens - 1) / (total - ttft), "ttft_s": ttft}


def run(args: argparse.Namespace) -> dict:
    from kvserve.config import EngineConfig
    from kvserve.engine.llm import LLM
    from kvserve.model.quant import quantized_nbytes

    start = time.perf_counter()
    llm = LLM(config=EngineConfig.from_cli(args))
    load_s = time.perf_counter() - start
    tokenizer = llm.tokenizer  # a base model (Gemma 3 270M) has no chat template
    ids = (tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
           if tokenizer.chat_template else tokenizer.encode(PROMPT))
    console.print(f"[bold]kvserve bench decode[/bold]: dtype {args.dtype}, device "
                  f"{llm.engine.device}, {torch.get_num_threads()} threads, {len(ids)} prompt "
                  f"tokens, {args.max_tokens} new tokens, model load {load_s:.2f} s")
    bandwidth = copy_bandwidth_gb_s()
    weight_bytes = weight_bytes_per_token(llm.engine.model_config, args.dtype)
    native_bytes = quantized_nbytes(llm.engine.runner.model)
    with console.status("kvserve..."):
        mine = ours(llm, ids, args.max_tokens, args.runs)
    mine["weights"] = llm.engine.weights
    mine["bandwidth_share"] = ((native_bytes or weight_bytes) * mine["decode_tokens_per_s"]
                               / (bandwidth * 1e9))
    result = {"dtype": args.dtype, "prompt_tokens": len(ids), "new_tokens": args.max_tokens,
              "bandwidth_gb_s": bandwidth, "weight_bytes_per_token": weight_bytes,
              "load_s": load_s, "kvserve": mine, "kvserve_dequantized": None,
              "transformers": None, "speedup_vs_transformers": None, "env": environment(args)}
    if native_bytes:  # the same file dequantized to --dtype, in the same run
        del llm
        dequantized = LLM(config=replace(EngineConfig.from_cli(args), quantization="none"))
        with console.status("kvserve, dequantized..."):
            result["kvserve_dequantized"] = ours(dequantized, ids, args.max_tokens, args.runs)
        del dequantized
    if not args.no_transformers:
        theirs = run_transformers_peer("transformers", lambda: transformers_run(
            args.model, args.dtype, ids, args.max_tokens, args.runs))
        if theirs:
            result["transformers"] = theirs
            result["speedup_vs_transformers"] = (mine["decode_tokens_per_s"]
                                                 / theirs["decode_tokens_per_s"])
    print_table(result)
    write_json(args.json, result)
    return result


def print_table(r: dict) -> None:
    t = Table(title=f"single-stream decode, {r['dtype']}")
    for col in ("engine", "decode tokens/s", "TTFT", "share of bandwidth limit"):
        t.add_column(col, justify="right")
    limit = r["bandwidth_gb_s"] * 1e9 / r["weight_bytes_per_token"]
    k = r["kvserve"]
    t.add_row(f"kvserve ({k['weights']})", f"{k['decode_tokens_per_s']:.1f}",
              f"{k['ttft_s'] * 1000:.0f} ms", f"{k['bandwidth_share']:.0%}")
    if r.get("kvserve_dequantized"):
        d = r["kvserve_dequantized"]
        t.add_row(f"kvserve (dequantized, {r['dtype']})", f"{d['decode_tokens_per_s']:.1f}",
                  f"{d['ttft_s'] * 1000:.0f} ms", f"{d['decode_tokens_per_s'] / limit:.0%}")
    if r["transformers"]:
        h = r["transformers"]
        t.add_row("transformers", f"{h['decode_tokens_per_s']:.1f}", f"{h['ttft_s'] * 1000:.0f} ms",
                  f"{h['decode_tokens_per_s'] / limit:.0%}")
    t.add_row("bandwidth limit", f"{limit:.1f}", "", "100%")
    console.print(t)
    console.print(f"Copy bandwidth {r['bandwidth_gb_s']:.1f} GB/s; each token reads "
                  f"{r['weight_bytes_per_token'] / 1e6:.0f} MB of weights.")
    if r["speedup_vs_transformers"]:
        console.print(f"kvserve decodes [bold]{r['speedup_vs_transformers']:.2f}x[/bold] "
                      f"as fast as transformers.")

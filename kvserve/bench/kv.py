"""`kvserve bench kv`: one prompt generated with the KV cache and without it."""

from __future__ import annotations

import argparse

from rich.table import Table

from kvserve.bench.common import console, environment, median, write_json
from kvserve.units import format_size

NAME = "kv"
HELP = "KV cache vs no cache on one prompt: time, TTFT, work and memory"
DEFAULT_PROMPT = "Explain in simple terms why the sky is blue."


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help="the prompt, wrapped in the chat template")
    p.add_argument("--max-tokens", type=int, default=50,
                   help="new tokens per run")
    p.add_argument("--runs", type=int, default=3,
                   help="timed runs per mode (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per mode first")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result to this JSON file")


def measure(llm, prompt_ids: list[int], max_tokens: int, use_kv_cache: bool, runs: int,
            warmup: int) -> tuple[dict, list[int]]:
    from kvserve.sampling_params import SamplingParams

    # Each run repeats the same prompt: prefix caching would serve it, so it is off here.
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                            use_prefix_cache=False,
                            use_kv_cache=use_kv_cache)
    for _ in range(warmup):
        llm.generate([prompt_ids], params, use_tqdm=False)
    outs = [llm.generate([prompt_ids], params, use_tqdm=False)[0] for _ in range(runs)]
    totals = [o.metrics.finish_time - o.metrics.arrival_time for o in outs]
    n = len(outs[0].token_ids)
    result = {
        "total_s": median(totals),
        "s_per_token": median(totals) / n,
        "tokens_per_s": n / median(totals),
        "ttft_s": median([o.metrics.ttft for o in outs]),
        "kv_work": outs[0].work_tokens,
        "kv_bytes_peak": outs[0].kv_bytes_peak,
    }
    return result, outs[0].token_ids


def run(args: argparse.Namespace) -> dict:
    from kvserve.config import EngineConfig
    from kvserve.engine.llm import LLM

    llm = LLM(config=EngineConfig.from_cli(args))
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    console.print(f"[bold]kvserve bench kv[/bold]: model {args.model or 'SmolLM2-135M (default)'}"
                  f", device {llm.engine.device}, dtype {args.dtype}, {len(ids)} prompt tokens, "
                  f"{args.max_tokens} new tokens, {args.runs} runs (+{args.warmup} warmup)")
    with console.status("with the KV cache..."):
        cached, cached_ids = measure(llm, ids, args.max_tokens, True, args.runs, args.warmup)
    with console.status("without the KV cache (recomputing everything each step)..."):
        nocache, nocache_ids = measure(llm, ids, args.max_tokens, False, args.runs, args.warmup)
    result = {
        "prompt_tokens": len(ids), "new_tokens": len(cached_ids), "runs": args.runs,
        "identical_tokens": cached_ids == nocache_ids,
        "speedup": nocache["total_s"] / cached["total_s"],
        "kv_cache": cached, "no_cache": nocache, "env": environment(args),
    }
    print_table(result)
    write_json(args.json, result)
    return result


def print_table(r: dict) -> None:
    c, n = r["kv_cache"], r["no_cache"]
    t = Table(title="KV cache vs no cache (medians)")
    t.add_column("metric")
    t.add_column("KV cache", style="green", justify="right")
    t.add_column("no cache", style="red", justify="right")
    t.add_column("no cache / KV cache", style="bold", justify="right")
    rows = [("total time", "total_s", lambda v: f"{v:.3f} s"),
            ("time per token", "s_per_token", lambda v: f"{v * 1000:.1f} ms"),
            ("tokens/s", "tokens_per_s", lambda v: f"{v:.1f}"),
            ("TTFT", "ttft_s", lambda v: f"{v * 1000:.0f} ms"),
            ("KV work (token positions)", "kv_work", lambda v: f"{v:,}"),
            ("peak KV memory", "kv_bytes_peak", format_size)]
    for label, key, fmt in rows:
        ratio = n[key] / c[key] if c[key] else float("nan")
        t.add_row(label, fmt(c[key]), fmt(n[key]), f"{ratio:.2f}x")
    console.print(t)
    same = "[green]identical[/green]" if r["identical_tokens"] else "[red]DIFFERENT[/red]"
    console.print(f"Tokens: {same} in both modes. Speedup from the KV cache: "
                  f"[bold]{r['speedup']:.2f}x[/bold].")
    p, k = r["prompt_tokens"], r["new_tokens"]
    console.print(f"Without a cache every step recomputes K/V for the whole sequence "
                  f"({n['kv_work']:,} positions = sum of {p}+i for i < {k}); with it each position "
                  f"is computed once ({c['kv_work']:,} = {p}+{k}-1). The gap grows with length.")

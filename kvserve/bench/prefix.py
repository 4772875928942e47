"""`kvserve bench prefix`: long shared prefixes with short questions, prefix caching on vs off."""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace

from rich.table import Table

from kvserve.bench.common import console, write_json

NAME = "prefix"
HELP = "shared-prefix workload with prefix caching on and off: TTFT cold, warm and repeat"
QUESTIONS = ["What is this document about?", "Summarise it in one line.", "Who wrote it?",
             "List the key terms.", "What is the main risk?", "Give one example.",
             "What comes next?", "Is anything missing?"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefixes", type=int, default=4, help="distinct shared prefixes")
    p.add_argument("--prefix-len", type=int, default=512, help="tokens per shared prefix")
    p.add_argument("--questions", type=int, default=8, help="questions asked after each prefix")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prefixes")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result to this JSON file")
    p.add_argument("--plot", default=None, metavar="PATH.png",
                   help="also draw the result to this PNG file")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def workload(tokenizer, args) -> list[tuple[int, list[int]]]:
    """(prefix index, prompt ids), the questions of all prefixes interleaved."""
    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(100, tokenizer.vocab_size - 100) for _ in range(args.prefix_len)]
                for _ in range(args.prefixes)]
    questions = [tokenizer.encode(" " + QUESTIONS[i % len(QUESTIONS)] + f" ({i})")
                 for i in range(args.questions)]
    return [(p, prefixes[p] + questions[q]) for q in range(args.questions)
            for p in range(args.prefixes)]


def run_one_by_one(llm, prompts: list[list[int]], params) -> tuple[list, float]:
    start = time.perf_counter()
    outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    return outs, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    from kvserve.config import EngineConfig
    from kvserve.engine.llm import LLM
    from kvserve.model.loader import load_checkpoint
    from kvserve.sampling_params import SamplingParams

    config = EngineConfig.from_cli(args)
    checkpoint = load_checkpoint(config.model)
    on = LLM(checkpoint, config=replace(config, enable_prefix_caching=True))
    off = LLM(checkpoint, config=replace(config, enable_prefix_caching=False))
    items = workload(on.tokenizer, args)
    prompts = [ids for _, ids in items]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    console.print(f"[bold]kvserve bench prefix[/bold]: {args.prefixes} prefixes x "
                  f"{args.prefix_len} tokens, {args.questions} questions each (interleaved, one "
                  f"request at a time), {args.max_tokens} new tokens, dtype {args.dtype}")
    on.generate([prompts[0][:8]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up
    off.generate([prompts[0][:8]], SamplingParams(max_tokens=2), use_tqdm=False)
    on.clear_cache()
    with console.status("prefix caching off..."):
        off_outs, off_total = run_one_by_one(off, prompts, params)
    computed_before = on.stats()["prompt_work_tokens"]
    with console.status("prefix caching on..."):
        on_outs, on_total = run_one_by_one(on, prompts, params)
    computed = on.stats()["prompt_work_tokens"] - computed_before
    stats = on.cache_stats()
    with console.status("exact repeats..."):
        repeats, _ = run_one_by_one(on, prompts[: args.prefixes], params)
    cold = [o.metrics.ttft for o in on_outs[: args.prefixes]]
    warm = [o.metrics.ttft for o in on_outs[args.prefixes :]] or cold
    off_ttft = [o.metrics.ttft for o in off_outs]
    same = ([o.token_ids for o in on_outs] == [o.token_ids for o in off_outs]
            and [o.token_ids for o in repeats] == [o.token_ids for o in on_outs[: args.prefixes]])
    result = {
        "prefix_len": args.prefix_len, "prefixes": args.prefixes, "questions": args.questions,
        "identical_tokens": same,
        "on": {"ttft_cold_p50_s": statistics.median(cold),
               "ttft_warm_p50_s": statistics.median(warm),
               "ttft_warm_p95_s": percentile(warm, 95),
               "ttft_repeat_p50_s": statistics.median(o.metrics.ttft for o in repeats),
               "prompt_tokens_computed": computed,
               "prompt_tokens_saved": stats["tokens_saved"],
               "hit_rate": stats["token_hit_rate"], "total_s": on_total},
        "off": {"ttft_p50_s": statistics.median(off_ttft), "ttft_p95_s": percentile(off_ttft, 95),
                "prompt_tokens_computed": sum(len(p) for p in prompts), "total_s": off_total},
    }
    print_table(result)
    write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    return result


def print_table(r: dict) -> None:
    on, off = r["on"], r["off"]
    t = Table(title="prefix caching on vs off")
    t.add_column("metric")
    t.add_column("on", style="green", justify="right")
    t.add_column("off", style="red", justify="right")
    t.add_column("off / on", style="bold", justify="right")

    def ms(v: float) -> str:
        return f"{v * 1000:.1f} ms"

    t.add_row("TTFT p50, first question (cold)", ms(on["ttft_cold_p50_s"]), ms(off["ttft_p50_s"]),
              f"{off['ttft_p50_s'] / on['ttft_cold_p50_s']:.1f}x")
    t.add_row("TTFT p50, later questions (warm)", ms(on["ttft_warm_p50_s"]),
              ms(off["ttft_p50_s"]), f"{off['ttft_p50_s'] / on['ttft_warm_p50_s']:.1f}x")
    t.add_row("TTFT p95, warm", ms(on["ttft_warm_p95_s"]), ms(off["ttft_p95_s"]),
              f"{off['ttft_p95_s'] / on['ttft_warm_p95_s']:.1f}x")
    t.add_row("TTFT p50, exact repeat", ms(on["ttft_repeat_p50_s"]), ms(off["ttft_p50_s"]),
              f"{off['ttft_p50_s'] / on['ttft_repeat_p50_s']:.0f}x")
    t.add_row("prompt tokens computed", f"{on['prompt_tokens_computed']:,}",
              f"{off['prompt_tokens_computed']:,}",
              f"{off['prompt_tokens_computed'] / max(1, on['prompt_tokens_computed']):.1f}x")
    t.add_row("total time", f"{on['total_s']:.2f} s", f"{off['total_s']:.2f} s",
              f"{off['total_s'] / on['total_s']:.1f}x")
    console.print(t)
    console.print(f"Tokens identical with and without prefix caching: {r['identical_tokens']}. "
                  f"{on['prompt_tokens_saved']:,} prompt tokens came from cached blocks "
                  f"(hit rate {on['hit_rate']:.0%}); an exact repeat samples its first token "
                  f"from kept logits without a forward pass.")


def plot(r: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("[yellow]matplotlib is not installed: no plot (pip install matplotlib)")
        return
    labels = ["off", "on: cold", "on: warm", "on: exact repeat"]
    values = [r["off"]["ttft_p50_s"], r["on"]["ttft_cold_p50_s"], r["on"]["ttft_warm_p50_s"],
              r["on"]["ttft_repeat_p50_s"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, [v * 1000 for v in values], color=["#c44", "#888", "#4a4", "#26a"])
    ax.bar_label(bars, fmt="%.1f ms")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title(f"TTFT with a {r['prefix_len']}-token shared prefix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    console.print(f"[dim]wrote {path}[/dim]")

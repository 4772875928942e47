"""`kvserve bench sweep`: the work meter's formula over many lengths, and measured times that
follow it.

With a KV cache, a prompt of P tokens and n new tokens computes K/V for P + n - 1 positions in
n forward passes; without one, every pass recomputes the whole sequence: the sum of P + i for
i < n, that is nP + n(n - 1)/2. The measured part times a few points on the real model and
fits time = a * positions + b * passes.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.progress import Progress
from rich.table import Table

from kvserve.bench.client import BenchError
from kvserve.bench.common import console, environment, write_json
from kvserve.bench.report import command_line
from kvserve.bench.serve import load_pyplot, save_figure
from kvserve.units import format_size

NAME = "sweep"
HELP = "KV work with and without the cache over prompt and output lengths, formula and measured"
ENGINE_ARGS = True  # the model, dtype and engine of the measured points
NEW_TOKENS_FOR_PROMPT_SWEEP = 100
MAX_PROMPT_LEN = 10_000


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-len", type=int, default=32,
                   help="prompt tokens of the new-token sweep")
    p.add_argument("--max-new", type=int, default=2000,
                   help="the new-token sweep goes up to this many")
    p.add_argument("--measure-points", type=int, nargs="*", default=[8, 16, 32, 64],
                   metavar="N", help="new-token counts timed on the model at --prompt-len, with "
                                     "and without the cache (none: formula only)")
    p.add_argument("--runs", type=int, default=2, help="timed runs per point (the fastest counts)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random prompt tokens")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result to this JSON file")
    p.add_argument("--plot", default=None, metavar="PATH.png",
                   help="also draw the result to this PNG file")


def cache_work(prompt_len: int, new_tokens: int) -> int:
    return prompt_len + new_tokens - 1


def no_cache_work(prompt_len: int, new_tokens: int) -> int:
    return new_tokens * prompt_len + new_tokens * (new_tokens - 1) // 2


def point(prompt_len: int, new_tokens: int, kv_bytes_per_token: int) -> dict[str, Any]:
    cached, uncached = cache_work(prompt_len, new_tokens), no_cache_work(prompt_len, new_tokens)
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "cache_work": cached,
            "no_cache_work": uncached, "ratio": uncached / cached,
            "kv_bytes": cached * kv_bytes_per_token}


def one_two_five(low: int, high: int) -> list[int]:
    """1, 2, 5, 10, 20, ... within [low, high], and high itself."""
    values = [m * 10**e for e in range(10) for m in (1, 2, 5) if low <= m * 10**e <= high]
    return values if values and values[-1] == high else [*values, high]


def fit(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Least squares of time = a * positions computed + b * forward passes; adds each row's
    prediction and measured / predicted ratio."""
    import numpy as np

    x = np.array([[r["work"], r["steps"]] for r in rows], dtype=float)
    y = np.array([r["time_s"] for r in rows])
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    predicted = x @ coef
    for r, p in zip(rows, predicted):
        r["predicted_s"] = float(p)
        r["measured_over_predicted"] = r["time_s"] / float(p)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((y - predicted) ** 2).sum()) / total if total > 0 else None
    return {"s_per_position": float(coef[0]), "s_per_step": float(coef[1]), "r2": r2}


def measure(llm, args: argparse.Namespace) -> dict[str, Any]:
    from kvserve.bench.throughput import random_prompts
    from kvserve.sampling_params import SamplingParams

    vocab_size = llm.engine.model_config.vocab_size
    prompt = random_prompts(1, args.prompt_len, vocab_size, args.seed)[0]
    # Prefix caching off: repeated runs of one prompt must recompute it to follow the formula.
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, use_prefix_cache=False),
                 use_tqdm=False)  # warm up
    rows = []
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("timing", total=len(args.measure_points) * 2 * args.runs)
        for n in args.measure_points:
            for use_kv_cache in (True, False):
                params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                        use_kv_cache=use_kv_cache, use_prefix_cache=False)
                outs = []
                for _ in range(args.runs):
                    outs.append(llm.generate([prompt], params, use_tqdm=False)[0])
                    progress.advance(task)
                work = (cache_work if use_kv_cache else no_cache_work)(args.prompt_len, n)
                rows.append({"new_tokens": n, "kv_cache": use_kv_cache, "steps": n, "work": work,
                             "measured_work": outs[0].work_tokens,
                             "time_s": min(o.metrics.finish_time - o.metrics.arrival_time
                                           for o in outs)})
    return {"fit": fit(rows), "work_matches_formula": all(r["work"] == r["measured_work"]
                                                          for r in rows), "points": rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvserve.config import EngineConfig
    from kvserve.engine.llm import LLM
    from kvserve.model.loader import load_checkpoint

    if args.prompt_len < 1 or args.max_new < 1 or min(args.measure_points, default=1) < 1:
        raise BenchError("--prompt-len, --max-new and --measure-points must be at least 1")
    config = EngineConfig.from_cli(args)
    checkpoint = load_checkpoint(config.model)
    per_token = checkpoint.config.kv_bytes_per_token(args.dtype)
    n_fixed = NEW_TOKENS_FOR_PROMPT_SWEEP
    result: dict[str, Any] = {
        "prompt_len": args.prompt_len, "max_new": args.max_new, "dtype": args.dtype,
        "kv_bytes_per_token": per_token, "new_tokens_for_prompt_sweep": n_fixed,
        "by_new_tokens": [point(args.prompt_len, n, per_token)
                          for n in one_two_five(1, args.max_new)],
        "by_prompt_len": [point(p, n_fixed, per_token)
                          for p in one_two_five(10, MAX_PROMPT_LEN)],
        "measured": None, "command": command_line(), "env": environment(args)}
    console.print(f"[bold]kvserve bench sweep[/bold]: KV work with and without the cache; "
                  f"{format_size(per_token)} of K/V per token ({args.dtype})")
    print_formula(result["by_new_tokens"], f"prompt of {args.prompt_len} tokens, n new tokens")
    print_formula(result["by_prompt_len"], f"{n_fixed} new tokens, prompt of P tokens")
    if args.measure_points:
        llm = LLM(checkpoint, config=config)
        result["measured"] = measure(llm, args)
        print_measured(result["measured"], args.prompt_len)
    write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    return result


def print_formula(points: list[dict[str, Any]], title: str) -> None:
    t = Table(title=f"KV work (token positions computed): {title}")
    for col in ("P", "n", "with cache", "without", "without / with", "KV held (with cache)"):
        t.add_column(col, justify="right")
    for p in points:
        t.add_row(str(p["prompt_len"]), str(p["new_tokens"]), f"{p['cache_work']:,}",
                  f"{p['no_cache_work']:,}", f"{p['ratio']:,.1f}x", format_size(p["kv_bytes"]))
    console.print(t)


def print_measured(measured: dict[str, Any], prompt_len: int) -> None:
    t = Table(title=f"measured on the model, prompt of {prompt_len} tokens (fastest run)")
    for col in ("n", "cache", "work", "counted", "time", "fit", "time / fit"):
        t.add_column(col, justify="right")
    for r in measured["points"]:
        same = "[green]=[/green]" if r["work"] == r["measured_work"] else "[red]differs[/red]"
        t.add_row(str(r["new_tokens"]), "on" if r["kv_cache"] else "off", f"{r['work']:,}",
                  f"{r['measured_work']:,} {same}", f"{r['time_s'] * 1000:.0f} ms",
                  f"{r['predicted_s'] * 1000:.0f} ms", f"{r['measured_over_predicted']:.2f}")
    console.print(t)
    f = measured["fit"]
    r2 = "-" if f["r2"] is None else f"{f['r2']:.4f}"
    console.print(f"time = {f['s_per_position'] * 1e6:.1f} us per position computed + "
                  f"{f['s_per_step'] * 1000:.2f} ms per forward pass; [bold]R² = {r2}[/bold].")


def plot(result: dict[str, Any], path: str) -> None:
    plt = load_pyplot()
    if plt is None:
        return
    p, n_fixed, per_token = (result["prompt_len"], result["new_tokens_for_prompt_sweep"],
                             result["kv_bytes_per_token"])
    ns = range(1, result["max_new"] + 1)
    prompt_lens = range(10, MAX_PROMPT_LEN + 1)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    axes[0, 0].loglog(ns, [no_cache_work(p, n) / cache_work(p, n) for n in ns])
    axes[0, 0].set(xlabel="new tokens n", ylabel="work without / with cache",
                   title=f"prompt of {p} tokens")
    axes[0, 1].semilogx(prompt_lens, [no_cache_work(q, n_fixed) / cache_work(q, n_fixed)
                                    for q in prompt_lens])
    axes[0, 1].set(xlabel="prompt tokens P", ylabel="work without / with cache",
                   title=f"{n_fixed} new tokens")
    axes[1, 0].plot(ns, [cache_work(p, n) * per_token / 2**20 for n in ns])
    axes[1, 0].set(xlabel="new tokens n", ylabel="KV held (MiB)",
                   title=f"KV memory, prompt of {p} tokens ({result['dtype']})")
    measured = result["measured"]
    if measured:
        for use_kv_cache, color in ((True, "#4a4"), (False, "#c44")):
            rows = [r for r in measured["points"] if r["kv_cache"] is use_kv_cache]
            label = "with cache" if use_kv_cache else "without"
            axes[1, 1].scatter([r["work"] for r in rows], [r["time_s"] for r in rows],
                               color=color, label=f"{label}: measured")
            axes[1, 1].plot([r["work"] for r in rows], [r["predicted_s"] for r in rows],
                            color=color, linestyle="--", label=f"{label}: fit")
        r2 = measured["fit"]["r2"]
        axes[1, 1].set(xlabel="positions computed", ylabel="time (s)",
                       title="measured" + ("" if r2 is None else f", R² = {r2:.3f}"))
        axes[1, 1].legend()
    else:
        axes[1, 1].set_axis_off()
    save_figure(fig, path)

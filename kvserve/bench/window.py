"""`kvserve bench window`: the KV bytes one request holds at a few context lengths, with the
sliding layers' blocks bounded by their window vs every layer holding the whole context.

Each point schedules one prompt of that many tokens (chunked by --max-num-batched-tokens)
through the engine's scheduler and KV cache manager, without the forward pass: what is
measured is the block accounting, which is what decides the memory. The pool is sized from
--kv-cache-memory as the engine sizes it (engine.group_block_counts).
"""

from __future__ import annotations

import argparse
import dataclasses

from rich.table import Table

from kvserve.bench.common import console, environment, write_json
from kvserve.units import format_size

NAME = "window"
HELP = "KV bytes held at 1k/4k/16k tokens: window-bounded sliding layers vs full attention"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", default="1024,4096,16384",
                   help="context lengths in tokens, comma-separated")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result to this JSON file")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the bytes to this PNG")


def held(model_config, config, num_tokens: int) -> dict:
    """Schedule one prompt of ``num_tokens`` and one output token; bytes held once the
    prompt is computed, and the most held during a step."""
    from kvserve.cache.manager import KVCacheManager
    from kvserve.engine.kv_setup import group_block_counts
    from kvserve.engine.request import Request
    from kvserve.engine.scheduler import Scheduler, SchedulerConfig
    from kvserve.sampling_params import SamplingParams
    from kvserve.step import RunnerOutput

    groups = model_config.kv_groups()
    windows = tuple(w for w, _ in groups)
    layer_block = model_config.kv_bytes_per_layer_token(config.dtype) * config.block_size
    block_bytes = [len(layers) * layer_block for _, layers in groups]
    memory = max(config.kv_cache_memory, 2 * num_tokens * model_config.kv_bytes_per_token(
        config.dtype))  # room for the full-attention side too
    counts = group_block_counts(dataclasses.replace(config, kv_cache_memory=memory), windows,
                                block_bytes)
    kv = KVCacheManager(counts, config.block_size, block_bytes=block_bytes, windows=windows)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=config.max_num_batched_tokens),
                          kv)
    request = Request("r", [7] * num_tokens, SamplingParams(max_tokens=1))
    scheduler.add(request)
    while request.num_computed_tokens < num_tokens:
        out = scheduler.schedule()
        scheduler.update(out, RunnerOutput(sampled={s.request_id: 7 for s in out.scheduled
                                                    if s.sample}))
    result = {"bytes_held": kv.bytes_in_use, "bytes_peak": request.stats.kv_bytes_peak,
              "formula": model_config.kv_bytes_held(num_tokens, config.dtype,
                                                    config.block_size)}
    scheduler.finish(request, "length")
    return result


def run(args: argparse.Namespace) -> dict:
    from kvserve.config import EngineConfig
    from kvserve.model.loader import load_checkpoint

    config = EngineConfig.from_cli(args)
    model_config = load_checkpoint(config.model).config
    full = dataclasses.replace(model_config, layer_windows=())
    contexts = [int(c) for c in args.contexts.split(",")]
    console.print(f"[bold]kvserve bench window[/bold]: {model_config.name}, windows "
                  f"{sorted(set(model_config.windows))}, {config.dtype}, block "
                  f"{config.block_size}, chunks of {config.max_num_batched_tokens} tokens")
    points = []
    for n in contexts:
        windowed, everything = held(model_config, config, n), held(full, config, n)
        assert windowed["bytes_held"] == windowed["formula"], (n, windowed)
        points.append({"context": n, "windowed": windowed, "full_attention": everything,
                       "ratio": everything["bytes_held"] / windowed["bytes_held"]})
    result = {"model": model_config.name, "dtype": config.dtype,
              "block_size": config.block_size, "chunk": config.max_num_batched_tokens,
              "points": points, "env": environment(args)}
    print_table(result)
    write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    return result


def print_table(r: dict) -> None:
    t = Table(title=f"KV bytes held by one request, {r['model']}, {r['dtype']}")
    for col in ("context", "window-bounded", "full attention", "full / bounded",
                "peak in a step (bounded)"):
        t.add_column(col, justify="right")
    for p in r["points"]:
        t.add_row(f"{p['context']:,}", format_size(p["windowed"]["bytes_held"]),
                  format_size(p["full_attention"]["bytes_held"]), f"{p['ratio']:.2f}x",
                  format_size(p["windowed"]["bytes_peak"]))
    console.print(t)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["context"] for p in r["points"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("full_attention", "full attention (every layer)"),
                       ("windowed", "sliding layers hold their window")):
        ax.plot(xs, [p[key]["bytes_held"] / 2**20 for p in r["points"]], marker="o",
                label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV held (MiB)")
    ax.set_title(f"KV memory of one request, {r['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    console.print(f"[dim]wrote {path}[/dim]")

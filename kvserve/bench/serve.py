"""`kvserve bench serve`: a streamed load against any OpenAI-compatible server."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from itertools import cycle, islice
from pathlib import Path
from typing import Any

from rich.progress import Progress
from rich.table import Table

from kvserve.bench.client import BenchError, LoadResult, LoadSpec, run_load, stats_ms
from kvserve.bench.common import console, write_json

NAME = "serve"
HELP = "latency, TTFT and throughput of a running OpenAI-compatible server (any engine)"
ENGINE_ARGS = False  # it measures a server that is already running
DEFAULT_PROMPTS = ("Explain what machine learning is in simple terms",
                   "What is the difference between AI and ML?",
                   "Describe neural networks briefly",
                   "How does gradient descent work?",
                   "What are transformers in deep learning?")


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"ignore_eos\": true}'")
    return value


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The workload options `bench serve` and `bench compare` share."""
    p.add_argument("--num-requests", type=int, default=20, help="requests to send in all")
    p.add_argument("--unique-prompts", type=int, default=None,
                   help="how many distinct prompts, cycled to --num-requests (default: all)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="one prompt per line, or JSONL with a \"prompt\" field (default: five "
                        "short questions about machine learning)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s with Poisson arrivals (default: inf, all at once)")
    p.add_argument("--max-tokens", type=int, default=50, help="new tokens per request")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="chat: prompts as user messages; completions: as raw prompts")
    p.add_argument("--extra-body", type=json_object, default={}, metavar="JSON",
                   help="fields merged into every request body, e.g. '{\"ignore_eos\": true}' "
                        "or llama.cpp's '{\"repeat_penalty\": 1.0}'")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (or .../v1)")
    p.add_argument("--model", default=None,
                   help="the model name to send (default: the first id of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    add_workload_args(p)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result to this JSON file")
    p.add_argument("--plot", default=None, metavar="PATH.png",
                   help="histograms of end-to-end latency and TTFT")


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    prompts = [json.loads(line)["prompt"] if line.lstrip().startswith("{") else line
               for line in lines]
    if not prompts:
        raise BenchError(f"{path} holds no prompts")
    return prompts


def workload(args: argparse.Namespace) -> tuple[str, ...]:
    """One prompt per request: the first --unique-prompts prompts, cycled."""
    unique = 1 if args.unique_prompts is None else args.unique_prompts
    if min(args.num_requests, args.concurrency, unique) < 1:
        raise BenchError("--num-requests, --concurrency and --unique-prompts must be at least 1")
    if args.request_rate <= 0:
        raise BenchError("--request-rate must be positive (inf: all at once)")
    prompts = read_prompts(args.prompts)[: args.unique_prompts]
    return tuple(islice(cycle(prompts), args.num_requests))


def load_spec(args: argparse.Namespace, base_url: str, model: str | None = None,
              api_key: str | None = None, fields: dict[str, Any] | None = None) -> LoadSpec:
    return LoadSpec(base_url=base_url, prompts=workload(args), model=model,
                    endpoint=args.endpoint, max_tokens=args.max_tokens,
                    concurrency=args.concurrency, request_rate=args.request_rate,
                    extra_body=args.extra_body | (fields or {}), api_key=api_key, seed=args.seed)


def measure(spec: LoadSpec, label: str = "requests") -> tuple[dict[str, Any], LoadResult]:
    """Run the load with a progress bar; the result in `bench serve`'s JSON shape."""
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(label, total=len(spec.prompts))
        load = asyncio.run(run_load(spec, lambda _: progress.advance(task)))
    return summarize(spec, load), load


def summarize(spec: LoadSpec, load: LoadResult) -> dict[str, Any]:
    ok = load.ok
    output_tokens = sum(r.output_tokens for r in ok)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    return {
        "base_url": spec.base_url, "model": load.model, "num_requests": len(spec.prompts),
        "concurrency": spec.concurrency, "max_tokens": spec.max_tokens,
        "errors": len(load.requests) - len(ok), "duration_s": load.duration_s,
        "requests_per_s": len(ok) / load.duration_s,
        "output_tokens_per_s": output_tokens / load.duration_s,
        "latency_ms": stats_ms([r.e2e_s for r in ok]),
        "ttft_ms": stats_ms([r.ttft_s for r in ok]),
        "tpot_ms": stats_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": stats_ms([gap for r in ok for gap in r.itl_s]),
        "decode_ms": {"mean": stats_ms([r.decode_s for r in ok])["mean"]},
        "cached_tokens_total": sum(cached) if cached else None,
    }


def raise_if_failed(result: dict[str, Any], load: LoadResult) -> None:
    if result["errors"]:
        raise BenchError(f"{result['errors']} of {result['num_requests']} requests failed; "
                         f"first error: {load.first_error}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = load_spec(args, args.base_url, args.model, args.api_key)
    rate = "all at once" if math.isinf(spec.request_rate) else f"{spec.request_rate:g} req/s"
    console.print(f"[bold]kvserve bench serve[/bold]: {spec.root}, {len(spec.prompts)} requests "
                  f"({len(set(spec.prompts))} distinct prompts, {args.endpoint}), concurrency "
                  f"{spec.concurrency}, {rate}, max_tokens {spec.max_tokens}")
    result, load = measure(spec)
    if not load.ok:
        raise_if_failed(result, load)
    print_table(result)
    write_json(args.json, result)
    if args.plot:
        plot(load, args.plot)
    raise_if_failed(result, load)
    return result


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(r: dict[str, Any]) -> None:
    t = Table(title=f"bench serve: {r['model']} at {r['base_url']}")
    t.add_column("ms")
    for col in ("mean", "p50", "p95", "p99"):
        t.add_column(col, justify="right")
    for label, key in (("end-to-end latency", "latency_ms"), ("time to first token", "ttft_ms"),
                       ("time per output token", "tpot_ms"), ("inter-token latency", "itl_ms")):
        t.add_row(label, *(ms(r[key][col]) for col in ("mean", "p50", "p95", "p99")))
    console.print(t)
    cached = r["cached_tokens_total"]
    console.print(f"{r['num_requests'] - r['errors']} of {r['num_requests']} requests in "
                  f"{r['duration_s']:.2f} s: [bold]{r['requests_per_s']:.2f} req/s[/bold], "
                  f"[bold]{r['output_tokens_per_s']:.1f} output tokens/s[/bold], decode "
                  f"{ms(r['decode_ms']['mean'])} ms on average; cached prompt tokens: "
                  f"{'not reported' if cached is None else f'{cached:,}'}.")


def load_pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a note) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("[yellow]matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt


def plot(load: LoadResult, path: str) -> None:
    plt = load_pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, values in ((axes[0], "end-to-end latency", [r.e2e_s for r in load.ok]),
                             (axes[1], "time to first token", [r.ttft_s for r in load.ok])):
        ax.hist([v * 1000 for v in values], bins=min(30, max(5, len(values) // 2)),
                color="#26a")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("requests")
        ax.set_title(name)
    fig.suptitle(f"{load.model}: {len(load.ok)} requests")
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    console.print(f"[dim]wrote {path}[/dim]")

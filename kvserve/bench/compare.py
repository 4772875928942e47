"""`kvserve bench compare`: the `bench serve` workload against our own server with the KV cache
and prefix cache on, with prefix caching off, and with no KV cache at all.

Each configuration is a set of server flags plus request fields. One server process serves
consecutive configurations whose flags agree (the no-KV-cache baseline is a request field,
``use_kv_cache: false``); it is started on a free loopback port with the engine options given
here (prefix caching aside: the configurations set it) and always stopped at the end.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import groupby
from typing import IO, Any

import httpx
from rich.table import Table

from kvserve.bench.client import BenchError
from kvserve.bench.common import console, environment, write_json
from kvserve.bench.report import command_line
from kvserve.bench.serve import (
    add_workload_args,
    load_pyplot,
    load_spec,
    measure,
    raise_if_failed,
    save_figure,
)
from kvserve.config import EngineConfig, cli_flags

NAME = "compare"
HELP = "our server with KV + prefix cache, KV cache only, and no KV cache, side by side"
ENGINE_ARGS = True  # the options of the server it starts


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    server_flags: tuple[str, ...]
    request_fields: dict[str, Any] = field(default_factory=dict)


CONFIGS = (Config("kv_prefix", "KV + prefix", ()),
           Config("kv", "KV only", ("--no-prefix-cache",)),
           Config("no_kv", "no KV cache", ("--no-prefix-cache",),
                  {"use_kv_cache": False, "use_prefix_cache": False}))
BASELINE = "no_kv"
# (row label, path into a bench-serve result, whether higher is better)
ROWS = (("avg latency (ms)", "latency_ms.mean", False),
        ("p50 latency (ms)", "latency_ms.p50", False),
        ("p95 latency (ms)", "latency_ms.p95", False),
        ("p99 latency (ms)", "latency_ms.p99", False),
        ("throughput (req/s)", "requests_per_s", True),
        ("output tokens/s", "output_tokens_per_s", True),
        ("avg TTFT (ms)", "ttft_ms.mean", False),
        ("p50 TTFT (ms)", "ttft_ms.p50", False),
        ("avg decode time (ms)", "decode_ms.mean", False))


def add_args(p: argparse.ArgumentParser) -> None:
    for c in CONFIGS:
        p.add_argument(f"--base-url-{c.key.replace('_', '-')}", default=None, metavar="URL",
                       help=f"measure '{c.label}' on this running server instead of ours "
                            f"(sent the same request fields: {c.request_fields or 'none'})")
    add_workload_args(p)
    p.add_argument("--startup-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="seconds to wait for each server to answer /health")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result to this JSON file")
    p.add_argument("--plot", default=None, metavar="PATH.png",
                   help="also draw the result to this PNG file")


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine options given on this command line, as `kvserve serve` flags (each
    configuration sets the prefix cache itself)."""
    return cli_flags(EngineConfig.from_cli(args), skip=("enable_prefix_caching",))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_server(command: list[str], url: str, timeout_s: float) -> Iterator[str]:
    """Run ``command``, a server that will answer ``url``/health, until the block ends,
    however it ends."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_healthy(proc, url, log, timeout_s)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_healthy(proc: subprocess.Popen, url: str, log: IO[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the server exited with status {proc.returncode}: "
                             f"{last_line(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise BenchError(f"the server at {url} was not healthy after {timeout_s:g} s: "
                     f"{last_line(log)}")


def last_line(log: IO[str]) -> str:
    log.seek(0)
    lines = log.read().strip().splitlines()
    return lines[-1] if lines else "(no output)"


@contextmanager
def our_server(args: argparse.Namespace, flags: tuple[str, ...]) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "kvserve.cli", "serve", "--host", "127.0.0.1", "--port",
               str(port), *engine_flags(args), *flags]
    console.print(f"[dim]starting {' '.join(['kvserve', *command[3:]])}[/dim]")
    with local_server(command, f"http://127.0.0.1:{port}", args.startup_timeout) as url:
        # One tiny request first, so that no configuration pays for the first forward pass.
        httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2},
                   timeout=120).raise_for_status()
        yield url


def run(args: argparse.Namespace) -> dict[str, Any]:
    console.print(f"[bold]kvserve bench compare[/bold]: {args.num_requests} requests, "
                  f"concurrency {args.concurrency}, max_tokens {args.max_tokens}")
    results: dict[str, dict[str, Any]] = {}
    for flags, group in groupby(CONFIGS, key=lambda c: c.server_flags):
        configs = list(group)
        urls = {c.key: getattr(args, f"base_url_{c.key}") for c in configs}
        starts_ours = any(url is None for url in urls.values())
        with (our_server(args, flags) if starts_ours else nullcontext("")) as ours:
            for c in configs:
                spec = load_spec(args, urls[c.key] or ours, fields=c.request_fields)
                result, load = measure(spec, c.label)
                raise_if_failed(result, load)
                results[c.key] = result
    out = {"num_requests": args.num_requests, "concurrency": args.concurrency,
           "max_tokens": args.max_tokens, "endpoint": args.endpoint,
           "configs": {c.key: {"label": c.label, "server_flags": list(c.server_flags),
                               "request_fields": c.request_fields, "result": results[c.key]}
                       for c in CONFIGS},
           "speedups": speedups(results), "command": command_line(), "env": environment(args)}
    print_table(out)
    write_json(args.json, out)
    if args.plot:
        plot(out, args.plot)
    return out


def lookup(result: dict[str, Any], path: str) -> float | None:
    for part in path.split("."):
        result = result[part]
    return result  # type: ignore[return-value]


def speedup(value: float | None, base: float | None, higher_is_better: bool) -> float | None:
    """How many times better ``value`` is than ``base`` (> 1: better)."""
    if not value or not base:
        return None
    return value / base if higher_is_better else base / value


def speedups(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    base = results[BASELINE]
    return {key: {path: speedup(lookup(r, path), lookup(base, path), higher)
                  for _, path, higher in ROWS}
            for key, r in results.items() if key != BASELINE}


def _cell(value: float | None, template: str = "{:,.1f}") -> str:
    return "-" if value is None else template.format(value)


def print_table(out: dict[str, Any]) -> None:
    configs = out["configs"]
    t = Table(title=f"{out['num_requests']} requests, concurrency {out['concurrency']}, "
                    f"max_tokens {out['max_tokens']}")
    t.add_column("metric")
    for c in configs.values():
        t.add_column(c["label"], justify="right")
    for key in out["speedups"]:
        t.add_column(f"{configs[key]['label']}\nspeedup", justify="right", style="bold")
    for label, path, _ in ROWS:
        t.add_row(label, *(_cell(lookup(c["result"], path)) for c in configs.values()),
                  *(_cell(s[path], "{:.2f}x") for s in out["speedups"].values()))
    console.print(t)
    console.print(f"Speedup: how many times better than '{configs[BASELINE]['label']}' "
                  "(lower latency, higher throughput).")


def plot(out: dict[str, Any], path: str) -> None:
    plt = load_pyplot()
    if plt is None:
        return
    configs = list(out["configs"].values())
    labels = [c["label"] for c in configs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, path_in_result) in zip(axes, (("avg latency (ms)", "latency_ms.mean"),
                                                  ("avg TTFT (ms)", "ttft_ms.mean"),
                                                  ("output tokens/s", "output_tokens_per_s"))):
        values = [lookup(c["result"], path_in_result) or 0.0 for c in configs]
        bars = ax.bar(labels, values, color=["#4a4", "#26a", "#c44"])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
    save_figure(fig, path)

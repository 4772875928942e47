"""`kvserve bench report`: a Markdown report rebuilt from the JSON results in a folder.

Each result's kind (kv, decode, throughput, prefix, serve, compare, sweep) is told by its keys.
Only the text between the report markers is rewritten; hand-written sections around it stay.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from kvserve.bench.client import BenchError
from kvserve.bench.common import console

NAME = "report"
HELP = "rebuild a Markdown report (docs/BENCHMARKS.md) from the JSON results in a folder"
ENGINE_ARGS = False
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
# The first kind whose keys a result has all of is its kind.
KINDS = (("compare", {"configs", "speedups"}), ("sweep", {"by_new_tokens", "by_prompt_len"}),
         ("serve", {"base_url", "latency_ms", "ttft_ms"}), ("kv", {"kv_cache", "no_cache"}),
         ("decode", {"kvserve", "bandwidth_gb_s"}), ("throughput", {"batched", "sequential"}),
         ("prefix", {"on", "off", "prefix_len"}))
STATS = ("mean", "p50", "p95", "p99")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results", metavar="DIR",
                   help="folder of the benchmarks' JSON files")
    p.add_argument("--out", default="docs/BENCHMARKS.md", metavar="PATH",
                   help="the Markdown report to write")


def command_line() -> str | None:
    """The `kvserve bench ...` command this process runs, for a result's "command" field
    (None when it runs otherwise, e.g. from a test)."""
    args = sys.argv[1:]
    return shlex.join(["kvserve", *args]) if args[:1] == ["bench"] else None


def kind_of(result: Any) -> str | None:
    if not isinstance(result, dict):
        return None
    return next((kind for kind, keys in KINDS if keys <= result.keys()), None)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows] + [""]


def scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if not isinstance(v, (dict, list)) and k != "command"}


def side_by_side(result: dict[str, Any], columns: tuple[str, ...]) -> list[str]:
    """One row per scalar field of the sub-results named by ``columns``."""
    subs = [result.get(c) or {} for c in columns]
    keys = list(dict.fromkeys(k for sub in subs for k in scalars(sub)))
    return table(["metric", *columns], [[k, *(sub.get(k) for sub in subs)] for k in keys])


def stats_table(result: dict[str, Any]) -> list[str]:
    rows = [[k, *(v.get(s) for s in STATS)] for k, v in result.items()
            if isinstance(v, dict) and v and v.keys() <= set(STATS)]
    return table(["ms", *STATS], rows)


def compare_table(result: dict[str, Any]) -> list[str]:
    configs, speedups = result["configs"], result["speedups"]
    paths = list(next(iter(speedups.values()), {}))

    def lookup(d: dict[str, Any], path: str) -> Any:
        for part in path.split("."):
            d = d[part]
        return d

    headers = ["metric", *(c["label"] for c in configs.values()),
               *(f"{configs[k]['label']} speedup" for k in speedups)]
    rows = [[p, *(lookup(c["result"], p) for c in configs.values()),
             *(s[p] for s in speedups.values())] for p in paths]
    return table(headers, rows)


def sweep_tables(result: dict[str, Any]) -> list[str]:
    columns = ["prompt_len", "new_tokens", "cache_work", "no_cache_work", "ratio", "kv_bytes"]
    lines = []
    for key in ("by_new_tokens", "by_prompt_len"):
        lines += table(columns, [[p[c] for c in columns] for p in result[key]])
    measured = result.get("measured")
    if measured:
        columns = ["new_tokens", "kv_cache", "work", "measured_work", "time_s", "predicted_s"]
        lines += table(columns, [[p[c] for c in columns] for p in measured["points"]])
        lines += [f"Fit: {', '.join(f'{k} {fmt(v)}' for k, v in measured['fit'].items())}; "
                  f"work matches the formula: {fmt(measured['work_matches_formula'])}.", ""]
    return lines


RENDERERS = {
    "kv": lambda r: side_by_side(r, ("kv_cache", "no_cache")),
    "decode": lambda r: side_by_side(r, ("kvserve", "transformers")),
    "throughput": lambda r: side_by_side(r, ("batched", "sequential", "transformers")),
    "prefix": lambda r: side_by_side(r, ("on", "off")),
    "serve": stats_table,
    "compare": compare_table,
    "sweep": sweep_tables,
}


def render(path: Path, kind: str, result: dict[str, Any], plots: list[str]) -> list[str]:
    lines = [f"### {path.name} ({kind})", ""]
    if result.get("command"):
        lines += [f"`{result['command']}`", ""]
    env = result.get("env") or {}
    meta = [f"{k} {env[k]}" for k in ("date", "machine", "cpu_count", "model", "dtype", "commit")
            if env.get(k) is not None]
    if meta:
        lines += ["Measured: " + ", ".join(meta) + ".", ""]
    lines += RENDERERS[kind](result)
    extra = scalars(result)
    if extra:
        lines += [" · ".join(f"{k} {fmt(v)}" for k, v in extra.items()), ""]
    return lines + [f"![{Path(p).name}]({p})" for p in plots] + ([""] if plots else [])


def plots_by_result(results: list[Path], pngs: list[Path]) -> dict[Path | None, list[Path]]:
    """Each PNG goes with the result whose file stem is the longest prefix of its own."""
    owners: dict[Path | None, list[Path]] = {}
    for png in pngs:
        matches = [r for r in results if png.stem.startswith(r.stem)]
        owner = max(matches, key=lambda r: len(r.stem), default=None)
        owners.setdefault(owner, []).append(png)
    return owners


def concurrency_section(serves: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """Throughput against concurrency, for `bench serve` runs of one workload at several."""
    by_workload: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in serves:
        key = (r["model"], r["num_requests"], r["max_tokens"])
        by_workload.setdefault(key, {})[r["concurrency"]] = r
    lines: list[str] = []
    groups = [(key, runs) for key, runs in by_workload.items() if len(runs) > 1]
    for i, ((model, num_requests, max_tokens), runs) in enumerate(groups):
        levels = sorted(runs)
        lines += [f"### Throughput vs concurrency ({model}, {num_requests} requests x "
                  f"{max_tokens} tokens)", ""]
        lines += table(["concurrency", "requests/s", "output tokens/s", "p50 TTFT ms",
                        "p50 latency ms"],
                       [[c, runs[c]["requests_per_s"], runs[c]["output_tokens_per_s"],
                         runs[c]["ttft_ms"]["p50"], runs[c]["latency_ms"]["p50"]] for c in levels])
        png = out_dir / ("serve-concurrency.png" if i == 0 else f"serve-concurrency-{i}.png")
        if plot_concurrency(levels, [runs[c]["output_tokens_per_s"] for c in levels], png):
            lines += [f"![{png.name}]({png.name})", ""]
    return lines


def plot_concurrency(levels: list[int], tokens_per_s: list[float], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(levels, tokens_per_s, marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput vs concurrency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def generate(results_dir: Path, out: Path) -> tuple[str, int]:
    """The report's Markdown and how many results it holds. Plots are copied beside ``out``
    (results folders are usually not committed) and linked from there."""
    files = sorted(results_dir.glob("*.json"))
    plots = plots_by_result(files, sorted(results_dir.glob("*.png")))

    def link(png: Path) -> str:
        out.parent.mkdir(parents=True, exist_ok=True)
        if png.parent.resolve() != out.parent.resolve():
            shutil.copy2(png, out.parent / png.name)
        return png.name

    lines = [f"_Generated by `kvserve bench report` from `{results_dir}`; the text between the "
             "report markers is rewritten each time._", ""]
    skipped: list[str] = []
    serves = []
    for path in files:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            result = None
        kind = kind_of(result)
        if kind is None:
            skipped.append(path.name)
            continue
        if kind == "serve":
            serves.append(result)
        lines += render(path, kind, result, [link(p) for p in plots.get(path, [])])
    lines += concurrency_section(serves, out.parent)
    if plots.get(None):
        lines += ["### Other plots", ""] + [f"![{p.name}]({link(p)})" for p in plots[None]] + [""]
    if skipped:
        lines += [f"Not recognised as a benchmark result: {', '.join(skipped)}.", ""]
    return "\n".join(lines).rstrip() + "\n", len(files) - len(skipped)


def splice(existing: str, generated: str) -> str:
    """``existing`` with the text between the markers replaced, or the markers appended."""
    block = f"{BEGIN}\n{generated}{END}"
    start, end = existing.find(BEGIN), existing.find(END)
    if start != -1 and end > start:
        return existing[:start] + block + existing[end + len(END):]
    if existing and not existing.endswith("\n\n"):
        existing += "\n" if existing.endswith("\n") else "\n\n"
    return existing + block + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    results_dir, out = Path(args.results), Path(args.out)
    if not results_dir.is_dir():
        raise BenchError(f"no results folder {results_dir} (write results with --json first)")
    existing = out.read_text() if out.exists() else "# Benchmarks\n\n"
    generated, num_results = generate(results_dir, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(splice(existing, generated))
    console.print(f"[dim]wrote {out}: {num_results} results from {results_dir}[/dim]")
    return {"out": str(out), "num_results": num_results}

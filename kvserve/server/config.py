"""``ServerConfig``: every ``kvserve serve`` option written once, with its help text.

Like ``EngineConfig``, its fields generate the command-line options (``add_server_args``), and
its values are checked here, before any model loads. Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvserve.units import format_size, parse_size


def option(default: Any, help: str, *, minimum: float | None = None,
           maximum: float | None = None, size: bool = False, metavar: str | None = None,
           repeat: bool = False) -> Any:
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "size": size,
            "metavar": metavar, "repeat": repeat}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServerConfig:
    host: str = option("127.0.0.1", "address to listen on; 0.0.0.0 for every interface")
    port: int = option(8000, "port to listen on", minimum=1, maximum=65535)
    api_key: tuple[str, ...] = option(
        (), "require 'Authorization: Bearer KEY' on /v1, /generate, /cache and /docs; repeat "
            "for several keys", metavar="KEY", repeat=True)
    api_key_file: str | None = option(None, "read more API keys from this file, one per line "
                                            "(blank lines and # comments skipped)",
                                      metavar="PATH")
    isolate_tenants: bool = option(
        False, "derive each request's cache salt from its API key, so no key ever hits (or "
               "sees the timing of) a prefix cached for another; needs an API key")
    served_model_name: str | None = option(None, "the model name clients send (default: the "
                                                 "model's own name)", metavar="NAME")
    max_waiting: int | None = option(None, "requests waiting for their first token before new "
                                           "ones get 503 (default: no limit)", minimum=1)
    max_body_size: int = option(
        2 << 20, "largest request body; bigger ones get 413 (JSON is parsed on the event loop, "
                 "about 0.1 s per MiB of token ids)", size=True)
    max_prompts: int = option(64, "most prompts in one /v1/completions request", minimum=1)
    max_n: int = option(16, "most choices (n) one request may ask for", minimum=1, maximum=128)
    max_stop_strings: int = option(16, "most stop strings in one request", minimum=0)
    max_stop_length: int = option(256, "longest stop string, in characters", minimum=1)
    max_request_tokens: int = option(
        65536, "most tokens one request may generate over all its choices (prompts x n x "
               "max_tokens)", minimum=1)
    max_no_cache_tokens: int = option(
        1024, "longest prompt + max_tokens of a request without a KV cache (use_kv_cache: "
              "false, /generate's use_cache: false), whose work grows with the square of it",
        minimum=1)
    request_timeout: float | None = option(
        None, "end a request still running after this many seconds with an error (408, or an "
              "error event in a stream) and free its KV blocks (default: no limit)",
        minimum=0.001, metavar="SECONDS")
    shutdown_timeout: float = option(
        30.0, "on SIGTERM or SIGINT, seconds running requests get to finish before they are "
              "aborted; new requests get 503 meanwhile", minimum=0, metavar="SECONDS")

    def __post_init__(self) -> None:
        if isinstance(self.api_key, str):
            object.__setattr__(self, "api_key", (self.api_key,))
        object.__setattr__(self, "api_key", tuple(self.api_key or ()))
        if self.api_key_file is not None:
            keys = read_key_file(self.api_key_file)
            object.__setattr__(self, "api_key", self.api_key + keys)
            object.__setattr__(self, "api_key_file", None)  # read once
        if any(not k or k != k.strip() for k in self.api_key):
            raise ValueError("api_key: a key must not be empty or start or end with spaces")
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None or isinstance(value, (bool, str, tuple)):
                continue
            if meta["size"]:
                object.__setattr__(self, f.name, value := parse_size(value))
            low, high = meta["minimum"], meta["maximum"]
            if (low is not None and value < low) or (high is not None and value > high):
                limits = f">= {low}" if high is None else f"between {low} and {high}"
                raise ValueError(f"{f.name} must be {limits}; got {value!r}")
        if self.isolate_tenants and not self.api_key:
            raise ValueError("isolate_tenants needs API keys (--api-key or --api-key-file): "
                             "tenants are told apart by their key")

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> ServerConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def read_key_file(path: str) -> tuple[str, ...]:
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read API key file {path!r}: {exc}") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    if not keys:
        raise ValueError(f"API key file {path!r} holds no key")
    return keys


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """One option per ServerConfig field, with its help text and default."""
    group = parser.add_argument_group("server options")
    for f in dataclasses.fields(ServerConfig):
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
            continue
        if meta["repeat"]:
            group.add_argument(flag, dest=f.name, action="append", default=None,
                               metavar=meta["metavar"], help=meta["help"])
            continue
        shown = f.default
        if meta["size"]:
            shown = format_size(f.default).replace(" ", "")
        help_text = meta["help"] if f.default is None else f"{meta['help']} (default: {shown})"
        metavar = meta["metavar"] or ("SIZE" if meta["size"] else "N" if f.type in (
            "int", "int | None") else None)
        group.add_argument(flag, dest=f.name, default=f.default, type=_cli_type(f, meta),
                           metavar=metavar, help=help_text)


def _cli_type(f: dataclasses.Field, meta: dict[str, Any]) -> Callable[[str], Any]:
    if meta["size"]:
        parse: Callable[[str], Any] = parse_size
    elif f.type in ("int", "int | None"):
        parse = int
    elif f.type in ("float", "float | None"):
        parse = float
    else:
        return str

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low, high = meta["minimum"], meta["maximum"]
        if (low is not None and value < low) or (high is not None and value > high):
            limits = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {limits}, got {text}")
        return value

    convert.__name__ = f.name
    return convert

"""kvserve: an LLM inference engine and OpenAI-compatible server built around the KV cache.

Start here:
  kvserve generate "Why is the sky blue?" --chat     stream an answer from the default model
  kvserve serve                                      an OpenAI-compatible server on :8000
  kvserve bench kv                                   the same prompt with and without a KV cache
  kvserve bench throughput                           continuous batching vs one at a time
  kvserve generate "Once upon a time" --model gemma3-270m   Gemma 3 270M (sliding windows)

Every command takes --help. The default model (SmolLM2-135M-Instruct) ships with the
install; --model takes a .gguf file or a Hugging Face model directory.
"""

from __future__ import annotations

import argparse
import sys

from kvserve import __version__
from kvserve.config import EngineConfig, add_cli_args, int_at_least
from kvserve.server.config import ServerConfig, add_server_args


class Parser(argparse.ArgumentParser):
    """Bad values end with one line naming the option, and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default shown after its help."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None
                or isinstance(action.default, bool) or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def positive_int(text: str) -> int:
    try:
        return int_at_least(1)(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling options")
    g.add_argument("--max-tokens", type=positive_int, default=64,
                   help="most new tokens (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 is greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches this "
                        "(default: 1.0, off)")
    g.add_argument("--top-k", type=int, default=0,
                   help="sample from the k most likely tokens (default: 0, off)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this fraction of the most likely "
                        "(default: 0, off)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kvserve", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"kvserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed",
                         description="Generate text for one prompt and stream it, then print "
                                     "the work and memory the KV cache took.",
                         formatter_class=HelpFormatter)
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--no-kv-cache", action="store_true",
                     help="recompute the whole sequence every step (the quadratic baseline)")
    add_sampling_args(gen)
    add_cli_args(gen)
    gen.set_defaults(run=cmd_generate)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server",
                           description="Serve the model over HTTP: /v1/completions, "
                                       "/v1/chat/completions, /generate, /cache/*, /metrics.",
                           formatter_class=HelpFormatter)
    add_server_args(serve)
    add_cli_args(serve)
    serve.set_defaults(run=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks that print tables and write JSON",
                           description="Benchmarks: each prints a table and takes --json PATH.",
                           formatter_class=HelpFormatter)
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    from kvserve.bench import (
        compare,
        decode,
        grammar,
        kv,
        kv_dtype,
        prefix,
        replicas,
        report,
        serve,
        sweep,
        throughput,
        window,
    )

    for module in (kv, decode, throughput, prefix, kv_dtype, replicas, serve, compare, sweep,
                   window, grammar, report):
        p = benches.add_parser(module.NAME, help=module.HELP, description=module.HELP,
                               formatter_class=HelpFormatter)
        module.add_args(p)
        if getattr(module, "ENGINE_ARGS", True):  # not for benches of a server already running
            add_cli_args(p)
        p.set_defaults(run=module.run)
    return parser


def cmd_generate(args: argparse.Namespace) -> None:
    from kvserve.bench.common import console
    from kvserve.engine.llm import LLM
    from kvserve.sampling_params import SamplingParams
    from kvserve.units import format_size

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            seed=args.seed, use_kv_cache=not args.no_kv_cache)
    llm = LLM(config=EngineConfig.from_cli(args))
    prompt = (llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
              if args.chat else args.prompt)
    out = None
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.delta)
        sys.stdout.flush()
    assert out is not None
    elapsed = out.metrics.finish_time - out.metrics.arrival_time
    n = len(out.token_ids)
    mode = "no KV cache" if args.no_kv_cache else "KV cache"
    console.print(
        f"\n[dim]{mode}: {len(out.prompt_token_ids)} prompt tokens, {n} new tokens "
        f"({out.finish_reason}) in {elapsed:.2f} s, {n / elapsed:.1f} tokens/s, "
        f"TTFT {out.metrics.ttft * 1000:.0f} ms, KV work {out.work_tokens:,} tokens, "
        f"peak KV {format_size(out.kv_bytes_peak)}[/dim]")


def cmd_serve(args: argparse.Namespace) -> None:
    from kvserve.server.app import run_server

    run_server(EngineConfig.from_cli(args), ServerConfig.from_cli(args))


def main(argv: list[str] | None = None) -> int:
    from kvserve.model.errors import ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        EngineConfig.from_cli(args) if "dtype" in args else None  # bad values: before any load
        ServerConfig.from_cli(args) if "max_body_size" in args else None
    except ValueError as e:
        parser.exit(2, f"kvserve: error: {e}\n")
    try:
        args.run(args)
    except (ModelLoadError, ValueError) as e:
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

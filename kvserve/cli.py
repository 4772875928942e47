"""`kvserve` command line: parse, call, print."""

from __future__ import annotations

import argparse
import sys

from kvserve.units import parse_size


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a .gguf file or a Hugging Face model directory (default: SmolLM2-135M)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--kv-cache-memory", default="1GiB", type=parse_size,
                   help="memory for KV blocks, e.g. 512MiB")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for bfloat16/float16 (default: all); float32 matmuls "
                        "use numpy's BLAS threads (OPENBLAS_NUM_THREADS)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse KV blocks across requests")
    p.add_argument("--kv-host-memory", type=parse_size, default=None,
                   help="host-memory tier for evicted blocks (default: 4GiB on a GPU, off on CPU)")
    p.add_argument("--kv-disk-cache", default=None, metavar="DIR",
                   help="disk tier for evicted blocks; survives restarts")
    p.add_argument("--kv-disk-size", type=parse_size, default="10GiB")
    p.add_argument("--schedule-policy", choices=["fcfs", "lpm"], default="fcfs",
                   help="lpm: waiting requests with the longest cached prefix first")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=args.model, dtype=args.dtype, device=args.device,
                kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=args.max_model_len, num_threads=args.threads,
                enable_prefix_caching=not args.no_prefix_cache,
                kv_host_memory=args.kv_host_memory, kv_disk_cache=args.kv_disk_cache,
                kv_disk_size=args.kv_disk_size, schedule_policy=args.schedule_policy)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--no-kv-cache", action="store_true",
                     help="recompute the whole sequence every step (the quadratic baseline)")
    add_sampling_args(gen)
    add_engine_args(gen)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1, /generate and /cache")
    serve.add_argument("--max-waiting", type=int, default=None,
                       help="requests waiting for their first token before new ones get 503")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: the model's own name)")
    add_engine_args(serve)
    serve.set_defaults(run=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from kvserve.bench import compare, decode, kv, prefix, report, serve, sweep, throughput

    for module in (kv, decode, throughput, prefix, serve, compare, sweep, report):
        p = bench.add_parser(module.NAME, help=module.HELP)
        module.add_args(p)
        if getattr(module, "ENGINE_ARGS", True):  # not for benches of a server already running
            add_engine_args(p)
        p.set_defaults(run=module.run)
    return parser


def cmd_generate(args: argparse.Namespace) -> None:
    from kvserve.bench.common import console
    from kvserve.engine.llm import LLM
    from kvserve.sampling_params import SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            seed=args.seed, use_kv_cache=not args.no_kv_cache)
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
        f"TTFT {out.metrics.ttft * 1000:.0f} ms, KV work {out.num_tokens_computed} tokens, "
        f"peak KV {out.kv_bytes_peak:,} B[/dim]")


def cmd_serve(args: argparse.Namespace) -> None:
    from kvserve.engine.engine import EngineConfig
    from kvserve.server.app import run_server

    run_server(EngineConfig(**engine_kwargs(args)), args.host, args.port, api_key=args.api_key,
               max_waiting=args.max_waiting, served_model_name=args.served_model_name)


def main(argv: list[str] | None = None) -> int:
    from kvserve.model.errors import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            cmd_generate(args)
        else:
            args.run(args)
    except (ModelLoadError, ValueError) as e:
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

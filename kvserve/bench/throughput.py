"""`kvserve bench throughput`: the same requests batched through the engine and one by one."""

from __future__ import annotations

import argparse
import random
import time

from rich.table import Table

from kvserve.bench.common import console, environment, run_transformers_peer, write_json
from kvserve.units import format_size

NAME = "throughput"
HELP = "continuous batching vs one request at a time, on random-token prompts"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=64, help="requests sent at once")
    p.add_argument("--input-len", type=int, default=128,
                   help="prompt tokens per request (random ids)")
    p.add_argument("--output-len", type=int, default=128, help="new tokens per request")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--transformers-batch", type=int, default=16, metavar="N",
                   help="also run the requests through transformers' generate in static "
                        "batches of N (0: skip)")
    p.add_argument("--structured", type=int, default=0, metavar="ROUNDS",
                   help="also run the batch free and with every request constrained to a JSON "
                        "schema (BENCH_SCHEMA), alternately, ROUNDS times each, and report the "
                        "grammar masks' cost (0: skip)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result to this JSON file")


# Records that cannot end within any --output-len here (at least 200 of them), so the
# constrained run generates exactly as many tokens as the free one, each through a mask.
BENCH_SCHEMA = {"type": "object", "properties": {"items": {
    "type": "array", "minItems": 200, "items": {
        "type": "object", "properties": {
            "name": {"type": "string", "maxLength": 12},
            "qty": {"type": "integer", "minimum": 0, "maximum": 99},
            "kind": {"enum": ["tool", "part", "service"]}},
        "required": ["name", "qty", "kind"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False}


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the lowest ids, where models keep their special tokens.
    return [[rng.randrange(100, vocab_size) for _ in range(length)] for _ in range(num)]


def measure(llm, prompts: list[list[int]], params, batched: bool) -> dict:
    engine = llm.engine
    engine.reset_peak_usage()
    preemptions = engine.stats().scheduler.num_preemptions
    start = time.perf_counter()
    if batched:
        outs = llm.generate(prompts, params, use_tqdm=True)
    else:
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.token_ids) for o in outs)
    num_in = sum(len(p) for p in prompts)
    return {
        "output_tokens_per_s": num_out / elapsed,
        "total_tokens_per_s": (num_out + num_in) / elapsed,
        "elapsed_s": elapsed,
        "peak_kv_bytes": engine.stats().peak_used_blocks * engine.block_bytes,
        "preemptions": engine.stats().scheduler.num_preemptions - preemptions,
        "token_ids": [o.token_ids for o in outs],
    }


def measure_structured(llm, prompts: list[list[int]], params, rounds: int) -> dict:
    """The batch free and constrained to BENCH_SCHEMA, alternately, ``rounds`` times each (a
    shared machine's load drifts: alternating exposes both to it alike); the best round of
    each is compared. The schema is compiled before the clock starts (once, then cached);
    each constrained output is checked to start as the schema's JSON."""
    import dataclasses

    from kvserve.sampling_params import StructuredOutputs

    spec = StructuredOutputs(json=BENCH_SCHEMA)
    start = time.perf_counter()
    llm.engine.grammars.compile(spec)
    compile_s = time.perf_counter() - start
    constrained = dataclasses.replace(params, structured_outputs=spec)
    free_runs, constrained_runs, texts = [], [], []
    for _ in range(rounds):
        free_runs.append(measure(llm, prompts, params, batched=True)["output_tokens_per_s"])
        run = measure(llm, prompts, constrained, batched=True)
        constrained_runs.append(run["output_tokens_per_s"])
        texts = [llm.tokenizer.decode(ids) for ids in run["token_ids"]]
    best_free, best_constrained = max(free_runs), max(constrained_runs)
    return {"free_tokens_per_s": free_runs, "constrained_tokens_per_s": constrained_runs,
            "slowdown": 1 - best_constrained / best_free,
            "compile_s": compile_s,  # the vocabulary's index, built on first use, included
            "all_start_as_json": all(t.startswith('{"items": [{"name": "') for t in texts)}


def transformers_run(model_path, dtype: str, prompts: list[list[int]], output_len: int,
                     batch_size: int) -> dict:
    """The same requests through transformers' generate, batch_size prompts at a time (the
    prompts are of equal length, so no padding), greedy, exactly output_len tokens each."""
    import torch

    from kvserve.bench.common import transformers_model

    model = transformers_model(model_path, dtype)
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    with torch.inference_mode():
        model.generate(torch.tensor(batches[0][:1]), max_new_tokens=4, do_sample=False)  # warm
        start = time.perf_counter()
        for batch in batches:
            ids = torch.tensor(batch)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                           min_new_tokens=output_len, do_sample=False)
        elapsed = time.perf_counter() - start
    num_out, num_in = len(prompts) * output_len, sum(len(p) for p in prompts)
    return {"batch_size": batch_size, "output_tokens_per_s": num_out / elapsed,
            "total_tokens_per_s": (num_out + num_in) / elapsed, "elapsed_s": elapsed}


def run(args: argparse.Namespace) -> dict:
    from kvserve.config import EngineConfig
    from kvserve.engine.llm import LLM
    from kvserve.sampling_params import SamplingParams

    llm = LLM(config=EngineConfig.from_cli(args))
    prompts = random_prompts(args.num_prompts, args.input_len, llm.engine.model_config.vocab_size,
                             args.seed)
    # The two runs send the same prompts: prefix caching would serve the second from the first.
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True,
                            use_prefix_cache=False)
    console.print(f"[bold]kvserve bench throughput[/bold]: {args.num_prompts} prompts x "
                  f"{args.input_len} tokens in, {args.output_len} out, dtype {args.dtype}, "
                  f"device {llm.engine.device}, max_num_seqs {args.max_num_seqs}")
    llm.generate([prompts[0]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
    batched = measure(llm, prompts, params, batched=True)
    with console.status(f"one at a time: {args.num_prompts} requests..."):
        sequential = measure(llm, prompts, params, batched=False)
    if args.structured:
        result_structured = measure_structured(llm, prompts, params, args.structured)
    pairs = list(zip(batched.pop("token_ids"), sequential.pop("token_ids")))
    num_same = sum(a == b for a, b in pairs)
    result = {
        "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "dtype": args.dtype,
        "speedup": batched["output_tokens_per_s"] / sequential["output_tokens_per_s"],
        "identical_tokens": num_same == len(pairs), "identical_sequences": num_same,
        "batched": batched, "sequential": sequential, "transformers": None,
        "speedup_vs_transformers": None, "env": environment(args),
    }
    if args.structured:
        result["structured"] = result_structured
    if args.transformers_batch > 0:
        theirs = run_transformers_peer(
            f"transformers, static batches of {args.transformers_batch}",
            lambda: transformers_run(args.model, args.dtype, prompts, args.output_len,
                                     args.transformers_batch))
        if theirs:
            result["transformers"] = theirs
            result["speedup_vs_transformers"] = (batched["output_tokens_per_s"]
                                                 / theirs["output_tokens_per_s"])
    print_table(result)
    write_json(args.json, result)
    return result


def print_table(r: dict) -> None:
    t = Table(title="continuous batching vs one at a time")
    t.add_column("metric")
    t.add_column("batched", style="green", justify="right")
    t.add_column("one at a time", style="red", justify="right")
    h = r["transformers"]
    if h:
        t.add_column(f"transformers, batches of {h['batch_size']}", justify="right")
    b, s = r["batched"], r["sequential"]
    rows = [("output tokens/s", "output_tokens_per_s", "{:.1f}"),
            ("total tokens/s", "total_tokens_per_s", "{:.1f}"),
            ("elapsed", "elapsed_s", "{:.1f} s")]
    for label, key, fmt in rows:
        peer = [fmt.format(h[key])] if h else []
        t.add_row(label, fmt.format(b[key]), fmt.format(s[key]), *peer)
    t.add_row("peak KV memory", format_size(b["peak_kv_bytes"]), format_size(s["peak_kv_bytes"]))
    t.add_row("preemptions", str(b["preemptions"]), str(s["preemptions"]))
    console.print(t)
    if "structured" in r:
        c = r["structured"]
        rounds = ", ".join(f"{f:.1f} / {s:.1f}" for f, s in zip(c["free_tokens_per_s"],
                                                                c["constrained_tokens_per_s"]))
        console.print(f"JSON schema on every request: output tokens/s free / constrained, "
                      f"batched, by round: {rounds}; best constrained is "
                      f"[bold]{100 * c['slowdown']:.1f}%[/bold] slower than best free (grammar "
                      f"compiled in {c['compile_s']:.2f} s, once); outputs follow the schema: "
                      f"{c['all_start_as_json']}.")
    same = ("identical" if r["identical_tokens"] else
            f"identical for {r['identical_sequences']} of {r['num_prompts']} requests")
    console.print(f"Batched is [bold]{r['speedup']:.2f}x[/bold] the output tokens/s of one at a "
                  f"time; greedy tokens {same}. A decode step reads every weight once whatever "
                  f"the batch, so serving many sequences per step multiplies throughput.")
    if h:
        console.print(f"Batched is [bold]{r['speedup_vs_transformers']:.2f}x[/bold] the output "
                      f"tokens/s of transformers' generate in static batches of "
                      f"{h['batch_size']}.")

"""The int8 KV cache on the real model: accuracy next to a float cache of the same weights,
the bytes it is counted at, and a disk folder shared with a float engine."""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path

import pytest
import torch
from prompts import PROMPTS  # tests/engine, on the path as the tests' own folder

from kvserve import LLM, SamplingParams
from kvserve.runner.inputs import prepare_inputs
from kvserve.step import ScheduledRequest

TEXT = Path(__file__).parent / "data" / "river.txt"
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def float_kv(checkpoint):
    return LLM(model=checkpoint, device="cpu", enable_prefix_caching=False)


@pytest.fixture(scope="module")
def int8_kv(checkpoint):
    return LLM(model=checkpoint, device="cpu", kv_cache_dtype="int8",
               enable_prefix_caching=False)


@torch.inference_mode()
def perplexity(llm: LLM, ids: list[int], chunk: int = 256) -> float:
    """Perplexity of ``ids`` in chunks: each chunk after the first reads the ones before it
    from the cache. Writes the first blocks of an idle engine's pool directly."""
    engine = llm.engine
    assert not engine.has_unfinished() and engine.kv.pool.num_cached == 0
    runner, block_size = engine.runner, engine.config.block_size
    table = list(range(-(-len(ids) // block_size)))
    logits = []
    for start in range(0, len(ids), chunk):
        s = ScheduledRequest("ppl", ids[start : start + chunk], start, table, GREEDY, False)
        input_ids, positions, meta = prepare_inputs([s], block_size, runner.device,
                                                    runner.decode_kernel)
        logits.append(runner.model.compute_logits(runner.model(input_ids, positions, meta)))
    nll = torch.nn.functional.cross_entropy(torch.cat(logits)[:-1].double(),
                                            torch.tensor(ids[1:]))
    return math.exp(nll.item())


def test_perplexity_within_half_a_percent_of_float_kv(float_kv, int8_kv):
    ids = float_kv.tokenizer.encode(TEXT.read_text())[:512]
    assert len(ids) == 512
    reference, quantized = perplexity(float_kv, ids), perplexity(int8_kv, ids)
    assert 10 < reference < 60  # a real model reading real text
    assert abs(quantized / reference - 1) < 0.005, (reference, quantized)


def test_greedy_continuations_match_float_kv(float_kv, int8_kv):
    """At least 7 of 8 greedy continuations equal the float cache's for 32 tokens, and where
    one differs, the float cache's first and second choices at that token were close (under
    0.25 nats apart; most tokens here are 1-4 nats clear): int8 only tips near ties."""
    reference = float_kv.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0,
                                                          ignore_eos=True, logprobs=2))
    got = [o.token_ids for o in int8_kv.generate(PROMPTS, GREEDY)]
    assert sum(a == r.token_ids for a, r in zip(got, reference)) >= 7
    for a, r in zip(got, reference):
        first = next((i for i, (x, y) in enumerate(zip(a, r.token_ids)) if x != y), None)
        if first is not None:
            top = sorted(r.logprobs[first].values(), reverse=True)
            assert top[0] - top[1] < 0.25, (first, top)


def test_bytes_are_counted_at_int8_size(checkpoint, float_kv, int8_kv):
    config = checkpoint.config
    row = config.head_dim + 8  # int8 values and a bfloat16 scale per 16 of them
    assert int8_kv.engine.kv_bytes_per_token == 2 * config.num_layers * config.num_kv_heads * row
    assert float_kv.engine.kv_bytes_per_token == 46_080
    for llm in (float_kv, int8_kv):  # the same --kv-cache-memory holds 3.56x the tokens
        stats, cache = llm.stats(), llm.cache_stats()["tiers"]["device"]
        assert stats["kv_block_bytes"] == 16 * llm.engine.kv_bytes_per_token
        assert cache["bytes"] == stats["kv_blocks_total"] * stats["kv_block_bytes"] <= 1 << 30
        assert llm.engine.runner.kv_cache.nbytes == cache["bytes"]
    assert int8_kv.stats()["kv_blocks_total"] == (1 << 30) // (16 * 2 * 30 * 3 * 72)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    out = int8_kv.generate(PROMPTS[0], params)[0]
    assert out.kv_bytes_peak == (len(out.prompt_token_ids) + 4 - 1) * 12_960


@pytest.fixture(scope="module")
def tiny16(tiny_checkpoint):
    """The tiny random model with 16-channel heads: int8 rows take their scales per 16."""
    from kvserve.model.loader import Checkpoint, expected_tensor_shapes

    config = dataclasses.replace(tiny_checkpoint.config, head_dim=16)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen) * 0.2
               for name, shape in expected_tensor_shapes(config).items()}
    return Checkpoint(config, tensors, tiny_checkpoint.tokenizer, "tiny-random-16")


def test_int8_needs_heads_in_groups_of_16(tiny_checkpoint):
    with pytest.raises(ValueError, match="head_dim that is a multiple of 16 .this model's is 8"):
        LLM(model=tiny_checkpoint, device="cpu", kv_cache_dtype="int8")


def test_int8_and_float_engines_never_read_each_others_blocks(tiny16, tmp_path):
    """One disk folder, two engines: each finds only its own format's blocks, and each gives
    its own tokens after a restart on the shared folder (a small random model: the rule is
    the formats', not the weights')."""
    prompt = list(range(100, 140))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    refs, formats = {}, set()
    for kv_dtype in ("int8", "auto"):
        first = LLM(model=tiny16, device="cpu", kv_cache_dtype=kv_dtype,
                    kv_disk_cache=str(tmp_path))
        out = first.generate(prompt, params)[0]
        refs[kv_dtype] = out.token_ids
        assert out.cached_tokens_by_tier.get("disk", 0) == 0  # never the other's blocks
        first.engine.kv.pool.allocate(first.engine.kv.num_free_blocks)  # evict all to disk
        first.engine.step()
        first.close()
        formats.add(first.engine.kv.tiers.disk.kv_format)
    assert formats == {b"int8+bf16-absmax-scale-per-16+hadamard-k@float32;v1;2x2x16x2x18",
                       b"float32;v1;2x2x16x2x16"}
    on_disk = set()
    for f in tmp_path.rglob("*"):
        if f.is_file():
            raw = f.read_bytes()
            on_disk.add(raw[46 : 46 + struct.unpack_from("<H", raw, 44)[0]])
    assert on_disk == formats  # both engines' records, side by side
    disks, own = {}, {}
    for kv_dtype in ("int8", "auto"):
        rebuilt = LLM(model=tiny16, device="cpu", kv_cache_dtype=kv_dtype,
                      kv_disk_cache=str(tmp_path))
        out = rebuilt.generate(prompt, params)[0]
        assert out.token_ids == refs[kv_dtype]
        assert out.cached_tokens_by_tier["disk"] == 32  # its own two full blocks
        rebuilt.engine.check_integrity()
        disks[kv_dtype] = rebuilt.engine.kv.tiers.disk
        own[kv_dtype] = {h for h in rebuilt.engine.kv.pool.block_hash if h is not None}
        assert disks[kv_dtype].num_skipped == 0  # the other's hashes are never looked up
    for mine, other in (("int8", "auto"), ("auto", "int8")):  # asked for them regardless,
        for h in own[other]:  # each tier reads the record's format and refuses it
            assert disks[mine].get(h, tuple(prompt[:16])) is None
        assert disks[mine].num_skipped == len(own[other]) == 2


def test_kv_cache_dtype_option():
    from kvserve.config import EngineConfig
    from kvserve.engine.engine import Engine

    assert EngineConfig().kv_dtype == "float32"  # auto, until an engine resolves it
    assert EngineConfig(dtype="bfloat16").kv_dtype == "bfloat16"
    assert EngineConfig(dtype="bfloat16", kv_cache_dtype="int8").kv_dtype == "int8"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32"):
        EngineConfig(kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="int8 runs on a CPU only"):  # before any loading
        Engine(EngineConfig(device="cuda", kv_cache_dtype="int8"))


def test_auto_is_int8_for_native_blocks_where_the_kernel_reads_int8(checkpoint, tiny_checkpoint):
    from kvserve.config import EngineConfig
    from kvserve.engine.kv_setup import resolve_kv_dtype

    model, auto = checkpoint.config, EngineConfig()
    assert resolve_kv_dtype(auto, model, True, True).kv_cache_dtype == "int8"
    assert resolve_kv_dtype(auto, model, False, True).kv_cache_dtype == "float32"  # dequantized
    assert resolve_kv_dtype(auto, model, True, False).kv_cache_dtype == "float32"  # no kernel
    bf16 = EngineConfig(dtype="bfloat16")
    assert resolve_kv_dtype(bf16, tiny_checkpoint.config, True, True).kv_dtype == "bfloat16"
    chosen = EngineConfig(kv_cache_dtype="float32")
    assert resolve_kv_dtype(chosen, model, True, True) is chosen


def test_default_engine_on_the_gguf_blocks_keeps_int8(checkpoint, float_kv):
    from kvserve.model.cpu_kernels import load_library
    from kvserve.model.loader import load_checkpoint

    native = load_checkpoint(quantization="gguf")
    llm = LLM(model=native, device="cpu", kv_cache_memory="16MiB")
    expected = "int8" if native.is_quantized and load_library() is not None else "float32"
    assert llm.engine.config.kv_dtype == expected
    assert llm.engine.kv_bytes_per_token == checkpoint.config.kv_bytes_per_token(expected)
    assert float_kv.engine.config.kv_dtype == "float32"  # the dequantized checkpoint

"""The default model computed on its GGUF blocks (Q4_1 layers, Q8_0 embedding and LM head)
against the same weights dequantized to float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvserve import SamplingParams
from kvserve.model import llama
from kvserve.model.attention import AttentionMetadata, PrefillSpan
from kvserve.model.gguf_blocks import QuantTensor
from kvserve.model.llama import build_model
from kvserve.model.loader import load_checkpoint
from kvserve.model.quant import QuantEmbedding, QuantLinear, quant_kernel

pytestmark = pytest.mark.skipif(quant_kernel() is None, reason="needs g++ and AVX2")

# About 512 tokens of plain English.
TEXT = (
    "The printing press changed the way ideas moved through Europe. Before it, a book was "
    "copied by hand, letter by letter, and a single copy of a long work could take a scribe "
    "many months. Books were rare and expensive, and most of them were kept in monasteries, "
    "universities and the houses of the rich. When Johannes Gutenberg began to print with "
    "movable metal type in the middle of the fifteenth century, the cost of making a book fell "
    "sharply. A small workshop could produce hundreds of identical copies in the time a scribe "
    "needed for one. Within fifty years, presses were working in more than two hundred cities, "
    "and millions of volumes had been printed. The effects reached far beyond the trade in "
    "books. Scholars could compare the same text in different places and know that they were "
    "reading the same words. Errors could be found and corrected in the next edition instead of "
    "being copied forever. Maps, tables and diagrams, which were hard to copy by hand without "
    "mistakes, could be reproduced exactly, and this helped the growth of science, navigation "
    "and medicine. Pamphlets and broadsheets spread news and arguments quickly, and people who "
    "had never owned a book began to read. Governments and churches soon understood the power "
    "of the new machines. Some tried to control what was printed by granting licenses to a few "
    "trusted printers, while others used the press to spread their own messages. The religious "
    "debates of the sixteenth century were fought as much with printed pages as with sermons. "
    "At the same time, the market for books encouraged writers to use the languages people "
    "spoke every day rather than Latin, and spelling and grammar slowly became more uniform. "
    "Printing also changed the way people learned. Students no longer had to copy their own "
    "textbooks, and teachers could expect every student to have the same page in front of them. "
    "Libraries grew larger, and catalogues and indexes were invented to help readers find what "
    "they needed. Over the following centuries, presses became faster and cheaper. Steam power, "
    "rolls of paper and new ways of setting type made daily newspapers possible, and by the "
    "nineteenth century reading had become an ordinary part of life for many people in cities. "
    "Historians still argue about how much of the modern world can be traced back to that "
    "first workshop in Mainz, but few doubt that the ability to copy words cheaply and exactly "
    "was one of the great turning points in the history of knowledge. Today the same questions "
    "return with every new way of copying and sharing words, from the telegraph and the radio to "
    "the computer networks that now carry more text in a second than all the presses of Europe "
    "printed in a year."
)
PROMPTS = ["Name three rivers in Europe.", "What is the capital of Japan?",
           "Write a haiku about the sea.", "Explain what a CPU cache is.",
           "List four colours of the rainbow.", "How many legs does a spider have?",
           "Give me a tip for learning to cook.", "What does a KV cache store?"]


@pytest.fixture(scope="module")
def native():
    return load_checkpoint(quantization="gguf")


def logits(checkpoint, ids: list[int], dtype=torch.float32) -> torch.Tensor:
    """One prefill of ``ids`` through build_model, with a private cache."""
    config = checkpoint.config
    model = build_model(config, checkpoint.tensors, dtype, torch.device("cpu"), 1024)
    n = len(ids)
    for layer in model.layers:
        layer.self_attn.k_cache = torch.zeros(n, config.num_kv_heads, config.head_dim, dtype=dtype)
        layer.self_attn.v_cache = torch.zeros(n, config.num_kv_heads, config.head_dim, dtype=dtype)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=(PrefillSpan(0, n),))
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), meta))


def test_blocks_are_kept_memory_mapped_and_equal_the_dequantized_weights(native, checkpoint):
    quantized = {n: t for n, t in native.tensors.items() if isinstance(t, QuantTensor)}
    assert {t.qtype.name for t in quantized.values()} == {"Q4_1", "Q8_0"}
    assert len(quantized) == 30 * 7 + 1  # every projection, and the tied embedding
    for name, t in quantized.items():
        assert torch.equal(t.dequantize(), checkpoint.tensors[name]), name
    assert isinstance(quantized["model.layers.0.self_attn.o_proj.weight"].data, np.memmap)
    assert isinstance(quantized["model.embed_tokens.weight"].data, np.memmap)
    assert not isinstance(quantized["model.layers.0.self_attn.q_proj.weight"].data, np.memmap)
    assert native.fingerprint != checkpoint.fingerprint  # their K/V differ slightly


def test_model_computes_on_the_blocks_with_one_copy(native):
    model = build_model(native.config, native.tensors, torch.float32, torch.device("cpu"), 64)
    assert isinstance(model.embed_tokens, QuantEmbedding)
    assert isinstance(model.layers[0].mlp.gate_up_proj, QuantLinear)
    assert model.lm_head.parts[0] is model.embed_tokens.weight_blocks  # tied: shared
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert float_bytes < 200_000  # only the norms are float


def test_native_path_stays_close_to_dequantized_float32(native, checkpoint):
    """Perplexity within 1% and top-1 agreement >= 97% over ~512 tokens of English."""
    ids = checkpoint.tokenizer.encode(TEXT)[:512]
    assert len(ids) == 512
    ref, got = logits(checkpoint, ids), logits(native, ids)
    target = torch.tensor(ids[1:])

    def perplexity(x: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(x[:-1], target).exp().item()

    ppl_ref, ppl_got = perplexity(ref), perplexity(got)
    assert abs(ppl_got / ppl_ref - 1) < 0.01, (ppl_ref, ppl_got)  # measured: 0.1%
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.97, agree  # measured: 99%
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.03, rel  # measured: 1.3%


def test_without_the_kernel_the_model_is_the_float_model(native, checkpoint, monkeypatch):
    ids = checkpoint.tokenizer.encode(TEXT)[:24]
    monkeypatch.setattr(llama, "quant_kernel", lambda: None)
    assert torch.equal(logits(native, ids), logits(checkpoint, ids))


def test_greedy_alone_equals_batched_and_follows_float32(native, llm):
    from kvserve import LLM

    engine = LLM(model=native, dtype="float32", device="cpu", kv_cache_memory="64MiB")
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ids = [engine.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    batched = [o.token_ids for o in engine.generate(ids, params)]
    alone = [engine.generate([p], params)[0].token_ids for p in ids]
    assert alone == batched
    engine.engine.check_integrity()
    reference = [o.token_ids for o in llm.generate(ids, params)]
    same = sum(a == b for a, b in zip(batched, reference))
    assert same >= 6, f"{same} of 8 continuations equal the float32 path's"


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.int8)])
def test_decode_layers_in_one_call_equal_the_modules_bit_for_bit(native, dtype, cache_dtype):
    """The C++ layer sequence of a decode step (llama.DecodeLayers) against the layers'
    forward: the same hidden states and the same new cache rows, for 1 and 3 sequences."""
    from kvserve.model.cpu_kernels import paged_decode_kernel, row_width

    config, bs = native.config, 16
    model = build_model(config, native.tensors, dtype, torch.device("cpu"), 256)
    fused = model.decode_layers
    assert fused is not None
    row = row_width(config.head_dim, cache_dtype)
    for layer in model.layers:
        for name in ("k_cache", "v_cache"):
            setattr(layer.self_attn, name,
                    torch.zeros(3 * 64, config.num_kv_heads, row, dtype=cache_dtype))
    kernel = paged_decode_kernel(2)
    tables = torch.arange(12).view(3, 4)  # sequence i: blocks 4i..4i+3 (64 slots)
    prompts = [PROMPTS[0], PROMPTS[3], TEXT[:200]]
    ids = [native.tokenizer.encode(p) for p in prompts]
    with torch.inference_mode():
        for i, seq in enumerate(ids):  # prefill through the modules
            n = len(seq)
            meta = AttentionMetadata(slot_mapping=64 * i + torch.arange(n),
                                     positions=torch.arange(n), block_size=bs,
                                     decode_kernel=kernel,
                                     prefills=(PrefillSpan(0, n, block_table=tables[i]),))
            model(torch.tensor(seq), torch.arange(n), meta)
        for rows in ([1], [0, 1, 2]):
            lens = torch.tensor([len(ids[i]) for i in rows])
            meta = AttentionMetadata(
                slot_mapping=64 * torch.tensor(rows) + lens, positions=lens, block_size=bs,
                num_decodes=len(rows), decode_blocks=tables[rows].contiguous(),
                decode_len=int(lens.max()) + 1, decode_lens=lens + 1, decode_kernel=kernel)
            step = torch.tensor([ids[i][-1] for i in rows])
            before = [(a.k_cache.clone(), a.v_cache.clone()) for a in fused.attns]
            x = model.embed_tokens(step)
            assert fused.supports(x, meta)
            got = model(step, lens, meta)
            got_cache = [(a.k_cache.clone(), a.v_cache.clone()) for a in fused.attns]
            for a, (k, v) in zip(fused.attns, before):
                a.k_cache.copy_(k)
                a.v_cache.copy_(v)
            model.decode_layers = None
            want = model(step, lens, meta)
            model.decode_layers = fused
            assert torch.equal(got, want)
            for a, (k, v) in zip(fused.attns, got_cache):
                assert torch.equal(a.k_cache, k) and torch.equal(a.v_cache, v)

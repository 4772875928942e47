"""Our decoder against transformers' implementation of the same GGUF weights: float32 to
rounding error, bfloat16 to what its 8-bit mantissa allows."""

import torch

from kvserve import SamplingParams
from kvserve.model.attention import AttentionMetadata, PrefillSpan
from kvserve.model.llama import build_model

TEXT = ("The KV cache stores the keys and values of every token seen so far, so that each new "
        "token attends to them without recomputing. Émoji 🙂, code `x = [i**2 for i in range(9)]`"
        " and numbers 1234567 all go through the same path.")


def our_logits(checkpoint, ids: list[int], dtype=torch.float32) -> torch.Tensor:
    config = checkpoint.config
    model = build_model(config, checkpoint.tensors, dtype, torch.device("cpu"), 256)
    n = len(ids)
    for layer in model.layers:  # a private cache of n slots; positions 0..n-1 -> slots 0..n-1
        layer.self_attn.k_cache = torch.zeros(n, config.num_kv_heads, config.head_dim, dtype=dtype)
        layer.self_attn.v_cache = torch.zeros(n, config.num_kv_heads, config.head_dim, dtype=dtype)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=(PrefillSpan(0, n),))
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(n), meta)
        return model.compute_logits(hidden)


def test_logits_match_transformers_on_a_64_token_prompt(checkpoint, hf_oracle):
    ids = checkpoint.tokenizer.encode(TEXT)[:64]
    assert len(ids) == 64
    ours = our_logits(checkpoint, ids)
    with torch.inference_mode():
        theirs = hf_oracle(torch.tensor([ids])).logits[0]
    err = (ours - theirs).abs().max().item()
    assert err < 1e-3, f"max abs logit error {err}"  # measured: about 7e-5


def test_greedy_continuation_matches_transformers(llm, hf_oracle):
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Name three rivers in Europe."}])
    ours = llm.generate([ids], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    with torch.inference_mode():
        out = hf_oracle.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, attention_mask=torch.ones(1, len(ids)))
    assert ours.token_ids == out[0, len(ids):].tolist()


def test_bfloat16_logits_stay_close_to_float32_transformers(checkpoint, hf_oracle):
    ids = checkpoint.tokenizer.encode(TEXT)[:64]
    ours = our_logits(checkpoint, ids, torch.bfloat16)
    with torch.inference_mode():
        theirs = hf_oracle(torch.tensor([ids])).logits[0]
    err = (ours - theirs).abs()
    assert err.mean() < 0.25, f"mean abs logit error {err.mean()}"  # measured: 0.10
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    assert agree >= 0.9, f"top-1 agrees at {agree:.0%} of positions"  # measured: 95%


def test_bfloat16_engine_greedy_matches_transformers(checkpoint, hf_oracle):
    """Through the engine: bfloat16 matmuls, the decode attention kernel, the fused norms."""
    from kvserve import LLM

    llm = LLM(model=checkpoint, dtype="bfloat16", device="cpu", kv_cache_memory="64MiB")
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Name three rivers in Europe."}])
    ours = llm.generate([ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    with torch.inference_mode():
        out = hf_oracle.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16,
                                 do_sample=False, attention_mask=torch.ones(1, len(ids)))
    assert ours.token_ids == out[0, len(ids):].tolist()  # measured: the first 32 agree
    llm.engine.check_integrity()
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]

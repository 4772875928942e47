"""Our decoder against transformers' implementation of the same GGUF weights, float32."""

import torch

from kvserve import SamplingParams
from kvserve.model.attention import AttentionMetadata, PrefillSpan
from kvserve.model.llama import build_model

TEXT = ("The KV cache stores the keys and values of every token seen so far, so that each new "
        "token attends to them without recomputing. Émoji 🙂, code `x = [i**2 for i in range(9)]`"
        " and numbers 1234567 all go through the same path.")


def our_logits(checkpoint, ids: list[int]) -> torch.Tensor:
    config = checkpoint.config
    model = build_model(config, checkpoint.tensors, torch.float32, torch.device("cpu"), 256)
    n = len(ids)
    for layer in model.layers:  # a private cache of n slots; positions 0..n-1 -> slots 0..n-1
        layer.self_attn.k_cache = torch.zeros(n, config.num_kv_heads, config.head_dim)
        layer.self_attn.v_cache = torch.zeros(n, config.num_kv_heads, config.head_dim)
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

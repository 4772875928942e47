"""The work meter, exactly, on a tiny random-weight model (fast)."""

import pytest

from kvserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return LLM(model=tiny_checkpoint, device="cpu", kv_cache_memory="64MiB",
               max_num_batched_tokens=4096)


def work(llm, prompt_len: int, n: int, use_kv_cache: bool) -> int:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                            use_kv_cache=use_kv_cache)
    out = llm.generate([list(range(100, 100 + prompt_len))], params)[0]
    assert len(out.token_ids) == n
    return out.work_tokens


@pytest.mark.parametrize("prompt_len,n", [(5, 1), (5, 7), (12, 40)])
def test_exact_counts(tiny, prompt_len, n):
    assert work(tiny, prompt_len, n, True) == prompt_len + n - 1
    assert work(tiny, prompt_len, n, False) == sum(prompt_len + i for i in range(n))


def test_ratio_is_above_100_at_p5_n1000_and_grows_with_n(tiny):
    ratios = {}
    for n in (100, 1000):
        ratios[n] = work(tiny, 5, n, False) / work(tiny, 5, n, True)
    assert ratios[1000] > 100
    assert ratios[1000] > ratios[100]
    assert tiny.stats()["kv_blocks_free"] == tiny.stats()["kv_blocks_total"]


def test_kv_bytes_formula_from_configs(checkpoint):
    from kvserve.model.loader import config_from_hf_dict

    assert checkpoint.config.kv_bytes_per_token("float32") == 46_080
    llama3_8b = config_from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5})
    assert llama3_8b.kv_bytes_per_token("bfloat16") == 131_072

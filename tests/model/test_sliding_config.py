"""Sliding windows read from a model's config, and what is refused (no model file needed)."""

import dataclasses

import pytest

from kvserve.model.config import ModelConfig
from kvserve.model.errors import ModelLoadError
from kvserve.model.gguf_loader import _gemma3_windows
from kvserve.model.hf_loader import config_from_hf_dict, config_to_hf_dict
from kvserve.model.registry import check_supported

BASE = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_mistral_window_applies_to_every_layer_and_round_trips():
    config = config_from_hf_dict(BASE | {"model_type": "mistral", "sliding_window": 4096})
    assert config.windows == (4096,) * 4
    assert config.kv_groups() == [(4096, [0, 1, 2, 3])]
    assert config_from_hf_dict(config_to_hf_dict(config)).windows == config.windows
    assert config_from_hf_dict(BASE | {"model_type": "mistral", "sliding_window": None}
                               ).layer_windows == ()


def test_qwen2_window_only_when_used():
    qwen = BASE | {"model_type": "qwen2", "sliding_window": 4096, "max_window_layers": 2}
    assert config_from_hf_dict(qwen).layer_windows == ()
    with pytest.raises(ModelLoadError, match="different sliding windows"):
        check_supported(config_from_hf_dict(qwen | {"use_sliding_window": True}))


def test_unknown_layer_types_are_refused_in_one_line():
    d = BASE | {"model_type": "mistral", "sliding_window": 8,
                "layer_types": ["chunked_attention"] * 4}
    with pytest.raises(ModelLoadError) as err:
        config_from_hf_dict(d)
    assert "\n" not in str(err.value) and "chunked_attention" in str(err.value)


def test_gemma3_pattern_from_the_gguf_metadata():
    windows = _gemma3_windows({"gemma3.attention.sliding_window": 512}, 12)
    assert windows == (512,) * 5 + (0,) + (512,) * 5 + (0,)
    bools = [True, False, True, True]
    assert _gemma3_windows({"gemma3.attention.sliding_window": 512,
                            "gemma3.attention.sliding_window_pattern": bools}, 4) == \
        (512, 0, 512, 512)
    for bad in ("every other", [True], 0):
        with pytest.raises(ModelLoadError, match="not understood"):
            _gemma3_windows({"gemma3.attention.sliding_window": 512,
                             "gemma3.attention.sliding_window_pattern": bad}, 4)
    with pytest.raises(ModelLoadError, match="sliding_window"):
        _gemma3_windows({}, 4)


def test_kv_bytes_held_formula():
    config = ModelConfig("gemma3", 100, 640, 2048, 6, 4, 1, 256, 32768,
                         layer_windows=(512,) * 5 + (0,))
    per_layer = 2 * 256 * 4
    assert config.kv_bytes_held(4096, "float32", 16) == (
        4096 * per_layer + 5 * (4096 - (4096 - 511) // 16 * 16) * per_layer)
    full = dataclasses.replace(config, layer_windows=())
    assert full.kv_bytes_held(4096, "float32", 16) == 4096 * full.kv_bytes_per_token("float32")

"""Which decoder runs which architecture: ``build_model`` for any supported config."""

from __future__ import annotations

import torch
from torch import nn

from kvserve.model import llama
from kvserve.model.config import ModelConfig
from kvserve.model.errors import ModelLoadError
from kvserve.model.gemma3 import Gemma3ForCausalLM
from kvserve.model.gguf_blocks import QuantTensor

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": llama.LlamaForCausalLM, "mistral": llama.LlamaForCausalLM,
    "qwen2": llama.LlamaForCausalLM, "qwen3": llama.LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}


def check_supported(config: ModelConfig) -> None:
    """One clear line for a config the decoders would run wrongly, before anything is built."""
    if config.architecture not in MODEL_CLASSES:
        raise ModelLoadError(f"unsupported architecture '{config.architecture}' "
                             f"(supported: {', '.join(MODEL_CLASSES)})")
    if len(config.windows) != config.num_layers or any(w < 0 for w in config.windows):
        raise ModelLoadError(f"sliding windows {config.layer_windows} do not give one window "
                             f"per layer of {config.num_layers}")
    if config.architecture != "gemma3" and len(config.kv_groups()) > 1:
        raise ModelLoadError(f"{config.architecture} with layers of different sliding windows "
                             "is not supported (one window for every layer, or none)")


def build_model(config: ModelConfig, tensors: dict[str, torch.Tensor | QuantTensor],
                dtype: torch.dtype, device: torch.device, max_positions: int) -> nn.Module:
    """The decoder for ``config.architecture``, filled with ``tensors`` (llama.build_model)."""
    check_supported(config)
    return llama.build_model(config, tensors, dtype, device, max_positions,
                             MODEL_CLASSES[config.architecture])

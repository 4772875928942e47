"""Load and write Hugging Face model directories: config.json, *.safetensors, tokenizer files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvserve.model.config import ModelConfig, RopeScaling
from kvserve.model.errors import ModelLoadError
from kvserve.model.tokenizer import Tokenizer, read_json

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def config_from_hf_dict(d: dict[str, Any], name: str = "") -> ModelConfig:
    """A `ModelConfig` from the contents of a Hugging Face `config.json`."""
    arch = _architecture(d)
    if d.get("mlp_bias") or (arch != "qwen2" and d.get("attention_bias")):
        raise ModelLoadError(f"{arch} with attention_bias/mlp_bias is not supported")
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    try:
        num_heads = d["num_attention_heads"]
        return ModelConfig(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rope_theta=float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=arch == "qwen2",  # Qwen2 always has q/k/v biases
            qk_norm=arch == "qwen3",
            rope_scaling=_rope_scaling(rope),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(_as_ids(d.get("eos_token_id"))),
            name=name,
            layer_windows=_layer_windows(d, arch),
        )
    except KeyError as exc:
        raise ModelLoadError(f"config.json lacks {exc} (incomplete config?)") from exc


def config_to_hf_dict(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` that `config_from_hf_dict` (and transformers) reads back."""
    scaling = config.rope_scaling
    eos = list(config.eos_token_ids)
    return {
        "architectures": [HF_ARCHITECTURES[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_scaling": None if scaling is None else {"rope_type": "llama3", **vars(scaling)},
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": "float32",
        **_window_keys(config),
    }


def _layer_windows(d: dict[str, Any], arch: str) -> tuple[int, ...]:
    """Each layer's sliding window from a config.json (0: full attention; () all full).

    Mistral: ``sliding_window`` on every layer. Qwen2/Qwen3: only with ``use_sliding_window``,
    then ``layer_types`` (or ``max_window_layers``) says which. Anything else that names a
    window is refused rather than run with full attention."""
    window = d.get("sliding_window")
    num_layers = d.get("num_hidden_layers", 0)
    if arch in ("qwen2", "qwen3") and not d.get("use_sliding_window"):
        return ()
    types = d.get("layer_types")
    if types is not None:
        kinds = {"full_attention": 0, "sliding_attention": window}
        if len(types) != num_layers or any(t not in kinds for t in types) or (
                "sliding_attention" in types and not window):
            raise ModelLoadError(f"layer_types {sorted(set(map(str, types)))} with sliding_window "
                                 f"{window} is not understood (supported: full_attention, "
                                 "sliding_attention with a window)")
        windows = tuple(int(kinds[t] or 0) for t in types)
        return windows if any(windows) else ()
    if not window:
        return ()
    if not isinstance(window, int) or window < 1:
        raise ModelLoadError(f"sliding_window {window!r} is not a number of tokens")
    if arch in ("qwen2", "qwen3"):  # layers from max_window_layers on slide
        first = d.get("max_window_layers", num_layers)
        return tuple(window if i >= first else 0 for i in range(num_layers))
    return (window,) * num_layers


def _window_keys(config: ModelConfig) -> dict[str, Any]:
    windows = set(config.layer_windows) - {0}
    if not windows:
        return {}
    if len(windows) > 1:
        raise ModelLoadError("a config.json cannot say more than one sliding window")
    types = ["sliding_attention" if w else "full_attention" for w in config.windows]
    return {"sliding_window": windows.pop(), "layer_types": types, "use_sliding_window": True}


def read_hf_directory(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"no config.json in {path} (pass a .gguf file or a Hugging Face model directory)"
        )
    config = config_from_hf_dict(read_json(config_file), name=path.name)
    generation = read_json(path / "generation_config.json")
    extra_eos = [*config.eos_token_ids, *_as_ids(generation.get("eos_token_id"))]
    tokenizer = Tokenizer.from_hf_directory(path, extra_eos_token_ids=extra_eos)
    config = dataclasses.replace(
        config, bos_token_id=tokenizer.bos_token_id, eos_token_ids=tokenizer.eos_token_ids
    )
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(
                f"cannot read {file}: {exc} (corrupt or truncated? download it again)"
            ) from exc
    return config, tensors, tokenizer


def write_hf_directory(
    config: ModelConfig, tensors: dict[str, torch.Tensor], tokenizer: Tokenizer, out_dir: Path
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_to_hf_dict(config), indent=2) + "\n")
    contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
    save_file(contiguous, out_dir / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(out_dir)


def _architecture(d: dict[str, Any]) -> str:
    by_class = {cls: name for name, cls in HF_ARCHITECTURES.items()}
    first_class = next(iter(d.get("architectures") or []), None)
    arch = d.get("model_type") or by_class.get(first_class, first_class)
    if arch not in HF_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture '{arch}' (supported: {', '.join(HF_ARCHITECTURES)})"
        )
    return arch


def _rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ModelLoadError(f"rope scaling '{rope_type}' is not supported (only llama3)")
    fields = [field.name for field in dataclasses.fields(RopeScaling)]
    return RopeScaling(**{name: rope[name] for name in fields if name in rope})


def _weight_files(path: Path) -> list[Path]:
    """Shards named by model.safetensors.index.json, else every *.safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [path / name for name in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path} (only safetensors is supported)")
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise ModelLoadError(f"weight shard missing: {missing[0]} (incomplete download?)")
    return files


def _as_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]

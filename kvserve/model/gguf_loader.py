"""Load a GGUF file: metadata, tokenizer, and weights under Hugging Face names, as float32
or (the types asked for) kept in their quantized blocks.

The header is parsed here rather than with `gguf.GGUFReader`, which builds a numpy view per
metadata item and takes ~2 s on SmolLM2's 100k vocabulary strings; `gguf` still supplies the
type tables and dequantizes the types without a fast path in gguf_blocks.py.
"""

from __future__ import annotations

import logging
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kvserve.model.config import ModelConfig
from kvserve.model.errors import ModelLoadError
from kvserve.model.gguf_blocks import QuantTensor, dequantize
from kvserve.model.tokenizer import Tokenizer

log = logging.getLogger("kvserve")

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")  # Mistral GGUFs say "llama"
GEMMA3_SLIDING_PERIOD = 6  # llama.cpp's gemma3 pattern: every 6th layer has full attention
GEMMA3_LOCAL_ROPE_THETA = 10000.0

_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                   10: "Q", 11: "q", 12: "d"}  # fmt: skip
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_TRUNCATED = "(truncated? download the file again)"
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 norms around attention and the MLP (its norm weights are stored as 1 + w).
_GEMMA3_LAYER_TENSORS = _LAYER_TENSORS | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


class _Header:
    """Cursor over the GGUF header: little-endian scalars, strings and arrays."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, num_bytes: int) -> memoryview:
        end = self.pos + num_bytes
        if end > len(self.buf):
            raise ModelLoadError(f"GGUF header runs past the end of the file {_TRUNCATED}")
        chunk, self.pos = self.buf[self.pos : end], end
        return chunk

    def scalar(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return str(self.take(self.scalar("Q")), "utf-8")

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _SCALAR_FORMATS:
                dtype = np.dtype("<" + _SCALAR_FORMATS[item_type])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
            if count > len(self.buf) - self.pos:  # every item takes at least one byte
                raise ModelLoadError(f"GGUF array runs past the end of the file {_TRUNCATED}")
            return [self.value(item_type) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise ModelLoadError(f"unknown GGUF metadata type {value_type} (corrupt file?)")
        value = self.scalar(_SCALAR_FORMATS[value_type])
        # float32 metadata (eps 1e-5 reads 9.9999997e-06): keep the shortest decimal instead.
        return float(str(np.float32(value))) if value_type == _FLOAT32 else value


def read_gguf(
    path: Path, keep_quantized: frozenset[GGMLQuantizationType] = frozenset()
) -> tuple[ModelConfig, dict[str, torch.Tensor | QuantTensor], Tokenizer]:
    """Parse and rename everything in one GGUF file.

    Weight matrices of the types in ``keep_quantized`` come back as QuantTensors, views into
    the memory-mapped file (Q and K rows reordered into a copy); the rest is dequantized to
    float32 tensors, as is everything when ``keep_quantized`` is empty.
    """
    if keep_quantized:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
    else:
        buf = bytearray(path.stat().st_size)
        with path.open("rb") as f:
            f.readinto(buf)
        raw = np.frombuffer(buf, dtype=np.uint8)
    metadata, infos, data_start = _read_header(memoryview(raw))
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    config = _config_from_metadata(metadata, infos, tokenizer, name=path.stem)
    tensors: dict[str, torch.Tensor | QuantTensor] = {}
    dequantized = set()
    for name, (shape, qtype, offset) in infos.items():
        start = data_start + offset
        num_bytes = _num_bytes(shape, qtype)
        if start + num_bytes > len(raw):
            raise ModelLoadError(f"GGUF tensor {name} runs past the end of the file {_TRUNCATED}")
        chunk = raw[start : start + num_bytes]
        if qtype in keep_quantized and len(shape) == 2:
            blocks = chunk.reshape(shape[0], -1)  # [rows, row_bytes]
            tensors[_hf_name(name, config.architecture)] = QuantTensor(
                qtype, _unpermute_rotary(name, blocks, config), shape[1])
            continue
        if keep_quantized and qtype not in _FLOAT_TYPES:
            dequantized.add(qtype.name)
        weight = dequantize(chunk, qtype).reshape(shape)
        tensors[_hf_name(name, config.architecture)] = torch.from_numpy(
            _unpermute_rotary(name, weight, config))
    if dequantized:
        log.info("kvserve: no native kernel for GGUF type(s) %s; dequantized to float32 at load",
                 ", ".join(sorted(dequantized)))
    return config, tensors, tokenizer


def _read_header(buf: memoryview) -> tuple[dict[str, Any], dict[str, tuple], int]:
    """Metadata, {tensor name: (numpy shape, type, offset)} and where tensor data starts."""
    if bytes(buf[:4]) != b"GGUF":
        raise ModelLoadError(
            "not a GGUF file (pass a .gguf file or a Hugging Face model directory)"
        )
    header = _Header(buf)
    header.take(4)  # the magic
    version = header.scalar("I")
    if version not in (2, 3):
        raise ModelLoadError(f"GGUF version {version} is not supported (2 or 3)")
    num_tensors, num_kv = header.scalar("Q"), header.scalar("Q")
    metadata = {}
    for _ in range(num_kv):
        key = header.string()
        metadata[key] = header.value(header.scalar("I"))
    infos = {}
    for _ in range(num_tensors):
        name = header.string()
        num_dims = header.scalar("I")
        if not 1 <= num_dims <= 4:
            raise ModelLoadError(f"GGUF tensor {name} has {num_dims} dims (corrupt file?)")
        dims = [header.scalar("Q") for _ in range(num_dims)]
        qtype = GGMLQuantizationType(header.scalar("I"))
        # ggml lists dims fastest-first; numpy/torch shapes are the reverse: [out, in].
        infos[name] = (tuple(reversed(dims)), qtype, header.scalar("Q"))
    alignment = metadata.get("general.alignment", 32)
    return metadata, infos, -(-header.pos // alignment) * alignment


def _num_bytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block_size * type_size


def _hf_name(gguf_name: str, arch: str = "llama") -> str:
    stem, _, suffix = gguf_name.rpartition(".")  # suffix: "weight" or "bias"
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    names = _GEMMA3_LAYER_TENSORS if arch == "gemma3" else _LAYER_TENSORS
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{suffix}"
    if stem == "rope_freqs":
        raise ModelLoadError(
            "GGUF with rope_freqs (Llama 3.1 rope scaling) is not supported; "
            "load the model's Hugging Face directory instead"
        )
    raise ModelLoadError(f"unexpected tensor '{gguf_name}' in GGUF file (unsupported model?)")


def _unpermute_rotary(name: str, weight: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Undo llama.cpp's row order for Q and K, back to Hugging Face's rotate-half layout.

    ``weight`` is [rows, ...]: float weights, or the rows of quantized blocks of a QuantTensor.

    For the llama architecture, llama.cpp's converter interleaves each head's rows as
    (pair, half) instead of HF's (half, pair) so that its rotary kernel rotates adjacent rows;
    qwen2/qwen3 files are written unpermuted.
    """
    if config.architecture != "llama" or not (".attn_q." in name or ".attn_k." in name):
        return weight
    num_heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
    rest = weight.shape[1:]
    rows = weight.reshape(num_heads, config.head_dim // 2, 2, *rest)  # (head, pair, half, ...)
    rows = np.ascontiguousarray(rows.swapaxes(1, 2))  # (head, half, pair, ...)
    return rows.reshape(weight.shape)


def _config_from_metadata(
    metadata: dict[str, Any], infos: dict[str, tuple], tokenizer: Tokenizer, name: str
) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(GGUF_ARCHITECTURES)
        raise ModelLoadError(f"unsupported architecture '{arch}' (supported in GGUF: {supported})")

    def key(suffix: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{suffix}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks '{arch}.{suffix}' (incomplete file?)")
        return value

    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ModelLoadError(f"GGUF rope scaling '{scaling}' is not supported")
    if "token_embd.weight" not in infos:
        raise ModelLoadError("GGUF file has no token_embd.weight (incomplete file?)")
    hidden, num_heads = key("embedding_length"), key("attention.head_count")
    num_layers, head_dim = key("block_count"), key("attention.key_length", hidden // num_heads)
    extra: dict[str, Any] = {}
    if arch == "gemma3":
        extra = {"layer_windows": _gemma3_windows(metadata, num_layers),
                 "rope_local_theta": GEMMA3_LOCAL_ROPE_THETA,
                 "query_pre_attn_scalar": float(head_dim)}  # as llama.cpp (not the 27B)
    elif window := metadata.get(f"{arch}.attention.sliding_window"):  # Mistral style
        extra = {"layer_windows": (int(window),) * num_layers}
    return ModelConfig(
        architecture=arch,
        vocab_size=infos["token_embd.weight"][0][0],
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=key("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        max_position_embeddings=key("context_length"),
        rope_theta=key("rope.freq_base", 10000.0),
        rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
        tie_word_embeddings="output.weight" not in infos,
        attention_bias="blk.0.attn_q.bias" in infos,
        qk_norm="blk.0.attn_q_norm.weight" in infos,
        # llama.cpp writes Gemma's (1 + w) norm weights as they are applied.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids,
        name=name,
        **extra,
    )


def _gemma3_windows(metadata: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """Each layer's window: the file's sliding window on every layer but each sixth (the
    gemma3 pattern, as llama.cpp reads it), or the file's own per-layer pattern if it has one."""
    window = metadata.get("gemma3.attention.sliding_window")
    if not isinstance(window, int) or window < 1:
        raise ModelLoadError("GGUF gemma3 lacks 'gemma3.attention.sliding_window' (a positive "
                             "number of tokens); sliding attention cannot be set up")
    pattern = metadata.get("gemma3.attention.sliding_window_pattern", GEMMA3_SLIDING_PERIOD)
    if isinstance(pattern, list) and len(pattern) == num_layers and all(
            isinstance(p, bool) for p in pattern):
        return tuple(window if sliding else 0 for sliding in pattern)
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 1:
        return tuple(0 if (i + 1) % pattern == 0 else window for i in range(num_layers))
    raise ModelLoadError(f"GGUF gemma3 sliding window pattern {pattern!r} is not understood "
                         f"(expected a period or one bool per layer); refusing to guess")

"""Model configuration: the few numbers that fix a Llama-family decoder's shapes."""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
KV_SCALE_BYTES = 4  # an int8 KV row's float32 scale (kv_quant.py)


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama", "mistral", "qwen2" or "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = ""

    def kv_row_width(self, kv_dtype: str) -> int:
        """Elements of one token's K (or V) row of one kv head: int8 adds its scale's bytes."""
        return self.head_dim + (KV_SCALE_BYTES if kv_dtype == "int8" else 0)

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return (2 * self.num_layers * self.num_kv_heads * self.kv_row_width(kv_dtype)
                * DTYPE_BYTES[kv_dtype])

"""Model configuration: the few numbers that fix a decoder's shapes (Llama family, Gemma 3)."""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
KV_GROUP = 16  # values of an int8 KV row that share one bfloat16 scale (kv_quant.py)


def int8_row_width(head_dim: int) -> int:
    """Bytes of one int8 KV row: head_dim values, then a 2-byte scale per KV_GROUP of them."""
    return head_dim + 2 * (head_dim // KV_GROUP)


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama", "mistral", "qwen2", "qwen3" or "gemma3"
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
    # Sliding windows: each layer's window in tokens (0: full attention); () = all full.
    # A query at position p sees positions p - window + 1 .. p, as in transformers.
    layer_windows: tuple[int, ...] = ()
    # Gemma 3: rope base of the sliding (local) layers, and queries scaled by
    # query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5.
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None

    @property
    def windows(self) -> tuple[int, ...]:
        """Each layer's window (0: full attention)."""
        return self.layer_windows or (0,) * self.num_layers

    def kv_groups(self) -> list[tuple[int, list[int]]]:
        """Layers that share a window, full attention first: [(window, layer indices)].

        Each group is a KV cache group of its own (its block pool and block tables), so a
        sliding group can hold only the blocks its window still sees."""
        groups: dict[int, list[int]] = {}
        for i, window in enumerate(self.windows):
            groups.setdefault(window, []).append(i)
        return sorted(groups.items(), key=lambda g: (g[0] != 0, g[0]))

    def kv_row_width(self, kv_dtype: str) -> int:
        """Elements of one token's K (or V) row of one kv head: int8 adds its scales' bytes."""
        return int8_row_width(self.head_dim) if kv_dtype == "int8" else self.head_dim

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        """Bytes of K and V one token occupies across all layers (with full attention)."""
        return self.num_layers * self.kv_bytes_per_layer_token(kv_dtype)

    def kv_bytes_per_layer_token(self, kv_dtype: str) -> int:
        """Bytes of K and V one token occupies in one layer."""
        return 2 * self.num_kv_heads * self.kv_row_width(kv_dtype) * DTYPE_BYTES[kv_dtype]

    def kv_bytes_held(self, num_tokens: int, dtype: str, block_size: int = 1) -> int:
        """Bytes of K/V one sequence of ``num_tokens`` holds: full layers every block, a
        sliding layer only the blocks its window still sees (at most window - 1 tokens
        before the next one, rounded out to blocks)."""
        total = 0
        for window, layers in self.kv_groups():
            num_blocks = -(-num_tokens // block_size)
            if window:
                first = max(0, num_tokens - window + 1) // block_size
                num_blocks -= first
            total += num_blocks * block_size * len(layers) * self.kv_bytes_per_layer_token(dtype)
        return total

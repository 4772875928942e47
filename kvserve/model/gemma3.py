"""The Gemma 3 text decoder, built from llama.py's pieces.

What differs from Llama: embeddings scaled by sqrt(hidden); RMSNorm weights applied as
(1 + w) (GGUF files store them that way already); a norm after attention and another after
the MLP as well as before each; GeGLU (tanh GELU) in the MLP; q and k normalized per head;
queries scaled by query_pre_attn_scalar ** -0.5; and two kinds of layers, read from the
file: sliding ones, which see only the last ``window`` tokens and rotate with the local rope
base (10,000), and full-attention ones with the global base. Each kind is its own KV cache
group (config.kv_groups()), so the forward pass takes one AttentionMetadata per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.model.attention import AttentionMetadata
from kvserve.model.config import ModelConfig
from kvserve.model.llama import (
    MLP,
    Attention,
    Linear,
    LlamaForCausalLM,
    RMSNorm,
    RotaryEmbedding,
)


class GeGLU(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.is_sliding = config.windows[layer_id] > 0
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.mlp = GeGLU(config)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)

    def forward(self, x, residual, rope, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """(previous layer's output, residual stream) -> the same for the next layer; each
        pre-norm adds its input to the stream as it normalizes (llama.py's RMSNorm)."""
        h, residual = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope, meta))[0]
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h))[0], residual


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # _weight: no random init (8 s for 262k rows even on the meta device); loaded later.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size,
                                                             config.hidden_size))
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # The index of each layer's KV cache group, i.e. of its AttentionMetadata.
        group_of = {i: g for g, (_, layers) in enumerate(config.kv_groups()) for i in layers}
        self.layer_groups = [group_of[i] for i in range(config.num_layers)]
        self.embed_scale = config.hidden_size**0.5
        self.rope: RotaryEmbedding | None = None  # full-attention layers
        self.rope_local: RotaryEmbedding | None = None  # sliding layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata | Sequence[AttentionMetadata]) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]; ``meta``: one per KV
        cache group, in config.kv_groups() order."""
        metas = [meta] if isinstance(meta, AttentionMetadata) else list(meta)
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)  # rounded to x's dtype, as HF
        assert self.rope is not None and self.rope_local is not None
        ropes = (self.rope(positions, x.dtype), self.rope_local(positions, x.dtype))
        residual = None
        for layer, group in zip(self.layers, self.layer_groups):
            x, residual = layer(x, residual, ropes[layer.is_sliding], metas[group])
        return self.norm(x, residual)[0]

    def init_rope(self, max_positions: int, device: torch.device) -> None:
        c = self.config
        self.rope = RotaryEmbedding(c, max_positions, device)
        self.rope_local = RotaryEmbedding(c, max_positions, device, c.rope_local_theta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab] (Gemma 3 caps no logits)."""
        return self.lm_head(hidden).float()

    load_tensors = LlamaForCausalLM.load_tensors

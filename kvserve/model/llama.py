"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) in one file, and the pieces
other decoders share (Linear, RMSNorm, rope, attention, build_model; see gemma3.py).

Tokens of all sequences in a step are flattened into one ``[T]`` batch; attention metadata
says which sequence each token belongs to and where its K/V live (see attention.py).
Q/K/V and gate/up projections are fused into one matmul each: fewer, larger calls keep the
per-layer Python work small, which matters on a CPU where a decode step is memory bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kvserve.model.attention import AttentionMetadata, paged_attention
from kvserve.model.config import ModelConfig, RopeScaling
from kvserve.model.cpu_kernels import (
    CACHE_CODES,
    DTYPE_CODES,
    HEAD_DIMS,
    DecodeLayer,
    DecodeLayersKernel,
    RMSNormKernel,
    RopeCacheKernel,
    SiluMulKernel,
    decode_layers_kernel,
    rms_norm_kernel,
    rope_cache_kernel,
    row_width,
    silu_mul_kernel,
)
from kvserve.model.gguf_blocks import QuantTensor
from kvserve.model.quant import (
    QuantEmbedding,
    QuantKernel,
    QuantLinear,
    dequantized,
    quant_kernel,
    stack_rows,
)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3: long wavelengths are divided by `factor`, short ones kept, a smooth ramp between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Linear(nn.Module):
    """``y = x W^T + b``, with W stored as [out, in] like nn.Linear.

    On a CPU, ``prepare_for_cpu()`` sets up the fastest matmuls we measured (docs/BENCHMARKS.md):
    oneDNN on a prepacked weight for several rows (1.2-2.5x F.linear in float32, more in
    bfloat16), and in float32 numpy's BLAS GEMV for a single row, which streams the weight
    about 1.5x faster than oneDNN does. float32 therefore keeps two copies of each weight;
    bfloat16 keeps only the packed one.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._w_np: np.ndarray | None = None  # float32 [in, out], for one row
        self._packed: torch.Tensor | None = None  # oneDNN layout

    def prepare_for_cpu(self) -> None:
        assert self.weight is not None
        if torch.backends.mkldnn.is_available():
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16)
            except RuntimeError:  # a dtype this oneDNN build cannot pack: keep F.linear
                pass
        if self.weight.dtype == torch.float32:
            self._w_np = self.weight.detach().t().contiguous().numpy()
            self.weight.data = torch.from_numpy(self._w_np).t()
        elif self._packed is not None:
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._w_np is not None and (x.shape[0] == 1 or self._packed is None):
            y = torch.from_numpy(np.matmul(x.numpy(), self._w_np))
            return y if self.bias is None else y + self.bias
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class RotaryEmbedding:
    """cos/sin tables for every position, looked up per token."""

    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device,
                 theta: float | None = None) -> None:
        inv_freq = rope_inv_freq(config.head_dim, theta or config.rope_theta, config.rope_scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
        self.cos = emb.cos().float().to(device)
        self.sin = emb.sin().float().to(device)

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and sin of each token's position, [T, 1, head_dim]; once per forward pass."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim], rotated in halves (the Hugging Face layout)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class RMSNorm(nn.Module):
    """RMSNorm that takes the residual add before it: ``(x, residual) -> (norm(x + residual),
    x + residual)``. On a CPU one C++ pass does both (cpu_kernels.py), instead of six ops."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.kernel: RMSNormKernel | None = None  # set by build_model on a CPU

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.kernel is not None and self.kernel.supports(x, residual, self.weight):
            return self.kernel(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps), x


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        eps = config.rms_norm_eps
        self.q_norm = nn.RMSNorm(config.head_dim, eps=eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(config.head_dim, eps=eps) if config.qk_norm else None
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.k_cache = torch.empty(0)  # [num_slots, num_kv_heads, head_dim], set by the runner
        self.v_cache = torch.empty(0)
        self.rope_kernel: RopeCacheKernel | None = None  # set by build_model on a CPU
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens, nh, nkv = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)  # [T, (nh + 2 * nkv) * hd]
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, nkv, self.head_dim)
        cos, sin = self.rope_tables
        fused = (self.rope_kernel is not None and self.q_norm is None
                 and meta.positions is not None
                 and self.rope_kernel.supports(qkv, cos, self.k_cache))
        if fused:  # one C++ pass rotates q and k and writes k and v to their cache slots
            q, k = self.rope_kernel(qkv, nh, nkv, self.head_dim, cos, sin, meta.positions,
                                    meta.slot_mapping, self.k_cache, self.v_cache)
        else:
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, nh + nkv, self.head_dim)
            if self.q_norm is not None and self.k_norm is not None:
                qk = torch.cat([self.q_norm(qk[:, :nh]), self.k_norm(qk[:, nh:])], dim=1)
            q, k = apply_rope(qk, *rope).split([nh, nkv], dim=1)  # rotate q and k in one go
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale,
                            kv_written=fused)
        return self.o_proj(o.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_kernel: SiluMulKernel | None = None  # set by build_model on a CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act_kernel is not None and self.act_kernel.supports(gate_up):
            return self.down_proj(self.act_kernel(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, rope, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns this layer's MLP output and the residual stream before it is added: each
        norm adds the previous output to the stream as it normalizes it."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, rope, meta), residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope: RotaryEmbedding | None = None
        self.decode_layers: DecodeLayers | None = None  # set by build_model where it applies

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata | Sequence[AttentionMetadata]) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]. ``meta``: of the
        one KV cache group (config.kv_groups()) all its layers share."""
        if not isinstance(meta, AttentionMetadata):  # one KV cache group: every layer's window
            (meta,) = meta
        x = self.embed_tokens(input_ids)
        if self.decode_layers is not None and self.decode_layers.supports(x, meta):
            return self.norm(*self.decode_layers(x, meta))[0]
        rope, residual = self.rope(positions, x.dtype), None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, meta)
        return self.norm(x, residual)[0]

    def init_rope(self, max_positions: int, device: torch.device) -> None:
        self.rope = RotaryEmbedding(self.config, max_positions, device)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_tensors(self, own: dict[str, torch.Tensor]) -> None:
        """Fill the parameters from this module's names (fuse_hf_tensors)."""
        params = dict(self.named_parameters())
        missing = set(params) - set(own)
        if missing:
            raise KeyError(f"checkpoint lacks tensors for: {sorted(missing)[:5]}")
        for name, param in params.items():
            param.copy_(own[name])


class DecodeLayers:
    """A decode step's decoder layers in one C++ call (cpu_kernels.DecodeLayersKernel), for a
    Llama-family model whose projections are all quantized, on a CPU. It calls the kernels
    the layers' forward calls, in the same order, so its results are the same bit for bit;
    steps with a prefill chunk take the layers' forward."""

    def __init__(self, model: LlamaForCausalLM, kernel: DecodeLayersKernel) -> None:
        config = model.config
        self.kernel = kernel
        self.attns = [layer.self_attn for layer in model.layers]
        self.layers = (DecodeLayer * len(model.layers))()
        for c, layer in zip(self.layers, model.layers, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            c.input_norm = layer.input_layernorm.weight.data_ptr()
            c.post_norm = layer.post_attention_layernorm.weight.data_ptr()
            c.qkv, c.o = attn.qkv_proj.weight_address, attn.o_proj.weight_address
            c.gate_up, c.down = mlp.gate_up_proj.weight_address, mlp.down_proj.weight_address
        cos, sin = model.rope.cos, model.rope.sin
        self.step = kernel.step(
            hidden=config.hidden_size, num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
            intermediate=config.intermediate_size, eps=config.rms_norm_eps,
            scale=self.attns[0].scale, cos=cos.data_ptr(), sin=sin.data_ptr())
        self.tables = (cos, sin)  # kept alive with the addresses above
        self.dtype = model.norm.weight.dtype

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """Every projection quantized without a bias, no q/k norm, a head_dim the attention
        kernel covers: what the C++ layer sequence assumes."""
        if type(model) is not LlamaForCausalLM or model.config.qk_norm:
            return False
        projections = [m for layer in model.layers
                       for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                 layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        return (model.config.head_dim in HEAD_DIMS
                and model.norm.weight.dtype in DTYPE_CODES
                and all(isinstance(p, QuantLinear) and p.bias is None for p in projections))

    def supports(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        k_cache = self.attns[0].k_cache
        return (not meta.prefills and meta.num_decodes == x.shape[0] > 0
                and meta.decode_kernel is not None and meta.positions is not None
                and x.dtype == self.dtype and x.is_contiguous()
                and k_cache.dtype in CACHE_CODES and k_cache.is_contiguous()
                and k_cache.shape[-1] == row_width(self.step.head_dim, k_cache.dtype))

    def __call__(self, x: torch.Tensor, meta: AttentionMetadata
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings [T, hidden] -> (the last MLP output, the residual stream before it),
        as the layers' forward returns them; the embeddings become the residual stream."""
        assert meta.decode_kernel is not None and meta.decode_blocks is not None
        for c, attn in zip(self.layers, self.attns, strict=True):
            c.k_cache, c.v_cache = attn.k_cache.data_ptr(), attn.v_cache.data_ptr()
        s = self.step
        s.dtype, s.cache_dtype = DTYPE_CODES[x.dtype], CACHE_CODES[self.attns[0].k_cache.dtype]
        s.tokens, s.window, s.block_size = x.shape[0], meta.window, meta.block_size
        s.matmul_threads = torch.get_num_threads()
        s.attention_threads = meta.decode_kernel.num_threads
        s.positions, s.slots = meta.positions.data_ptr(), meta.slot_mapping.data_ptr()
        s.block_tables, s.table_stride = (meta.decode_blocks.data_ptr(),
                                          meta.decode_blocks.stride(0))
        s.context_lens = meta.decode_lens.data_ptr()
        out = torch.empty_like(x)
        self.kernel(s, self.layers, x, out)
        return out, x


Weight = torch.Tensor | QuantTensor | list[QuantTensor]
LAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight",
               "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")


def fuse_hf_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor | QuantTensor]
                    ) -> dict[str, Weight]:
    """Hugging Face names -> this module's names, with q/k/v and gate/up stacked by rows
    (float tensors concatenated; quantized ones kept as a list of parts)."""
    embed = tensors["model.embed_tokens.weight"]
    own = {"embed_tokens.weight": embed, "norm.weight": tensors["model.norm.weight"],
           "lm_head.weight": tensors.get("lm_head.weight", embed)}  # tied: a copy of embed
    for i in range(config.num_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        attn = hf + "self_attn."
        own[me + "self_attn.qkv_proj.weight"] = stack_rows(
            [tensors[attn + n + "_proj.weight"] for n in "qkv"])
        if config.attention_bias:
            own[me + "self_attn.qkv_proj.bias"] = torch.cat(
                [tensors[attn + n + "_proj.bias"] for n in "qkv"])
        if config.qk_norm:
            own[me + "self_attn.q_norm.weight"] = tensors[attn + "q_norm.weight"]
            own[me + "self_attn.k_norm.weight"] = tensors[attn + "k_norm.weight"]
        own[me + "self_attn.o_proj.weight"] = tensors[attn + "o_proj.weight"]
        own[me + "mlp.gate_up_proj.weight"] = stack_rows(
            [tensors[hf + "mlp.gate_proj.weight"], tensors[hf + "mlp.up_proj.weight"]])
        for name in ("mlp.down_proj.weight", *LAYER_NORMS):
            if hf + name in tensors:  # Gemma 3 has all four norms, Llama the first two
                own[me + name] = tensors[hf + name]
    return own


def build_model(config: ModelConfig, tensors: dict[str, torch.Tensor | QuantTensor],
                dtype: torch.dtype, device: torch.device, max_positions: int,
                model_class: type[nn.Module] = LlamaForCausalLM) -> nn.Module:
    """Build on the meta device (no wasted random init), then fill with the checkpoint.
    (``model_class``: this one, or another decoder made of the same pieces; registry.py.)

    Quantized weights (QuantTensors, from ``load_checkpoint(path, quantization="gguf")``) are
    computed on in their blocks on a CPU (QuantLinear, QuantEmbedding); on another device, or
    where the kernel library cannot be built, they are dequantized to ``dtype``.
    """
    own = fuse_hf_tensors(config, tensors)
    kernel = quant_kernel() if device.type == "cpu" else None
    quantized = {name: w for name, w in own.items()
                 if kernel is not None and isinstance(w, QuantTensor | list)}
    own = {name: w if name in quantized else dequantized(w) for name, w in own.items()}
    with torch.device("meta"):
        model = model_class(config)
        for name, weight in quantized.items():
            module = _quant_module(name, weight, own, kernel, dtype)  # type: ignore[arg-type]
            model.set_submodule(name.removesuffix(".weight"), module)
    model = model.to_empty(device=device).to(dtype)
    model.load_tensors(own)  # type: ignore[arg-type]
    model.init_rope(max_positions, device)
    model.eval().requires_grad_(False)
    if device.type == "cpu":
        norm_kernel, rope_kernel, act_kernel = (rms_norm_kernel(), rope_cache_kernel(),
                                                silu_mul_kernel())
        for module in model.modules():
            if isinstance(module, Linear):
                module.prepare_for_cpu()
            elif isinstance(module, RMSNorm):
                module.kernel = norm_kernel
            elif isinstance(module, Attention):
                module.rope_kernel = rope_kernel
                module.rope_tables = (model.rope.cos, model.rope.sin)
            elif type(module) is MLP:  # GeGLU (gemma3.py) has its own activation
                module.act_kernel = act_kernel
        layers_kernel = decode_layers_kernel() if DecodeLayers.applies(model) else None
        if layers_kernel is not None:
            model.decode_layers = DecodeLayers(model, layers_kernel)
    return model


def _quant_module(name: str, weight: QuantTensor | list[QuantTensor], own: dict[str, Weight],
                  kernel: QuantKernel, dtype: torch.dtype) -> nn.Module:
    if name == "embed_tokens.weight":
        assert isinstance(weight, QuantTensor)
        return QuantEmbedding(weight, kernel, dtype)
    parts = weight if isinstance(weight, list) else [weight]
    return QuantLinear(parts, kernel, bias=name.removesuffix("weight") + "bias" in own)

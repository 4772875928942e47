"""What the KV cache holds: the activation dtype, another float dtype, or int8 rows.

An int8 row is one token's K (or V) of one kv head: ``head_dim`` int8 values, then their
float32 scale in 4 bytes (``absmax / 127``, symmetric), so a slot of the cache is
``[num_kv_heads, head_dim + 4]`` bytes and a block stays one contiguous tensor that the tiers
move as it is. The C++ write kernel (csrc/kv_int8.h) quantizes by the same rule, bit for bit:
a row is quantized the same way however it was computed (prefill chunk or decode, fused
kernel or PyTorch), which keeps the equality invariants exact within int8.
"""

from __future__ import annotations

import torch

from kvserve.model.config import KV_SCALE_BYTES

KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "int8": torch.int8}


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """Rows [..., head_dim] as the cache stores them ([..., head_dim + 4] for int8)."""
    if cache_dtype != torch.int8:
        return x.to(cache_dtype)
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    values = torch.round(xf * inv).clamp_(-127, 127).to(torch.int8)
    return torch.cat([values, (amax / 127).view(torch.int8)], dim=-1)


def from_cache(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows back to ``dtype`` [..., head_dim]: int8 values times their scale."""
    if rows.dtype != torch.int8:
        return rows.to(dtype)
    values = rows[..., :-KV_SCALE_BYTES].float()
    scale = rows[..., -KV_SCALE_BYTES:].contiguous().view(torch.float32)
    return (values * scale).to(dtype)

"""What the KV cache holds: the activation dtype, another float dtype, or int8 rows.

An int8 row is one token's K (or V) of one kv head: ``head_dim`` int8 values, then one
bfloat16 scale for each group of ``KV_GROUP`` (16) of them, in 2 bytes each (``absmax / 127``
of the group, rounded up to a bfloat16, symmetric). A slot of the cache is
``[num_kv_heads, head_dim + head_dim / 8]`` bytes and a block stays one contiguous tensor that
the tiers move as it is. Groups of 16 halve the next-token KL divergence from the float cache
next to one float32 scale per row, for 4 more bytes a row (docs/BENCHMARKS.md).

Keys have a few channels far larger than the rest, and one scale per row would leave the
others only a few levels. So a key row is rotated by a Hadamard transform before it is
quantized (``rotate``: blocks of ``hadamard_size(head_dim)``, unnormalized), which spreads
every channel over the whole row; attention rotates the query the same way and divides it by
the block size, so ``q . k`` is unchanged.

The C++ write kernel (csrc/kv_int8.h) quantizes by the same rules, bit for bit: a row is
quantized the same way however it was computed (prefill chunk or decode, fused kernel or
PyTorch), which keeps the equality invariants exact within int8. Both readers (the C++
attention kernel and ``from_cache``) turn a value back into ``float(q) * float(scale)``.
"""

from __future__ import annotations

import torch

from kvserve.model.config import KV_GROUP

KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "int8": torch.int8}


def hadamard_size(head_dim: int) -> int:
    """The Hadamard block: the largest power of two dividing ``head_dim``."""
    return head_dim & -head_dim


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``H x`` over the last dim in float32, H the unnormalized Hadamard matrix in blocks of
    ``hadamard_size``: butterflies ``(a, b) -> (a + b, a - b)``, in kv_int8.h's order.
    ``rotate(rotate(x)) == x * hadamard_size`` up to rounding. float64 stays float64."""
    d = x.shape[-1]
    y = x if x.dtype == torch.float64 else x.float()
    h = 1
    while h < hadamard_size(d):
        pairs = y.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(x.shape)
        h *= 2
    return y


def bf16_scales(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 127`` rounded up to a bfloat16 (so no value of the group clips), as float32."""
    bits = (amax.float() / 127).view(torch.int32)
    up = torch.where(bits & 0xFFFF != 0, bits + 0x10000, bits) & ~0xFFFF
    return up.view(torch.float32)


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, key: bool = False) -> torch.Tensor:
    """Rows [..., head_dim] as the cache stores them ([..., head_dim + head_dim / 8] for int8;
    keys rotated)."""
    if cache_dtype != torch.int8:
        return x.to(cache_dtype)
    xf = rotate(x) if key else x.float()
    groups = xf.unflatten(-1, (-1, KV_GROUP))
    scale = bf16_scales(groups.abs().amax(-1, keepdim=True))
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    values = torch.round(groups * inv).clamp_(-127, 127).to(torch.int8).flatten(-2)
    scale_bytes = scale.squeeze(-1).bfloat16().view(torch.int8)  # exact: scale is a bfloat16
    return torch.cat([values, scale_bytes], dim=-1)


def from_cache(rows: torch.Tensor, dtype: torch.dtype, key: bool = False) -> torch.Tensor:
    """Cache rows back to ``dtype`` [..., head_dim]: int8 values times their group's scale
    (keys rotated back)."""
    if rows.dtype != torch.int8:
        return rows.to(dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    d = rows.shape[-1] * KV_GROUP // (KV_GROUP + 2)
    values = rows[..., :d].float().unflatten(-1, (-1, KV_GROUP))
    scale = rows[..., d:].contiguous().view(torch.bfloat16).float().unsqueeze(-1)
    x = (values * scale).flatten(-2).to(work)  # exact: 8-bit times 8-bit significands
    if key:
        x = rotate(x) / hadamard_size(x.shape[-1])
    return x.to(dtype)

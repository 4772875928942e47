"""What the KV cache holds: the activation dtype, another float dtype, or int8 rows.

An int8 row is one token's K (or V) of one kv head: ``head_dim`` int8 values, then their
float32 scale in 4 bytes (``absmax / 127``, symmetric), so a slot of the cache is
``[num_kv_heads, head_dim + 4]`` bytes and a block stays one contiguous tensor that the tiers
move as it is.

Keys have a few channels far larger than the rest, and one scale per row would leave the
others only a few levels. So a key row is rotated by a Hadamard transform before it is
quantized (``rotate``: blocks of ``hadamard_size(head_dim)``, unnormalized), which spreads
every channel over the whole row; attention rotates the query the same way and divides it by
the block size, so ``q . k`` is unchanged. On the default model this cuts the KL divergence
of next-token distributions from the float cache by 3.5x (docs/BENCHMARKS.md).

The C++ write kernel (csrc/kv_int8.h) quantizes by the same rules, bit for bit: a row is
quantized the same way however it was computed (prefill chunk or decode, fused kernel or
PyTorch), which keeps the equality invariants exact within int8.
"""

from __future__ import annotations

import torch

from kvserve.model.config import KV_SCALE_BYTES

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


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, key: bool = False) -> torch.Tensor:
    """Rows [..., head_dim] as the cache stores them ([..., head_dim + 4] for int8; keys
    rotated)."""
    if cache_dtype != torch.int8:
        return x.to(cache_dtype)
    xf = rotate(x) if key else x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    values = torch.round(xf * inv).clamp_(-127, 127).to(torch.int8)
    return torch.cat([values, (amax / 127).view(torch.int8)], dim=-1)


def from_cache(rows: torch.Tensor, dtype: torch.dtype, key: bool = False) -> torch.Tensor:
    """Cache rows back to ``dtype`` [..., head_dim]: int8 values times their scale (keys
    rotated back)."""
    if rows.dtype != torch.int8:
        return rows.to(dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    values = rows[..., :-KV_SCALE_BYTES].to(work)
    scale = rows[..., -KV_SCALE_BYTES:].contiguous().view(torch.float32).to(work)
    x = values * scale
    if key:
        x = rotate(x) / hadamard_size(x.shape[-1])
    return x.to(dtype)
